"""Every sweep.search runs a small sweep to its end and resumes from the state a killed driver can
leave (Tune's saved trial list short of what its searcher handed out) to every trial the spec
asks for; PBT's exploited trial continues from its source trial's checkpoint; a time budget
ends a sweep at it with a winner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_spec

from orchestrator.report import sweep_section
from orchestrator.spec import parse_spec
from orchestrator.sweep.tuner import run_sweep

LR = {"train.lr": {"loguniform": [1e-4, 1e-2]}}


def _own_run_dir(prepared: Path, tmp_path: Path) -> Path:
    """The prepared data in a run directory of this test's own (its sweep/ starts empty)."""
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir, ignore=shutil.ignore_patterns("sweep"))
    return run_dir


def _forget_last_trial(experiment: Path) -> None:
    """What a kill between Tune's two state files leaves: the trial list lacks a trial the
    searcher's saved state has handed out."""
    for state in experiment.glob("experiment_state-*.json"):
        saved = json.loads(state.read_text())
        saved["trial_data"] = saved["trial_data"][:-1]
        state.write_text(json.dumps(saved))


@pytest.mark.parametrize("search", ["tpe", "bohb", "pbt"])
def test_each_searcher_runs_a_sweep_and_resumes_it_to_every_trial(prepared_gpt, tmp_path, search):
    prepared, info = prepared_gpt
    run_dir = _own_run_dir(prepared, tmp_path)
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 20, "eval_interval": 10},
                                sweep={"num_samples": 2, "grace_period": 1, "search": search,
                                       "space": LR}))
    first = run_sweep(spec, run_dir, info)
    assert len(first.trials) == 2 and set(first.trials["status"]) == {"done"}
    assert first.trials["config/train.lr"].between(1e-4, 1e-2).all()

    _forget_last_trial(run_dir / "sweep" / "tune")
    resumed = run_sweep(spec, run_dir, info, restore=True)
    assert len(resumed.trials) == 2 and set(resumed.trials["status"]) == {"done"}
    kept = set(first.trials["trial_id"]) & set(resumed.trials["trial_id"])
    assert len(kept) == 1  # the trial Tune's state kept was not trained again
    assert resumed.winner.metric == resumed.trials["best_val_loss"].min()


def test_pbts_exploited_trial_continues_from_its_source_trials_checkpoint(prepared_gpt, tmp_path):
    prepared, info = prepared_gpt
    run_dir = _own_run_dir(prepared, tmp_path)
    spec = parse_spec(tiny_spec(
        "gpt", train={"max_steps": 60, "eval_interval": 10},
        sweep={"num_samples": 2, "grace_period": 1, "search": "pbt",
               "space": {"train.lr": {"loguniform": [1e-6, 1e-1]}}}))
    result = run_sweep(spec, run_dir, info)
    # Tune's record of the exploits, a line each: [the target's tag, the source's, their
    # evaluations, the source's config, the target's new config]. A tag starts with the trial's
    # number, as its folder run_trial_<id>_<number>_... does.
    tune_dir = run_dir / "sweep" / "tune"
    assert (tune_dir / "pbt_global.txt").is_file(), "PBT exploited no trial"
    target_tag, source_tag, *_ = json.loads(
        (tune_dir / "pbt_global.txt").read_text().splitlines()[0])
    ids = {folder.name.split("_")[4]: "_".join(folder.name.split("_")[2:4])
           for folder in tune_dir.glob("run_trial_*")}
    target, source = (ids[tag.split("_")[0]] for tag in (target_tag, source_tag))
    # Each report gives the norm of the weights it ended with, and of those its run started
    # from: after an exploit, the target starts from weights only the source ever reported.
    history = result.history
    targets = history[(history["trial_id"] == target) & (history["resumed_from_step"] >= 0)]
    sources = history[history["trial_id"] == source]
    own = set(history[history["trial_id"] == target]["weights_norm"].round(9))
    foreign = [norm for norm in targets["start_weights_norm"].round(9) if norm not in own]
    assert foreign, targets[["step", "resumed_from_step", "start_weights_norm", "weights_norm"]]
    assert set(foreign) <= set(sources["weights_norm"].round(9))


def test_a_time_budget_ends_the_sweep_at_it_and_keeps_a_winner(prepared_gpt, tmp_path):
    prepared, info = prepared_gpt
    run_dir = _own_run_dir(prepared, tmp_path)
    budget_s = 30
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 100_000, "eval_interval": 20},
                                sweep={"num_samples": 4, "time_budget_s": budget_s,
                                       "space": LR}))
    result = run_sweep(spec, run_dir, info)
    assert result.timing.wall_s <= 1.1 * budget_s, result.timing
    spent = sweep_section(spec, result)  # what the report says of it
    assert spent["time_budget_s"] == budget_s and spent["budget_used"] <= 1.1
    assert spent["compared_at"] == "equal steps (evaluations)" and spent["trials_asked"] == 4
    assert (result.trials["last_step"] < 100_000).all()
    assert Path(result.winner.checkpoint, "trainer_state.json").is_file()
