"""Prometheus metrics for training, sweeps and serving, recorded with `ray.util.metrics`.

Each Ray node's metrics agent exports what its processes record, so the metrics reach Prometheus
from wherever a trial or a replica runs. Every name starts with `orchestrator_`; Ray exports it
with a `ray_` prefix, counters with a `_total` suffix and histograms as `_bucket`, `_sum` and
`_count` (`orchestrator_serve_requests` -> `ray_orchestrator_serve_requests_total`). The Metrics
section of dashboards/README.md lists them; the dashboards and dashboards/alerts.yaml query them.

Metrics are created on first use (no import-time side effects) and only inside a Ray process;
elsewhere (the serve benchmark's plain uvicorn, unit tests) recording does nothing. Setting
ORCHESTRATOR_METRICS=0 turns recording off everywhere.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ray.util import metrics as ray_metrics

PREFIX = "orchestrator_"
Kind = Literal["counter", "gauge", "histogram"]
TRAIN_TAGS = ("run", "trial")
SERVE_TAGS = ("app", "route")
KEY_TAGS = ("app", "key")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Ray rebuilds a histogram's _sum from bucket midpoints, so batch sizes (integers) get bounds
# halfway between them: batches of 1 and of 2 have buckets of their own and an exact mean.
BATCH_SIZE_BUCKETS = (0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5)


@dataclass(frozen=True)
class MetricDef:
    kind: Kind
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()


METRICS: dict[str, MetricDef] = {
    # training: one series per trial, recorded by the trial's rank-0 worker
    "train_steps": MetricDef("counter", "Optimizer steps taken.", TRAIN_TAGS),
    "train_tokens_per_second": MetricDef(
        "gauge", "Tokens per second over all workers, last eval interval.", TRAIN_TAGS),
    "train_samples_per_second": MetricDef(
        "gauge", "Rows per second over all workers, last eval interval.", TRAIN_TAGS),
    "train_step_seconds": MetricDef(
        "gauge", "Mean optimizer step time (slowest worker), last eval interval.", TRAIN_TAGS),
    "train_data_wait_seconds": MetricDef(
        "gauge", "Mean time per step spent waiting for data, last eval interval.", TRAIN_TAGS),
    "train_loss": MetricDef("gauge", "Mean training loss, last eval interval.", TRAIN_TAGS),
    "train_val_metric": MetricDef(
        "gauge", "Validation metrics at the last evaluation (tag metric: val_loss, ...).",
        (*TRAIN_TAGS, "metric")),
    "train_mfu": MetricDef(
        "gauge", "Model FLOPs utilization on GPUs with a known peak.", TRAIN_TAGS),
    "train_checkpoint_seconds": MetricDef(
        "gauge", "Time the last checkpoint took to save.", TRAIN_TAGS),
    "train_restarts": MetricDef(
        "gauge", "Times this trial restarted from a checkpoint after a failure.", TRAIN_TAGS),
    # sweeps: recorded by the job's driver
    "sweep_trials": MetricDef("gauge", "Trials by state.", ("run", "state")),
    "sweep_best_metric": MetricDef(
        "gauge", "Best value of the sweep's metric so far.", ("run", "metric")),
    # serving: recorded by each replica
    "serve_requests": MetricDef(
        "counter", "HTTP requests answered, by route and status code.", (*SERVE_TAGS, "status")),
    "serve_latency_seconds": MetricDef(
        "histogram", "Request latency until the whole response is sent.", SERVE_TAGS,
        LATENCY_BUCKETS_S),
    "serve_batch_size": MetricDef(
        "histogram", "Requests per model batch.", SERVE_TAGS, BATCH_SIZE_BUCKETS),
    "serve_generated_tokens": MetricDef("counter", "Completion tokens generated.", ("app",)),
    "serve_time_to_first_token_seconds": MetricDef(
        "histogram", "Time from a streamed request to its first token.", ("app",),
        LATENCY_BUCKETS_S),
    "serve_p99_latency_target_seconds": MetricDef(
        "gauge", "The spec's p99 latency target (serve.p99_latency_target_s).", ("app",)),
    # usage per API key (`key`: the key's id, the start of its SHA-256, never the key)
    "serve_key_requests": MetricDef(
        "counter", "Requests a key made to routes that do work, admitted by its quota.",
        KEY_TAGS),
    "serve_key_prompt_tokens": MetricDef(
        "counter", "Prompt tokens of a key's admitted requests (classify: tokens read).", KEY_TAGS),
    "serve_key_completion_tokens": MetricDef(
        "counter", "Completion tokens generated for a key.", KEY_TAGS),
    "serve_key_rate_limited": MetricDef(
        "counter", "A key's requests refused with 429 by its quota, by the limit reached.",
        (*KEY_TAGS, "limit")),
}


def enabled() -> bool:
    """Recording is on inside a Ray process (one that has imported and initialised Ray)."""
    ray = sys.modules.get("ray")
    return (os.environ.get("ORCHESTRATOR_METRICS", "1") != "0" and ray is not None
            and ray.is_initialized())


@functools.cache
def _metric(name: str) -> ray_metrics.Metric:
    from ray.util import metrics as ray_metrics

    spec = METRICS[name]
    full = PREFIX + name
    if spec.kind == "counter":
        return ray_metrics.Counter(full, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(full, spec.description, tag_keys=spec.tags)
    return ray_metrics.Histogram(full, spec.description, boundaries=list(spec.buckets),
                                 tag_keys=spec.tags)


def record(name: str, value: float, **tags: str) -> None:
    """Set a gauge, add to a counter or observe a histogram value; nothing outside Ray."""
    if not enabled():
        return
    from ray.util import metrics as ray_metrics

    metric = _metric(name)
    if isinstance(metric, ray_metrics.Counter):
        if value > 0:
            metric.inc(value, tags=tags)
    elif isinstance(metric, ray_metrics.Gauge):
        metric.set(value, tags=tags)
    else:
        metric.observe(value, tags=tags)


# Training report keys -> the gauge each one sets (val_* keys go to train_val_metric).
TRAINING_GAUGES = {
    "tokens_per_s": "train_tokens_per_second", "samples_per_s": "train_samples_per_second",
    "step_time_s": "train_step_seconds", "data_wait_s": "train_data_wait_seconds",
    "train_loss": "train_loss", "mfu": "train_mfu", "checkpoint_s": "train_checkpoint_seconds",
}


def record_training_report(report: dict[str, float], run: str, trial: str) -> None:
    """One eval interval's figures (the dict a trial reports to Ray Train) as gauges."""
    for key, value in report.items():
        if key in TRAINING_GAUGES:
            record(TRAINING_GAUGES[key], value, run=run, trial=trial)
        elif key.startswith("val_"):
            record("train_val_metric", value, run=run, trial=trial, metric=key)


def exported_name(name: str) -> str:
    """The name Prometheus sees for one of METRICS (histograms: their _bucket series)."""
    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}[METRICS[name].kind]
    return f"ray_{PREFIX}{name}{suffix}"
