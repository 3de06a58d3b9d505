"""One-worker trials train inside their Tune trial actors (train/session.py). A trial actor
really killed (SIGKILL) mid-sweep, while another trial trains, resumes from its last complete
checkpoint and ends where the untouched trial, with the same settings, ends."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_spec

from orchestrator.spec import parse_spec
from orchestrator.sweep.tuner import run_sweep
from orchestrator.train.hosts import needs_ray_train
from orchestrator.weights.checkpoint import staging_root

INTERVAL = 20


def _checkpointed_trial_pid(sweep_dir: Path) -> int | None:
    """The actor pid of a trial that has a persisted checkpoint and reported it (its result.json
    line carries the pid)."""
    for trial_dir in sweep_dir.glob("tune/*/"):
        results = trial_dir / "result.json"
        if (trial_dir / "checkpoint_000000").is_dir() and results.is_file():
            lines = results.read_text().splitlines()
            if lines:
                return json.loads(lines[-1])["pid"]
    return None


def _kill_a_trial_mid_run(sweep_dir: Path, killed: list[int], timeout_s: float = 300) -> None:
    """Once a trial has a persisted checkpoint, wait for a trial to start staging a later one
    and SIGKILL the checkpointed trial's actor there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (pid := _checkpointed_trial_pid(sweep_dir)) is None:
        time.sleep(0.05)
    staging = staging_root()
    while pid is not None and time.monotonic() < deadline:
        steps = [int(m.group(1)) for path in staging.glob("*-step*")
                 if (m := re.match(r"\d+-step(\d+)-", path.name))]
        if any(step > INTERVAL for step in steps):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.005)


def test_a_killed_trial_resumes_beside_a_healthy_one_and_ends_like_it(prepared_gpt):
    run_dir, info = prepared_gpt
    # Two trials with the same settings (no search space), trained side by side; dropout on, so
    # the resumed trial must restore its random state too to end where the other one ends.
    spec = parse_spec(tiny_spec(
        "gpt", train={"max_steps": 60, "eval_interval": INTERVAL, "max_failures": 1},
        model={"dropout": 0.1}, sweep={"num_samples": 2, "grace_period": 3}))
    assert not needs_ray_train(spec)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_trial_mid_run, args=(run_dir / "sweep", killed))
    killer.start()
    try:
        result = run_sweep(spec, run_dir, info)
    finally:
        killer.join()
    assert killed, "no trial actor was killed"

    history = result.history.sort_values("step")
    assert set(result.trials["status"]) == {"done"}
    last = history.groupby("trial_id").last()
    assert (last["step"] == spec.train.max_steps).all()
    resumed = last[last["resumed_from_step"] >= 0]
    untouched = last[last["resumed_from_step"] < 0]
    assert len(resumed) == 1 and len(untouched) == 1, last[["resumed_from_step", "pid"]]
    # It resumed from a persisted checkpoint, in a new actor; the other trial kept its actor.
    resumed_from = int(resumed["resumed_from_step"].iloc[0])
    assert resumed_from >= INTERVAL and resumed_from % INTERVAL == 0
    assert killed[0] not in set(last["pid"])
    untouched_id = untouched.index[0]
    assert history.loc[history["trial_id"] == untouched_id, "pid"].nunique() == 1
    for metric in ("train_loss", "val_loss"):
        assert resumed[metric].iloc[0] == pytest.approx(untouched[metric].iloc[0], rel=0.02)
    # The winner's checkpoint is one Tune persisted under the sweep directory.
    assert Path(result.winner.checkpoint).is_relative_to(run_dir / "sweep")
    assert Path(result.winner.checkpoint, "trainer_state.json").is_file()
