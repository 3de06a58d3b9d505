"""Checkpoints, batch positions and training options, in one process: what a run relies on
before and after Ray starts its workers."""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from conftest import tiny_spec

from orchestrator.cluster import training_spec
from orchestrator.models import GPT
from orchestrator.spec import SpecError, parse_spec
from orchestrator.train.batches import BatchStream, DataPosition
from orchestrator.train.hosts import RayDataShard
from orchestrator.train.loop import resumed_position, throughput
from orchestrator.train.parallel import compile_unsupported, transformer_blocks
from orchestrator.train.session import InMemorySplit
from orchestrator.weights.checkpoint import (
    TRAINER_STATE_FILE,
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    staging_directory,
)


def _gpt(width: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=width, dropout=0.0)


def _saved(directory: Path, model: GPT) -> Path:
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(directory, model, optimizer, {"step": 7}, rank=0)
    return directory


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model = _gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, {"step": 3}, rank=0)
    expected_draw = torch.rand(3)
    fresh = _gpt()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, rank=0) == {"step": 3}
    assert torch.equal(fresh.wte.weight, model.wte.weight)
    assert fresh.lm_head.weight is fresh.wte.weight
    assert len(fresh_optimizer.state) == len(optimizer.state)
    assert torch.equal(torch.rand(3), expected_draw)  # the generator continues where it was


def test_a_checkpoint_of_another_model_names_both_shapes(tmp_path):
    _saved(tmp_path, _gpt(width=16))
    with pytest.raises(CheckpointError, match=r"wte.weight: checkpoint \(50, 16\) vs model "
                                              r"\(50, 32\)"):
        load_model_weights(tmp_path, _gpt(width=32))


@pytest.mark.parametrize("remove", [TRAINER_STATE_FILE, "__0_0.distcp"])
def test_an_interrupted_checkpoint_is_refused(tmp_path, remove):
    (_saved(tmp_path, _gpt()) / remove).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model_weights(tmp_path, _gpt())


def first_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["ids"][:, 0].tolist()


def _resumes_with_the_same_batches(source) -> None:
    whole = BatchStream(source, 8)
    run = [first_ids(next(whole)) for _ in range(8)]  # 5 batches per epoch: into epoch 1
    assert whole.position == DataPosition(epoch=1, batches=3)
    assert sorted(itertools.chain(*run[:5])) == list(range(40))  # an epoch holds every row once
    assert run[5:] != run[:3]  # each epoch has its own order
    resumed = BatchStream(source, 8, start=DataPosition(epoch=0, batches=3))
    assert [first_ids(next(resumed)) for _ in range(5)] == run[3:]


def test_a_resumed_ray_data_stream_continues_with_the_same_batches(ray_local):
    dataset = ray.data.from_items([{"ids": [i, i]} for i in range(40)]).materialize()
    _resumes_with_the_same_batches(RayDataShard(dataset, torch.device("cpu"), shuffle_buffer=16,
                                                seed=3))


def test_a_resumed_in_memory_stream_continues_with_the_same_batches():
    ids = torch.arange(40).repeat_interleave(2).reshape(40, 2)
    _resumes_with_the_same_batches(InMemorySplit({"ids": ids}, torch.device("cpu"), seed=3))


def test_resumed_position_keeps_rows_when_the_worker_count_changes():
    saved = {"epoch": 2, "batches": 10, "batch_size": 16, "world_size": 2}
    assert resumed_position(saved, world_size=2, batch_size=16) == DataPosition(2, 10)
    assert resumed_position(saved, world_size=1, batch_size=16) == DataPosition(2, 20)
    assert resumed_position(saved, world_size=4, batch_size=8) == DataPosition(2, 10)


def test_throughput_over_workers():
    # per worker: tokens, rows, seconds, data-wait seconds, loss sum over 4 steps
    per_worker = torch.tensor([[400.0, 4, 2.0, 0.1, 8.0], [400.0, 4, 4.0, 0.3, 12.0]],
                              dtype=torch.float64)
    metrics = throughput(per_worker, steps=4, flops_per_token=10.0, peak=1000.0)
    assert metrics["tokens_per_s"] == 200.0  # 800 tokens over the slowest worker's 4 s
    assert metrics["tokens_per_s_per_worker"] == 150.0
    assert metrics["tokens_per_s_slowest_worker"] == 100.0
    assert metrics["step_time_s"] == 1.0 and metrics["train_loss"] == 2.5
    assert metrics["data_wait_share"] == pytest.approx((0.05 + 0.075) / 2)
    assert metrics["mfu"] == pytest.approx(200.0 * 10 / (2 * 1000.0))


def _spec(train=None, workers=1):
    return parse_spec(tiny_spec("gpt", train=train or {},
                                resources={"num_workers": workers, "cpus_per_worker": 1}))


def test_global_batch_keeps_the_effective_batch_for_any_worker_count():
    for workers, accum in ((1, 4), (2, 2), (4, 1)):
        spec = _spec({"batch_size": 8, "global_batch_size": 32}, workers)
        assert spec.grad_accum_steps(workers) == accum


def test_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(SpecError, match=r"global_batch_size \(40\) must be a multiple of "
                                        r"train.batch_size × resources.num_workers \(16 × 3"):
        _spec({"batch_size": 16, "global_batch_size": 40}, workers=3)
    with pytest.raises(SpecError, match="grad_accum_steps or train.global_batch_size, not both"):
        _spec({"batch_size": 8, "global_batch_size": 32, "grad_accum_steps": 2})


def test_options_that_cannot_run_are_refused_before_workers_start():
    with pytest.raises(SpecError, match="fp16 training needs a GPU"):
        training_spec(_spec({"precision": "fp16"}), use_gpu=False)
    with pytest.raises(SpecError, match="fp16.*fsdp"):
        training_spec(_spec({"precision": "fp16", "strategy": "fsdp"}, 2), use_gpu=True)


def test_fsdp_on_one_worker_falls_back_with_a_warning(caplog):
    spec = training_spec(_spec({"strategy": "fsdp"}), use_gpu=False)
    assert spec.train.strategy == "ddp"
    assert "nothing to shard" in caplog.text


def test_a_model_without_blocks_cannot_be_sharded_per_block():
    with pytest.raises(ValueError, match="Linear has no transformer blocks"):
        transformer_blocks(torch.nn.Linear(2, 2))


def test_compile_without_a_cpu_compiler_is_reported(monkeypatch, tmp_path):
    assert compile_unsupported(torch.device("cpu")) is None  # this machine has g++
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no compiler on it
    assert "needs a C++ compiler" in compile_unsupported(torch.device("cpu"))


class _RunsCode:
    """A pickle that runs a shell command when it is loaded: what a crafted checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_metadata_that_would_run_code_is_refused_and_never_runs(tmp_path):
    checkpoint, marker = _saved(tmp_path / "checkpoint", _gpt()), tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_model_weights(checkpoint, _gpt())
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        load_checkpoint(checkpoint, _gpt(), torch.optim.AdamW(_gpt().parameters()), rank=0)
    assert not marker.exists()


def test_an_optimizer_value_that_would_run_code_is_refused_and_never_runs(tmp_path):
    """DCP's own planner loads the optimizer's non-tensor values with weights_only=False."""
    marker, model = tmp_path / "ran", _gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = _RunsCode(marker)
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, {"step": 1}, rank=0)
    fresh = _gpt()
    with pytest.raises(CheckpointError, match=r"param_groups.*lr is not plain data.*posix.system"):
        load_checkpoint(tmp_path / "checkpoint", fresh, torch.optim.AdamW(fresh.parameters()),
                        rank=0)
    assert not marker.exists()


def test_a_killed_workers_staging_folder_goes_at_the_next_save_and_a_live_ones_stays():
    """A worker killed while it reports never removes its staging folder; the next save on the
    machine does, and never one of a process that still runs."""
    ours = staging_directory(20, 0)
    (ours / "shard").write_bytes(b"y")
    killed = subprocess.run(
        [sys.executable, "-c", "import os; from orchestrator.weights.checkpoint import "
         "staging_directory as s; d = s(40, 1); (d / 'shard').write_bytes(b'x' * 1024); "
         "print(d); os._exit(0)"], capture_output=True, text=True, check=True, timeout=120)
    left = Path(killed.stdout.strip())
    assert left.is_dir() and left.parent == ours.parent and (ours / "shard").is_file()
    newer = staging_directory(60, 0)
    try:
        assert not left.exists() and (ours / "shard").is_file() and newer.is_dir()
        assert newer.name.startswith(f"{os.getpid()}-step60-rank0-")
    finally:
        for folder in (ours, newer):
            shutil.rmtree(folder)
