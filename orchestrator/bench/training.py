"""What the training benchmarks share: one GPT spec, its data prepared once, a plain PyTorch loop
to compare with, and our two training paths' reports (a Ray Train run, a one-worker trial)."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from orchestrator import prometheus
from orchestrator.bench.repository import sample_corpus
from orchestrator.cluster import plan_cluster, with_device
from orchestrator.data.stage import prepare_data
from orchestrator.models import build_model
from orchestrator.records import DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, parse_spec
from orchestrator.sweep.tuner import run_sweep
from orchestrator.train.config import worker_config
from orchestrator.train.objectives import lm_loss
from orchestrator.train.optim import build_optimizer, build_scheduler
from orchestrator.train.session import read_split_tensors
from orchestrator.train.trainer import build_trainer

BENCH_TAGS = {"run": "bench", "trial": "bench"}
# What one interval reports in our loop (values do not matter for the cost of recording them).
INTERVAL_FIGURES = {"tokens_per_s": 1.0, "samples_per_s": 1.0, "step_time_s": 1.0,
                    "data_wait_s": 1.0, "train_loss": 1.0, "checkpoint_s": 1.0,
                    "val_loss": 1.0, "val_perplexity": 1.0}
QUICK_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 64}
FULL_MODEL = {"n_layer": 4, "n_head": 4, "d_model": 128}


def worker_threads() -> int:
    """Threads for one training process: every core but one, which Ray's own processes and the
    driver keep; the plain loop gets the same number."""
    return max(1, (os.cpu_count() or 2) - 1)


def bench_spec(quick: bool, **train: Any) -> JobSpec:
    steps = 8 if quick else 60
    return parse_spec({
        "name": "bench", "data": {"path": str(sample_corpus()), "vocab_size": 512,
                                  "block_size": 64 if quick else 128},
        "model": {"task": "language_model", "dropout": 0.0, **(QUICK_MODEL if quick else FULL_MODEL)},
        "train": {"batch_size": 16, "max_steps": steps, "eval_interval": steps // 4,
                  "eval_batches": 1, "warmup_steps": 2, **train},
        "resources": {"num_workers": 1, "cpus_per_worker": worker_threads()}})


def ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(log_to_driver=False, logging_level="WARNING")


@dataclass
class Prepared:
    run_dir: Path
    info: DataInfo

    def train_ids(self) -> torch.Tensor:
        """The tokenized training split, as the workers read it, in one tensor."""
        return read_split_tensors(self.run_dir, "train")["ids"].long()


def prepare(spec: JobSpec, _cache: dict[str, Prepared] = {}) -> Prepared:  # noqa: B006
    """The spec's data, tokenized once per process for every benchmark that reads it, in a
    temporary run directory removed when the process exits."""
    ensure_ray()
    key = spec.data.model_dump_json()
    if key not in _cache:
        run_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
        atexit.register(shutil.rmtree, run_dir, ignore_errors=True)  # it outlives each bench
        _cache[key] = Prepared(run_dir, prepare_data(spec, run_dir))
    return _cache[key]


def steady(reports: list[dict[str, Any]], key: str) -> float:
    """Median of a figure over every interval but the first, which holds start-up work (data
    stream start, first allocations) that a long run pays once."""
    return statistics.median(report[key] for report in reports[1:])


def ray_train_reports(spec: JobSpec, prepared: Prepared, name: str) -> list[dict[str, Any]]:
    """Every interval's report of one Ray Train run, in step order."""
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={
        "checkpoints_to_keep": spec.train.max_steps, "checkpoint_keep": "latest"})})
    spec = with_device(spec, plan_cluster(spec))
    result = build_trainer(worker_config(spec, prepared.info, RunDir.at(prepared.run_dir)),
                           name=f"{name}-{time.monotonic_ns()}").fit()
    if result.error:
        raise RuntimeError(f"benchmark run {name} failed: {result.error}")
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["step"])


def in_trial_reports(spec: JobSpec, prepared: Prepared, name: str) -> list[dict[str, Any]]:
    """Every interval's report of one one-worker trial training in its Tune trial actor, as a
    sweep of one trial runs it, in step order."""
    spec = spec.model_copy(update={"name": name, "sweep": spec.sweep.model_copy(
        update={"num_samples": 1, "space": {}})})
    history = run_sweep(spec, prepared.run_dir, prepared.info).history
    return history.sort_values("step").to_dict(orient="records")


def plain_loop_tokens_per_s(spec: JobSpec, prepared: Prepared,
                            record_metrics: bool = False) -> float:
    """The same model, optimizer, schedule, clipping, batch and steps as our path, as a plain
    PyTorch loop over in-memory tensors in this process; steady-state tokens/s measured over
    the same intervals. With record_metrics it records what our loop's rank 0 records: a step
    counter every step and the interval's figures every interval."""
    torch.set_num_threads(int(spec.resources.cpus_per_worker))
    torch.manual_seed(spec.train.seed)
    info, train = prepared.info, spec.train
    ids = prepared.train_ids()
    model = build_model(spec, info)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    order = torch.randperm(len(ids))
    per_interval, cursor, started, tokens = [], 0, time.perf_counter(), 0
    model.train()
    for step in range(1, train.max_steps + 1):
        if cursor + train.batch_size > len(ids):
            order, cursor = torch.randperm(len(ids)), 0
        batch = ids[order[cursor:cursor + train.batch_size]]
        cursor += train.batch_size
        lm_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens += batch[:, 1:].numel()
        if record_metrics:
            prometheus.record("train_steps", 1, **BENCH_TAGS)
        if step % train.eval_interval == 0:
            per_interval.append({"tokens_per_s": tokens / (time.perf_counter() - started)})
            if record_metrics:
                prometheus.record_training_report(INTERVAL_FIGURES, **BENCH_TAGS)
            started, tokens = time.perf_counter(), 0
    return steady(per_interval, "tokens_per_s")
