"""The sweep's progress lines, and its trials table, say how many workers an interval trained
on when it is more than one, and when an elastic trial's group grew or shrank."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.sweep.progress import TrialProgress


def test_progress_lines_name_the_workers_of_each_interval_and_every_resize() -> None:
    lines: list[str] = []
    progress = TrialProgress(lines.append, "job", "val_loss", "min", max_steps=40, planned=8)
    trial = SimpleNamespace(trial_id="t1")
    for step, workers in ((10, 1), (20, 2), (30, 2), (40, 1)):
        progress.on_trial_result(0, [trial], trial, {"step": step, "val_loss": 1.0,
                                                     "workers": workers})
    assert [line.split("waiting for data")[1] for line in lines] == [
        ")", ", on 2 workers (was 1))", ", on 2 workers)", ", on 1 worker (was 2))"]
    assert lines[0].startswith("trial t1 step 10/40 val_loss 1.0000")
    # Tune has created only the trials there was room for: the count is the sweep's own.
    progress.on_trial_complete(0, [trial], trial)
    assert lines[-1] == "trial t1 finished (1 of 8 trials done)"


def test_the_trials_table_names_each_group_size_in_the_order_the_intervals_trained() -> None:
    from orchestrator.sweep.tuner import group_sizes

    assert group_sizes([2, 2, 2]) == "2"
    assert group_sizes([1, 1, 2, 2, 1]) == "1→2→1"
