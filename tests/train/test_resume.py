"""Workers really killed mid-run (SIGKILL): the run resumes from its last complete checkpoint,
with the data position and random state restored, and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import tiny_spec
from ray.util.state import list_actors

from orchestrator.rundir import RunDir
from orchestrator.spec import parse_spec
from orchestrator.train.config import worker_config
from orchestrator.train.trainer import build_trainer
from orchestrator.weights.checkpoint import staging_root

INTERVAL = 20


def _spec(**train):
    """Dropout on, so the resumed run must also restore the random state to end the same."""
    return parse_spec(tiny_spec("gpt", train={"max_steps": 60, "eval_interval": INTERVAL,
                                              **train}, model={"dropout": 0.1},
                                resources={"use_gpu": False}))


def _registered_checkpoint(run_storage: Path) -> bool:
    """Whether the run's Train controller has registered a checkpoint (its snapshot lists one).

    A worker's report reaches the controller asynchronously: a worker killed right after
    reporting, before the controller polled it, rightly restarts from an older checkpoint."""
    snapshot = run_storage / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "checkpoint_" in snapshot.read_text()


def _kill_worker_mid_save(run_storage: Path, killed: list[int], timeout_s: float = 240) -> None:
    """Once a checkpoint is registered, wait for a worker to start staging the next one and
    SIGKILL it there: the checkpoint being written is interrupted."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not _registered_checkpoint(run_storage):
        time.sleep(0.05)
    staging = staging_root()
    while time.monotonic() < deadline:
        steps = [int(m.group(1)) for path in staging.glob("*-step*")
                 if (m := re.match(r"\d+-step(\d+)-", path.name))]
        steps = [step for step in steps if step > INTERVAL]
        if steps:
            for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                                     filters=[("state", "=", "ALIVE")]):
                if actor.class_name == "RayTrainWorker":
                    os.kill(actor.pid, signal.SIGKILL)
                    killed.append(max(steps))
                    return
        time.sleep(0.005)


def _fit_while_killing(spec, prepared, name: str):
    run_dir, info = prepared
    trainer = build_trainer(worker_config(spec, info, RunDir.at(run_dir)), name=name)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_mid_save, args=(run_dir / "train" / name, killed))
    killer.start()
    try:
        return trainer.fit(), killed
    finally:
        killer.join()


def test_killed_worker_resumes_and_ends_like_an_uninterrupted_run(prepared_gpt):
    spec = _spec(max_failures=1)
    run_dir, info = prepared_gpt
    reference = build_trainer(worker_config(spec, info, RunDir.at(run_dir)), name="uninterrupted").fit()
    result, killed = _fit_while_killing(spec, prepared_gpt, "killed")
    assert killed, "the worker was never killed"
    assert result.error is None
    assert result.metrics["step"] == spec.train.max_steps
    # The checkpoint being written when the worker died is never the one resumed from.
    resumed = result.metrics["resumed_from_step"]
    assert INTERVAL <= resumed < killed[0] and resumed % INTERVAL == 0
    final, expected = result.metrics["train_loss"], reference.metrics["train_loss"]
    assert final == pytest.approx(expected, rel=0.02)
    assert result.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=0.02)

