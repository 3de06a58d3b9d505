"""A Tune callback that turns trial results into one progress line each."""

from __future__ import annotations

from collections.abc import Callable

from ray import tune


class TrialProgress(tune.Callback):
    def __init__(self, say: Callable[[str], None], metric: str, max_steps: int):
        self.say, self.metric, self.max_steps = say, metric, max_steps
        self.done = 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        speed = (f"{result.get('tokens_per_s', 0):,.0f} tokens/s, "
                 f"{result.get('data_wait_share', 0):.0%} waiting for data")
        if "mfu" in result:
            speed += f", MFU {result['mfu']:.0%}"
        self.say(f"trial {trial.trial_id} step {result.get('step', '?')}/{self.max_steps} "
                 f"{self.metric} {result.get(self.metric, float('nan')):.4f} ({speed})")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self.say(f"trial {trial.trial_id} finished ({self.done}/{len(trials)} trials done)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        self.say(f"trial {trial.trial_id} failed: see {trial.local_path}")
