"""DDP and FSDP on CPU (gloo) with 2 real Ray Train workers, and sharded checkpoints that resume
with a different number of workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from orchestrator.data import prepare_data
from orchestrator.models import build_model
from orchestrator.spec import parse_spec
from orchestrator.train.checkpoint import load_model_weights
from orchestrator.train.trainer import build_trainer

STEPS, INTERVAL = 8, 2


def _spec(strategy: str, workers: int, max_steps: int = STEPS):
    return parse_spec(tiny_spec("gpt", train={
        "strategy": strategy, "max_steps": max_steps, "eval_interval": INTERVAL,
        "checkpoints_to_keep": 10, "checkpoint_keep": "latest", "global_batch_size": 32,
        "batch_size": 16, "warmup_steps": 2, "l1": 1e-5},
        resources={"num_workers": workers, "cpus_per_worker": 1}))


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    spec = _spec("ddp", 2)
    run_dir = tmp_path_factory.mktemp("parallel")
    return run_dir, prepare_data(spec, run_dir)


@pytest.fixture(scope="module")
def runs(prepared):
    """The same seed and data, trained once with DDP and once with FSDP over 2 workers."""
    run_dir, info = prepared
    return {strategy: build_trainer(_spec(strategy, 2), run_dir, info, name=strategy).fit()
            for strategy in ("ddp", "fsdp")}


def _curve(result, key: str) -> list[float]:
    reports = sorted((metrics["step"], metrics[key]) for _, metrics in result.best_checkpoints)
    assert [step for step, _ in reports] == list(range(INTERVAL, STEPS + 1, INTERVAL))
    return [value for _, value in reports]


def test_fsdp_matches_ddp_loss_curve(runs):
    for strategy, result in runs.items():
        assert result.error is None, f"{strategy}: {result.error}"
    for key in ("train_loss", "val_loss"):
        ddp, fsdp = _curve(runs["ddp"], key), _curve(runs["fsdp"], key)
        assert fsdp == pytest.approx(ddp, rel=1e-3), key
    assert _curve(runs["ddp"], "train_loss")[-1] < _curve(runs["ddp"], "train_loss")[0]


def test_fsdp_checkpoint_holds_one_shard_per_worker(runs):
    names = {path.name for path in Path(runs["fsdp"].checkpoint.path).iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"} <= names


def test_two_worker_fsdp_checkpoint_resumes_with_one_worker(runs, prepared):
    run_dir, info = prepared
    checkpoint = runs["fsdp"].checkpoint
    more = STEPS + 2 * INTERVAL
    result = build_trainer(_spec("fsdp", 1, max_steps=more), run_dir, info, name="fsdp-to-1",
                           resume_from=checkpoint.path).fit()
    assert result.error is None
    assert result.metrics["resumed_from_step"] == STEPS and result.metrics["step"] == more
    # The resumed run starts from the sharded weights: its first validation is close to the
    # loss the two workers ended with, far below an untrained model's.
    first = min(result.best_checkpoints, key=lambda pair: pair[1]["step"])[1]
    assert first["val_loss"] < runs["fsdp"].metrics["val_loss"] * 1.05


def test_sharded_checkpoint_loads_into_a_plain_model(runs, prepared):
    _, info = prepared
    spec = _spec("fsdp", 2)
    model = build_model(spec.model, info.vocab_size, info.seq_len, info.pad_id)
    untouched = model.wte.weight.detach().clone()
    state = load_model_weights(runs["fsdp"].checkpoint.path, model)
    assert state["step"] == STEPS and state["world_size"] == 2
    assert not torch.equal(model.wte.weight, untouched)
    assert model.lm_head.weight is model.wte.weight  # still tied
