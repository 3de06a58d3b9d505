"""A Tune callback that turns trial results into one progress line each, and keeps the sweep's
Prometheus gauges (trials by state, best metric so far) current."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from ray import tune
from ray.tune.experiment import Trial

from orchestrator import prometheus

TRIAL_STATES = (Trial.PENDING, Trial.RUNNING, Trial.PAUSED, Trial.TERMINATED, Trial.ERROR)


class TrialProgress(tune.Callback):
    def __init__(self, say: Callable[[str], None], run: str, metric: str, mode: str,
                 max_steps: int, planned: int):
        self.say, self.run, self.metric, self.max_steps = say, run, metric, max_steps
        self.planned = planned  # the sweep's trials: Tune creates them only as room frees up
        self.better = min if mode == "min" else max
        self.best = math.nan
        self.done = 0
        self.workers: dict[str, int] = {}  # each trial's worker count at its last report

    def record_states(self, trials: list[Trial]) -> None:
        """Every state's count, zeros included, so a state that empties drops to 0."""
        counts = Counter(trial.status for trial in trials)
        for state in TRIAL_STATES:
            prometheus.record("sweep_trials", counts[state], run=self.run, state=state)

    # Tune changes a trial's status after its callbacks run, so the counts are taken on every
    # step of Tune's loop (a few dict lookups) and once more at the end.
    def on_step(self, iteration, trials, **info) -> None:
        self.record_states(trials)

    def on_experiment_end(self, trials, **info) -> None:
        self.record_states(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric, math.nan)
        if not math.isnan(value):
            self.best = value if math.isnan(self.best) else self.better(self.best, value)
            prometheus.record("sweep_best_metric", self.best, run=self.run, metric=self.metric)
        speed = (f"{result.get('tokens_per_s', 0):,.0f} tokens/s, "
                 f"{result.get('data_wait_share', 0):.0%} waiting for data")
        if "mfu" in result:
            speed += f", MFU {result['mfu']:.0%}"
        speed += self._workers(trial.trial_id, result)
        self.say(f"trial {trial.trial_id} step {result.get('step', '?')}/{self.max_steps} "
                 f"{self.metric} {value:.4f} ({speed})")

    def _workers(self, trial_id: str, result: dict) -> str:
        """`, on 2 workers` for a trial training on several, and whenever a trial's count
        changed since its last report (an elastic group that grew or shrank)."""
        workers = int(result.get("workers", 1))
        before = self.workers.get(trial_id, workers)
        self.workers[trial_id] = workers
        if workers == 1 and before == 1:
            return ""
        return f", on {workers} worker{'s' if workers > 1 else ''}" + (
            f" (was {before})" if before != workers else "")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self.say(f"trial {trial.trial_id} finished ({self.done} of {self.planned} trials done)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self.say(f"trial {trial.trial_id} failed: see {trial.local_path}")
