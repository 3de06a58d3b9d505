"""The sweep's own account of where its wall time went (no Ray needed)."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.sweep.tuner import sweep_timing


def test_training_time_counts_every_interval_once_including_a_short_last_one():
    # Two trials, eval_interval 50, max_steps 120: intervals of 50, 50 and 20 steps.
    history = pd.DataFrame({"trial_id": ["a"] * 3 + ["b"] * 3, "step": [50, 100, 120] * 2,
                            "step_time_s": [0.1, 0.1, 0.2, 0.3, 0.3, 0.3],
                            "checkpoint_s": [0.5] * 6})
    timing = sweep_timing(history, eval_interval=50, wall_s=40.0, concurrent_trials=2)
    assert timing.training_s == pytest.approx(5 + 5 + 4 + 15 + 15 + 6)
    assert timing.checkpoint_s == pytest.approx(3.0)
    assert timing.overhead == pytest.approx(40.0 / (50 / 2))


def test_a_sweep_without_reports_has_no_training_time():
    timing = sweep_timing(pd.DataFrame(), eval_interval=50, wall_s=3.0, concurrent_trials=2)
    assert timing.training_s == 0 and timing.overhead != timing.overhead  # NaN: nothing to compare
