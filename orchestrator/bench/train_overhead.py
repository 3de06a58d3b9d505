"""What Ray costs a training run, on the same model, data, batch and steps, taking turns over
several repeats: a plain PyTorch loop in one process against our two training paths, a
one-worker trial training inside its Tune trial actor (what a one-worker sweep runs) and a
Ray Train run (what a several-worker trial runs). Tokens/s in the steady state, and the wall time
each run spends beyond its training steps (start-up, validation, checkpoints, shutdown)."""

from __future__ import annotations

import statistics
import time

from orchestrator.bench import BenchResult
from orchestrator.bench.training import (
    bench_spec,
    in_trial_reports,
    plain_loop_tokens_per_s,
    prepare,
    ray_train_reports,
    steady,
)

PATHS = {"in_trial": in_trial_reports, "ray_train": ray_train_reports}


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def run(quick: bool) -> BenchResult:
    spec = bench_spec(quick)
    prepared = prepare(spec)
    rows = []
    for repeat in range(1 if quick else 5):
        row: dict[str, float | int] = {"repeat": repeat,
                                       "plain_tok_s": plain_loop_tokens_per_s(spec, prepared)}
        for path, reports_of in PATHS.items():
            started = time.perf_counter()
            reports = reports_of(spec, prepared, f"overhead-{repeat}")
            wall = time.perf_counter() - started
            training = sum(r["step_time_s"] for r in reports) * spec.train.eval_interval
            row[f"{path}_tok_s"] = steady(reports, "tokens_per_s")
            row[f"{path}_ratio"] = row[f"{path}_tok_s"] / row["plain_tok_s"]
            row[f"{path}_wall_s"] = wall
            row[f"{path}_not_training_s"] = wall - training
        rows.append(row)
    ratios = {path: [row[f"{path}_ratio"] for row in rows] for path in PATHS}
    return BenchResult(
        name="train-overhead", rows=rows, ratio=statistics.median(ratios["in_trial"]),
        ratio_means="one-worker trial in its Tune actor over plain PyTorch tokens/s, median over "
                    "repeats (target >= 0.97; Ray's release gate is 0.87)",
        notes={"spread (min / median / max)": {path: _spread(values)
                                               for path, values in ratios.items()},
               "model": f"GPT {spec.model.n_layer} layers, d_model {spec.model.d_model}, "
                        f"block {spec.data.block_size}, batch {spec.train.batch_size}, "
                        f"{spec.train.max_steps} steps, fp32 on CPU",
               "threads": f"{int(spec.resources.cpus_per_worker)} torch threads in each",
               "method": "steady state: median tokens/s over each run's eval intervals but the "
                         "first; our intervals exclude validation and checkpointing, the plain "
                         "loop does neither. *_wall_s: the whole run as its caller waits for it; "
                         "*_not_training_s: that minus the training steps' time"})
