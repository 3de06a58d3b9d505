"""The sweep's wall-clock spend across drivers, so that a resumed sweep gets only what is left of
sweep.time_budget_s, not the whole budget again.

Each driver adds the seconds it has spent to what earlier drivers of the run spent and writes the
sum to sweep/budget.json (JSON: the budget and the seconds spent) every RECORD_EVERY_S while
Tune runs and when it ends. A driver killed between two writes loses at most that much of its
count; the resumed sweep then gets those few seconds more.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ray import tune

from orchestrator.storage import Location

BUDGET_FILE = "budget.json"
RECORD_EVERY_S = 5.0


@dataclass
class SweepClock:
    """Seconds the sweep has spent, over this driver and the run's earlier ones."""

    file: Location
    budget_s: float                # sweep.time_budget_s; 0: no budget
    spent_before_s: float = 0.0    # by the run's earlier drivers
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, file: Location, budget_s: float, restore: bool) -> SweepClock:
        """A fresh sweep starts from zero; a restored one from what its file says was spent."""
        spent = 0.0
        if restore and file.exists():
            spent = float(json.loads(file.read_text())["spent_s"])
        return cls(file, budget_s, spent)

    def spent_s(self) -> float:
        return self.spent_before_s + time.monotonic() - self.started

    def left_s(self) -> float | None:
        """Seconds of the budget left (0 once spent); None without a budget."""
        return max(0.0, self.budget_s - self.spent_s()) if self.budget_s else None

    def record(self) -> None:
        self.file.write_text(json.dumps({"time_budget_s": self.budget_s,
                                         "spent_s": round(self.spent_s(), 3)}))


class RecordSpend(tune.Callback):
    """Writes the clock's spend while Tune runs (the driver can die at any moment)."""

    def __init__(self, clock: SweepClock):
        self.clock = clock
        self.last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self.last >= RECORD_EVERY_S:
            self.clock.record()
            self.last = time.monotonic()

    def on_experiment_end(self, trials: list, **info) -> None:
        self.clock.record()

