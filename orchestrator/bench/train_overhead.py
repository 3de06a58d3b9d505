"""What Ray costs a training run: our Ray Train path with one worker against a plain PyTorch loop
in one process, on the same model, data, batch and steps, taking turns over several repeats."""

from __future__ import annotations

import statistics
import time

from orchestrator.bench import BenchResult
from orchestrator.bench.training import (
    bench_spec,
    plain_loop_tokens_per_s,
    prepare,
    ray_train_reports,
    steady,
)


def run(quick: bool) -> BenchResult:
    spec = bench_spec(quick)
    prepared = prepare(spec)
    rows = []
    for repeat in range(1 if quick else 3):
        plain = plain_loop_tokens_per_s(spec, prepared)
        started = time.perf_counter()
        reports = ray_train_reports(spec, prepared, f"overhead-{repeat}")
        rows.append({"repeat": repeat, "plain_tok_s": plain,
                     "ray_train_tok_s": steady(reports, "tokens_per_s"),
                     "ray_data_wait_share": steady(reports, "data_wait_share"),
                     "ray_run_wall_s": time.perf_counter() - started})
        rows[-1]["ratio"] = rows[-1]["ray_train_tok_s"] / plain
    ratio = statistics.median(row["ratio"] for row in rows)
    return BenchResult(
        name="train-overhead", rows=rows, ratio=ratio,
        ratio_means="Ray Train (1 worker) over plain PyTorch tokens/s, median over repeats "
                    "(target >= 0.97; Ray's release gate is 0.87)",
        notes={"model": f"GPT {spec.model.n_layer} layers, d_model {spec.model.d_model}, "
                        f"block {spec.data.block_size}, batch {spec.train.batch_size}, "
                        f"{spec.train.max_steps} steps, fp32 on CPU",
               "threads": f"{int(spec.resources.cpus_per_worker)} torch threads in both",
               "method": "steady state: median tokens/s over each run's eval intervals but the "
                         "first; our path's intervals exclude validation and checkpointing, "
                         "the plain loop does neither; ray_run_wall_s includes worker start-up"})
