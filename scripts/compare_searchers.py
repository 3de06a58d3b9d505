"""TPE (or BOHB) against random search at the same sweep budget, 3 seeds each, on one job.

    python scripts/compare_searchers.py jobs/classifier.yaml --budget-s 900 --out runs/compare \
        [--searches random tpe] [--seeds 0 1 2] [--set data.path=...]

Each run is `orchestrator run JOB --set sweep.search=S --set sweep.seed=K --set
sweep.time_budget_s=BUDGET` with serving off, in a run directory of its own under --out. Printed:
each run's winner (sweep metric and test metrics), each search's median winner, and for each
run the seconds into its sweep at which it first reached the median random-search winner's
metric (from sweep/history.parquet's report timestamps). Long: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd


def run_one(job: str, search: str, seed: int, budget_s: float, out: Path,
            overrides: list[str]) -> dict:
    run_dir = out / f"{search}-seed{seed}"
    sets = [f"sweep.search={search}", f"sweep.seed={seed}", f"sweep.time_budget_s={budget_s}",
            "serve.enabled=false", *overrides]
    command = [sys.executable, "-m", "orchestrator", "run", job, "--run-dir", str(run_dir),
               *(arg for value in sets for arg in ("--set", value))]
    subprocess.run(command, check=True)
    report = json.loads((run_dir / "report.json").read_text())
    history = pd.read_parquet(run_dir / "sweep" / "history.parquet")
    return {"search": search, "seed": seed, "run_dir": str(run_dir),
            "metric": report["metric"], "winner": _best(history, report["metric"]),
            "test": report["evaluation"]["test"]["model"], "history": history}


def _best(history: pd.DataFrame, metric: str) -> float:
    return float(history[metric].min() if metric == "val_loss" else history[metric].max())


def seconds_to_reach(history: pd.DataFrame, metric: str, target: float) -> float | None:
    """Seconds from the sweep's first report to the first report at least as good as target."""
    ordered = history.sort_values("timestamp")
    better = (ordered[metric] <= target) if metric == "val_loss" else (ordered[metric] >= target)
    reached = ordered[better]
    return (float(reached["timestamp"].iloc[0] - ordered["timestamp"].iloc[0])
            if len(reached) else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--searches", nargs="+", default=["random", "tpe"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    runs = [run_one(args.job, search, seed, args.budget_s, args.out, args.overrides)
            for search in args.searches for seed in args.seeds]
    metric = runs[0]["metric"]
    medians = {s: statistics.median(r["winner"] for r in runs if r["search"] == s)
               for s in args.searches}
    target = medians.get("random", next(iter(medians.values())))
    for run in runs:
        reached = seconds_to_reach(run["history"], metric, target)
        print(f"{run['search']:>6} seed {run['seed']}: {metric} {run['winner']:.4f}, test "
              f"{json.dumps(run['test'])}, reached random's median "
              f"{'never' if reached is None else f'after {reached:.0f} s'} ({run['run_dir']})")
    for search, median in medians.items():
        print(f"{search}: median winner {metric} {median:.4f}")


if __name__ == "__main__":
    main()
