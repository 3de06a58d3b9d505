"""A training worker really killed mid-run resumes from its last checkpoint and finishes."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray.train
from conftest import tiny_spec
from ray.util.state import list_actors

from orchestrator.data import prepare_data
from orchestrator.spec import parse_spec
from orchestrator.train.trainer import build_trainer


def _kill_worker_after_first_checkpoint(storage, killed: list[int], timeout_s: float = 240):
    """Kill once the Train controller has registered a checkpoint in its snapshot file.

    A worker's report reaches the controller asynchronously: a worker killed right after
    reporting (before the controller polled it) rightly restarts from an older checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshots = list(storage.glob("*/checkpoint_manager_snapshot.json"))
        if snapshots and "checkpoint_" in snapshots[0].read_text():
            workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                       if a.class_name == "RayTrainWorker"]
            if workers:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
                return
        time.sleep(0.2)


def _trainer_with_killer(spec, run_dir, name: str):
    """A trainer on freshly prepared data, and a started thread that kills its worker."""
    trainer = build_trainer(spec, run_dir, prepare_data(spec, run_dir), name=name)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_after_first_checkpoint,
                              args=(run_dir / "train", killed))
    killer.start()
    return trainer, killer, killed


def test_killed_worker_resumes_from_checkpoint(ray_local, tmp_path):
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 400, "eval_interval": 20,
                                              "max_failures": 1}))
    trainer, killer, killed = _trainer_with_killer(spec, tmp_path, "resume")
    result = trainer.fit()
    killer.join()
    assert killed, "the worker was never killed"
    assert result.error is None
    assert result.metrics["step"] == spec.train.max_steps
    assert result.metrics["resumed_from_step"] >= spec.train.eval_interval
    assert result.metrics["resumed_from_step"] % spec.train.eval_interval == 0


def test_without_failures_allowed_the_run_fails(ray_local, tmp_path):
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 400, "eval_interval": 20}))
    trainer, killer, killed = _trainer_with_killer(spec, tmp_path, "no-retry")
    with pytest.raises(ray.train.TrainingFailedError):
        trainer.fit()
    killer.join()
    assert killed
