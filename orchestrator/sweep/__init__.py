"""The sweep stage: Ray Tune over optimizer and regularization settings, one Ray Train run per
trial, ASHA early stopping, and the table of every trial in the run directory."""

from orchestrator.sweep.tuner import SweepResult, run_sweep

__all__ = ["SweepResult", "run_sweep"]
