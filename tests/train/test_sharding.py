"""FSDP2 and activation checkpointing change where tensors live and when activations are
computed, never the arithmetic: over 2 gloo processes FSDP's loss curve is DDP's, and one step
equals the same step in one process. Plain torch.distributed, no Ray: parallelize() is what each
Ray Train worker calls (tests/train/test_parallel.py runs FSDP through Ray Train)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from orchestrator.models import GPT, TextClassifier
from orchestrator.spec import TrainSpec
from orchestrator.train.metrics import classifier_loss, lm_loss
from orchestrator.train.parallel import Precision, checkpoint_activations, parallelize

BATCH, STEPS = 8, 6
# A rank whose peer died waits for it this long (gloo's default is 30 minutes): once, in a full
# suite run, one rank of the FSDP-vs-DDP curve test waited until pytest's 900 s limit.
GLOO_TIMEOUT = timedelta(seconds=120)


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt":
        return GPT(vocab_size=64, block_size=12, n_layer=2, n_head=2, d_model=16, dropout=0.0)
    return TextClassifier(vocab_size=64, num_classes=3, max_length=12, pad_id=0, n_layer=2,
                          n_head=2, d_model=16, dropout=0.0)


def _data(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (BATCH, 13 if family == "gpt" else 12), generator=generator)
    return ids, torch.randint(0, 3, (BATCH,), generator=generator)


def _loss(model, family: str, ids, labels) -> torch.Tensor:
    return lm_loss(model, ids) if family == "gpt" else classifier_loss(model, ids, labels)


def _one_step(model, family: str, ids, labels) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # linear in the gradient, unlike
    # Adam, whose first step turns the ~0 gradient of a key bias into a random ±lr
    _loss(model, family, ids, labels).backward()
    optimizer.step()
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def _sharded_worker(rank: int, world: int, port: int, family: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GLOO_TIMEOUT)
    try:
        train = TrainSpec(strategy="fsdp", activation_checkpointing=True)
        model = parallelize(_model(family), train, torch.device("cpu"), world, Precision(None),
                            compile_model=False)
        ids, labels = _data(family)
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        params = _one_step(model, family, ids[half], labels[half])
        if rank == 0:  # numpy: pickled by value, not as shared memory of an exiting process
            queue.put({name: value.numpy() for name, value in params.items()})
    finally:
        dist.destroy_process_group()


def _curve_worker(rank: int, world: int, port: int, strategy: str, queue) -> None:
    """STEPS AdamW steps of the GPT, each worker on its half of every batch; rank 0 reports the
    loss averaged over the workers at every step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GLOO_TIMEOUT)
    try:
        model = _model("gpt")
        if strategy == "ddp":  # what Ray Train's prepare_model builds on CPU
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            model = parallelize(model, TrainSpec(strategy="fsdp"), torch.device("cpu"), world,
                                Precision(None), compile_model=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(STEPS):
            ids = torch.randint(1, 64, (BATCH, 13), generator=generator)
            loss = lm_loss(model, ids[rank * BATCH // world:(rank + 1) * BATCH // world])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        if rank == 0:
            queue.put(losses)
    finally:
        dist.destroy_process_group()


def _spawn(worker, *args):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(2, free_port(), *args, queue), nprocs=2,
                       start_method="spawn")
    return queue.get()


def test_fsdp_matches_ddp_loss_curve_on_two_workers():
    ddp, fsdp = _spawn(_curve_worker, "ddp"), _spawn(_curve_worker, "fsdp")
    assert fsdp == pytest.approx(ddp, rel=1e-4)
    assert ddp[-1] < ddp[0]  # it trains


@pytest.mark.parametrize("family", ["classifier"])  # the GPT: the loss-curve test above
def test_fsdp_with_activation_checkpointing_equals_one_process(family):
    expected = _one_step(_model(family), family, *_data(family))
    sharded = _spawn(_sharded_worker, family)
    assert sharded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(torch.from_numpy(sharded[name]), value, atol=1e-5), name


def test_activation_checkpointing_keeps_gradients_and_parameter_names():
    plain, checkpointed = _model("gpt"), _model("gpt")
    checkpoint_activations(checkpointed.blocks)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    ids, _ = _data("gpt")
    for model in (plain, checkpointed):
        lm_loss(model, ids).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
