"""A resumed sweep gets only what is left of sweep.time_budget_s: the spend of every driver is
kept in sweep/budget.json (Ray-free tests of the clock), and a sweep resumed with its budget spent
trains no further (one short Ray test)."""

from __future__ import annotations

import json
import shutil
import time

from conftest import tiny_spec

from orchestrator.spec import parse_spec
from orchestrator.storage import resolve
from orchestrator.sweep.budget import SweepClock
from orchestrator.sweep.tuner import run_sweep


def test_a_restored_clock_counts_on_from_what_earlier_drivers_spent(tmp_path):
    file = resolve(str(tmp_path / "budget.json"))
    first = SweepClock.start(file, budget_s=100, restore=False)
    first.spent_before_s = 60.0  # as if this driver had run for a minute
    first.record()
    assert json.loads(file.read_text())["time_budget_s"] == 100
    assert json.loads(file.read_text())["spent_s"] >= 60

    resumed = SweepClock.start(file, budget_s=100, restore=True)
    assert resumed.spent_before_s >= 60
    assert 0 < resumed.left_s() <= 40

    resumed.spent_before_s = 150.0  # past the budget: nothing left, never less than nothing
    assert resumed.left_s() == 0


def test_a_fresh_sweep_ignores_an_old_spend_and_no_budget_has_no_limit(tmp_path):
    file = resolve(str(tmp_path / "budget.json"))
    file.write_text(json.dumps({"time_budget_s": 100, "spent_s": 99.0}))
    assert SweepClock.start(file, budget_s=100, restore=False).spent_before_s == 0
    unbounded = SweepClock.start(file, budget_s=0, restore=True)
    assert unbounded.left_s() is None and unbounded.spent_s() >= 99


def test_a_restored_clock_without_a_file_starts_from_zero(tmp_path):
    clock = SweepClock.start(resolve(str(tmp_path / "budget.json")), budget_s=30, restore=True)
    time.sleep(0.01)
    assert 29 < clock.left_s() < 30


def test_a_sweep_resumed_with_its_budget_spent_trains_no_further(prepared_gpt, tmp_path):
    prepared, info = prepared_gpt
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir, ignore=shutil.ignore_patterns("sweep"))
    budget_s = 12
    spec = parse_spec(tiny_spec(
        "gpt", train={"max_steps": 100_000, "eval_interval": 20},
        sweep={"num_samples": 3, "time_budget_s": budget_s,
               "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    first = run_sweep(spec, run_dir, info)
    spent = json.loads((run_dir / "sweep" / "budget.json").read_text())
    assert spent == {"time_budget_s": budget_s, "spent_s": spent["spent_s"]}
    assert spent["spent_s"] >= budget_s

    resumed = run_sweep(spec, run_dir, info, restore=True)
    steps = dict(zip(first.trials["trial_id"], first.trials["last_step"]))
    assert dict(zip(resumed.trials["trial_id"], resumed.trials["last_step"])) == steps
    assert resumed.winner.trial_id == first.winner.trial_id
    assert resumed.timing.wall_s >= first.timing.wall_s  # the spend of both drivers
