"""What our Prometheus metrics cost a training step: the same plain PyTorch loop with and without
recording what the training loop records (a step counter every step, the interval's figures every
interval), taking turns over several repeats; and the recording calls timed on their own."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from orchestrator import prometheus
from orchestrator.bench import BenchResult
from orchestrator.bench.training import (
    BENCH_TAGS,
    INTERVAL_FIGURES,
    bench_spec,
    plain_loop_tokens_per_s,
    prepare,
)

CALLS = 20_000


def seconds_per_call(record: Callable[[], None]) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        record()
    return (time.perf_counter() - started) / CALLS


def run(quick: bool) -> BenchResult:
    spec = bench_spec(quick)
    prepared = prepare(spec)  # starts Ray: metrics are recorded only in a Ray process
    assert prometheus.enabled(), "metrics are switched off (ORCHESTRATOR_METRICS=0)"
    rows = []
    for repeat in range(1 if quick else 5):
        without = plain_loop_tokens_per_s(spec, prepared, record_metrics=False)
        with_metrics = plain_loop_tokens_per_s(spec, prepared, record_metrics=True)
        rows.append({"repeat": repeat, "without_tok_s": without, "with_tok_s": with_metrics,
                     "ratio": with_metrics / without})
    step_s = spec.train.batch_size * spec.data.block_size / statistics.median(
        row["without_tok_s"] for row in rows)
    per_step = seconds_per_call(lambda: prometheus.record("train_steps", 1, **BENCH_TAGS))
    per_interval = seconds_per_call(
        lambda: prometheus.record_training_report(INTERVAL_FIGURES, **BENCH_TAGS))
    cost_per_step = per_step + per_interval / spec.train.eval_interval
    return BenchResult(
        name="metrics", rows=rows, ratio=statistics.median(row["ratio"] for row in rows),
        ratio_means="tokens/s with metrics over without, median over repeats (1.0: no cost)",
        notes={"step_s": round(step_s, 5),
               "step_counter_us": round(per_step * 1e6, 2),
               "interval_report_us": round(per_interval * 1e6, 2),
               "recording_share_of_step": f"{cost_per_step / step_s:.4%} (target < 1%)",
               "model": f"GPT {spec.model.n_layer} layers, d_model {spec.model.d_model}, "
                        f"batch {spec.train.batch_size}, {spec.train.max_steps} steps, "
                        f"eval every {spec.train.eval_interval}"})
