"""Tune's TPE and BOHB searchers, told only of the trials they proposed.

Tune saves its trial list and its searcher's state as two files, copied to storage in the
background: after a driver is killed, a restored sweep can hold a trial that the restored
searcher never proposed, or has already seen finish, and Tune's searchers fail on its reports
(KeyError). Such a trial still trains and counts; the searcher learns from the others."""

from __future__ import annotations

from typing import Any

from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.optuna import OptunaSearch


class _KnownTrialsOnly:
    def _knows(self, trial_id: str) -> bool:
        raise NotImplementedError

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._knows(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if self._knows(trial_id):
            super().on_trial_complete(trial_id, result, error)


class TPE(_KnownTrialsOnly, OptunaSearch):
    def _knows(self, trial_id: str) -> bool:
        return trial_id in self._ot_trials


class BOHB(_KnownTrialsOnly, TuneBOHB):
    def _knows(self, trial_id: str) -> bool:
        return trial_id in self.trial_to_params
