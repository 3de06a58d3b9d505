"""FSDP on CPU (gloo) with 2 real Ray Train workers, and its sharded checkpoints, which resume
with a different number of workers. (FSDP against DDP, step by step: test_sharding.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from orchestrator.models import build_model
from orchestrator.rundir import RunDir
from orchestrator.spec import parse_spec
from orchestrator.train.config import worker_config
from orchestrator.train.loop import resumed_position
from orchestrator.train.optim import build_optimizer
from orchestrator.train.trainer import build_trainer
from orchestrator.weights.checkpoint import load_checkpoint, load_model_weights

STEPS, INTERVAL = 8, 2


def _spec(strategy: str, workers: int, max_steps: int = STEPS):
    return parse_spec(tiny_spec("gpt", train={
        "strategy": strategy, "max_steps": max_steps, "eval_interval": INTERVAL,
        "checkpoints_to_keep": 10, "checkpoint_keep": "latest", "global_batch_size": 32,
        "batch_size": 16, "warmup_steps": 2, "l1": 1e-5},
        resources={"num_workers": workers, "cpus_per_worker": 1, "use_gpu": False}))


@pytest.fixture(scope="module")
def fsdp_run(prepared_gpt):
    run_dir, info = prepared_gpt
    return build_trainer(worker_config(_spec("fsdp", 2), info, RunDir.at(run_dir)), name="fsdp").fit()


def test_fsdp_trains_on_two_ray_train_workers(fsdp_run):
    assert fsdp_run.error is None
    reports = sorted((metrics for _, metrics in fsdp_run.best_checkpoints),
                     key=lambda metrics: metrics["step"])
    assert [m["step"] for m in reports] == list(range(INTERVAL, STEPS + 1, INTERVAL))
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert reports[-1]["tokens_per_s"] > reports[-1]["tokens_per_s_per_worker"] > 0


def test_fsdp_checkpoint_holds_one_shard_per_worker(fsdp_run):
    names = {path.name for path in Path(fsdp_run.checkpoint.path).iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"} <= names


def test_two_worker_fsdp_checkpoint_resumes_in_one_process(fsdp_run, prepared_gpt):
    """One worker resumes the two workers' shards: weights, optimizer state, trainer state."""
    _, info = prepared_gpt
    spec = _spec("fsdp", 2)
    model = build_model(spec, info)
    optimizer = build_optimizer(model, spec.train)
    state = load_checkpoint(fsdp_run.checkpoint.path, model, optimizer, rank=0)
    assert state["step"] == STEPS and state["data"]["world_size"] == 2
    moments = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    assert len(moments) == len(list(model.parameters()))
    assert all(m.shape == p.shape for m, p in zip(moments, model.parameters()))
    assert any(m.abs().sum() > 0 for m in moments)
    assert resumed_position(state["data"], world_size=1, batch_size=16).batches == \
        2 * state["data"]["batches"]


def test_sharded_checkpoint_loads_into_a_plain_model(fsdp_run, prepared_gpt):
    _, info = prepared_gpt
    spec = _spec("fsdp", 2)
    model = build_model(spec, info)
    untouched = model.wte.weight.detach().clone()
    state = load_model_weights(fsdp_run.checkpoint.path, model)
    assert state["step"] == STEPS and state["world_size"] == 2
    assert not torch.equal(model.wte.weight, untouched)
    assert model.lm_head.weight is model.wte.weight  # still tied
