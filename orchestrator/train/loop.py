"""What one training worker runs: the training loop, with validation, metrics, checkpoints and
resume (model, optimizer, schedule, random state and data position). Plain Python and torch:
its host (train/session.py) is Ray Train, a Tune trial actor, or this process."""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import prometheus
from orchestrator.records import DataInfo
from orchestrator.spec import JobSpec
from orchestrator.storage import resolve
from orchestrator.train.batches import BatchStream, DataPosition
from orchestrator.train.config import WorkerConfig
from orchestrator.train.flops import model_flops_per_token, peak_flops
from orchestrator.train.masks import apply_masks, zero_masks
from orchestrator.train.objectives import Objective, evaluate
from orchestrator.train.optim import (
    Horizon,
    add_l1_gradient,
    build_optimizer,
    build_scheduler,
    set_hyperparameters,
    split_decay_parameters,
)
from orchestrator.train.parallel import (
    Precision,
    compile_unsupported,
    parallelize,
    resolve_precision,
)
from orchestrator.train.session import Session
from orchestrator.weights.checkpoint import load_checkpoint, save_checkpoint, staging_directory

log = logging.getLogger("orchestrator.train")


def autocast(device: torch.device, precision: Precision):
    return (torch.autocast(device.type, dtype=precision.dtype) if precision.dtype
            else nullcontext())


def resumed_position(data: dict[str, int], world_size: int, batch_size: int) -> DataPosition:
    """Where this run's workers pick up the epoch a checkpoint stopped in: the same batch with the
    same workers, else the same number of rows over all workers."""
    rows = data["batches"] * data["batch_size"] * data["world_size"]
    return DataPosition(data["epoch"], rows // (batch_size * world_size))


def gather(values: list[float], device: torch.device, world_size: int) -> torch.Tensor:
    """(world_size, len(values)): every worker's values, on every worker."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size == 1:
        return mine[None]
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine)
    return torch.stack(everyone).cpu()


def weights_norm(model: torch.nn.Module, device: torch.device, world_size: int) -> float:
    """Collective: the L2 norm of every weight, a fingerprint of the weights: reported at each
    evaluation and for the weights a run (re)started from, it shows where a trial continued from
    (its own checkpoint, or the one population-based training copied from another trial)."""
    total, sharded = torch.zeros((), dtype=torch.float64, device=device), False
    for value in model.state_dict().values():
        if hasattr(value, "to_local"):  # an FSDP shard: the other ranks hold the rest
            value, sharded = value.to_local(), True
        total += value.detach().double().square().sum()
    if sharded and world_size > 1:
        dist.all_reduce(total)
    return math.sqrt(float(total))


def throughput(per_worker: torch.Tensor, steps: int, flops_per_token: float | None,
               peak: float | None) -> dict[str, float]:
    """Interval figures from every worker's [tokens, rows, seconds, data-wait seconds, loss sum]."""
    tokens, rows, seconds, wait, loss = per_worker.T
    world = len(per_worker)
    slowest = float(seconds.max())
    metrics = {
        "train_loss": float(loss.sum()) / (world * steps),
        "tokens_per_s": float(tokens.sum()) / slowest,
        "tokens_per_s_per_worker": float((tokens / seconds).mean()),
        "tokens_per_s_slowest_worker": float((tokens / seconds).min()),
        "samples_per_s": float(rows.sum()) / slowest,
        "step_time_s": slowest / steps,
        "data_wait_s": float(wait.mean()) / steps,
        "data_wait_share": float((wait / seconds).mean()),
    }
    if flops_per_token:
        metrics["flops_per_s"] = metrics["tokens_per_s"] * flops_per_token
        if peak:
            metrics["mfu"] = metrics["flops_per_s"] / (world * peak)
    return metrics


@dataclass
class Interval:
    """What the steps since the last report add up to (this worker's figures)."""

    loss_sum: torch.Tensor
    tokens: int = 0
    rows: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class TrainingRun:
    """Everything one worker's training holds between steps: built (or restored) by set_up,
    advanced by train_step, reported by end_interval."""

    spec: JobSpec
    info: DataInfo
    session: Session
    objective: Objective
    device: torch.device
    precision: Precision
    model: torch.nn.Module  # wrapped for the strategy (DDP, FSDP) or the plain model
    plain_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    horizon: Horizon  # where the scheduler's decay ends, moved by train.max_time_s
    scaler: torch.amp.GradScaler
    batches: BatchStream
    flops_per_token: float | None
    peak: float | None
    tags: dict[str, str] | None  # Prometheus labels on rank 0; None on the other ranks
    l1_params: list[torch.nn.Parameter] = field(default_factory=list)
    masks: dict[str, torch.Tensor] | None = None
    step: int = 0
    resumed_from: int = -1
    restarts: int = 0
    train_time_s: float = 0.0  # seconds of training steps so far, over restarts
    start_weights_norm: float = 0.0  # weights_norm of what this run (re)started from
    interval: Interval | None = None
    val_batches: list[dict[str, torch.Tensor]] | None = None

    @property
    def out_of_time(self) -> bool:
        """train.max_time_s of training steps spent (validation and checkpoints not counted),
        by the slowest worker's clock, so that every worker stops at the same evaluation."""
        return 0 < self.spec.train.max_time_s <= self.train_time_s

    @property
    def interval_ended(self) -> bool:
        train = self.spec.train
        return self.step % train.eval_interval == 0 or self.step == train.max_steps


def train_loop(config: WorkerConfig, session: Session) -> None:
    """Train from the spec in `config` (or resume), validating, reporting and checkpointing every
    eval_interval steps through the session's host. After torchtitan's train(): set up, then
    one step at a time, closing each interval with validation, a report and a checkpoint."""
    run = set_up(config, session)
    while run.step < run.spec.train.max_steps:
        train_step(run)
        if run.interval_ended:
            end_interval(run)
            if run.out_of_time:
                return


def set_up(config: WorkerConfig, session: Session) -> TrainingRun:
    """Build the model, optimizer and schedule for this worker, and restore them (with the random
    state's seed and the data position) from a checkpoint when there is one."""
    spec, info = config.spec, config.info
    train = spec.train
    torch.manual_seed(train.seed)
    device, world, rank = session.device, session.world_size, session.rank
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    precision, warning = resolve_precision(train.precision, device)
    compile_model = train.compile
    if compile_model and (reason := compile_unsupported(device)):
        compile_model, warning = False, f"train.compile: {reason}; running eager"
    if warning and rank == 0:
        log.warning(warning)

    beginning = config.start.begin(config, device)
    model, objective = beginning.model, beginning.objective
    flops_per_token = model_flops_per_token(model, info.context_length)
    peak = peak_flops(device, precision.dtype or torch.float32)
    model = parallelize(model, train, device, world, precision, compile_model)
    optimizer = build_optimizer(model, train)
    horizon = Horizon(train.max_steps, train.max_time_s)
    plain_model = model.module if hasattr(model, "module") else model
    run = TrainingRun(
        spec=spec, info=info, session=session, objective=objective, device=device,
        precision=precision, model=model, plain_model=plain_model,
        # Pruned weights stay zero through a recovery fine-tune: masks of the weights it
        # starts from.
        masks=zero_masks(plain_model) if beginning.keep_zeros else None,
        optimizer=optimizer, scheduler=build_scheduler(optimizer, train, horizon), horizon=horizon,
        scaler=torch.amp.GradScaler(device.type, enabled=precision.scaler),
        batches=None, flops_per_token=flops_per_token, peak=peak,
        # Rank 0 speaks for the trial in Prometheus; the others record nothing.
        tags={"run": spec.name, "trial": session.name} if rank == 0 else None,
        l1_params=split_decay_parameters(model)[0])

    position = DataPosition()
    # After a worker failure the host (Ray Train, or Tune) hands back this run's latest
    # checkpoint; a new run may start from another run's (Train V2 deprecated
    # resume_from_checkpoint for this).
    failed_over = session.restored()
    if failed_over or config.resume_from:
        with (failed_over.as_directory() if failed_over
              else resolve(config.resume_from).local_copy()) as directory:
            state = load_checkpoint(directory, model, optimizer, rank)
        run.scheduler.load_state_dict(state["scheduler"])
        run.step = run.resumed_from = state["step"]
        run.train_time_s = state.get("train_time_s", 0.0)
        horizon.update(run.step, run.train_time_s)
        set_hyperparameters(optimizer, run.scheduler, train)
        position = resumed_position(state["data"], world, train.batch_size)
        run.restarts = state.get("restarts", 0) + bool(failed_over)
    run.start_weights_norm = weights_norm(run.plain_model, device, world)
    if run.tags:
        prometheus.record("train_restarts", run.restarts, **run.tags)
    run.batches = BatchStream(session.train_source(train.shuffle_buffer, train.seed + rank),
                              train.batch_size, position)
    run.model.train()
    start_interval(run)
    return run


def start_interval(run: TrainingRun) -> None:
    run.interval = Interval(loss_sum=torch.zeros((), device=run.device))
    run.batches.wait_s = 0.0


def train_step(run: TrainingRun) -> None:
    """One optimizer step: grad_accum micro-batches forward and backward (DDP all-reduces on the
    last only), the L1 penalty, clipping, the (scaled) step and the schedule."""
    accum = run.spec.grad_accum_steps(run.session.world_size)
    train, interval = run.spec.train, run.interval
    no_sync = getattr(run.model, "no_sync", None)  # DDP: no all-reduce on accumulation steps
    for micro in range(accum):
        batch = next(run.batches)
        last = micro == accum - 1
        with (nullcontext() if last or no_sync is None else no_sync()), \
                autocast(run.device, run.precision):
            loss = run.objective.loss(run.model, batch)
            run.scaler.scale(loss / accum).backward()
        interval.loss_sum += loss.detach() / accum
        interval.rows += len(batch["ids"])
        interval.tokens += run.objective.tokens(batch)
    run.scaler.unscale_(run.optimizer)
    if train.l1:
        add_l1_gradient(run.l1_params, train.l1)
    if train.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.masks:
        apply_masks(run.plain_model, run.masks)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    interval.steps += 1
    if run.tags:
        prometheus.record("train_steps", 1, **run.tags)


def end_interval(run: TrainingRun) -> None:
    """Validate, then report the interval's figures with a checkpoint, and start the next one."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    interval, world = run.interval, run.session.world_size
    seconds = time.perf_counter() - interval.started
    per_worker = gather([interval.tokens, interval.rows, seconds, run.batches.wait_s,
                         float(interval.loss_sum)], run.device, world)
    run.train_time_s += float(per_worker[:, 2].max())
    run.horizon.update(run.step, run.train_time_s)
    # workers: this interval's group size, which changes under elastic training.
    metrics = {"step": run.step, "lr": run.scheduler.get_last_lr()[0], "workers": world,
               "resumed_from_step": run.resumed_from, "epoch": run.batches.position.epoch,
               "train_time_s": run.train_time_s, "start_weights_norm": run.start_weights_norm,
               "weights_norm": weights_norm(run.plain_model, run.device, world),
               **throughput(per_worker, interval.steps, run.flops_per_token, run.peak)}
    metrics.update({f"val_{name}": value for name, value in validate(run).items()})
    position, train = run.batches.position, run.spec.train
    report_with_checkpoint(run.session, metrics, run.model, run.optimizer, run.tags,
                           trainer_state={
        "step": run.step, "scheduler": run.scheduler.state_dict(), "world_size": world,
        "restarts": run.restarts, "train_time_s": run.train_time_s,
        "data": {"epoch": position.epoch, "batches": position.batches,
                 "batch_size": train.batch_size, "world_size": world}})
    start_interval(run)


def validate(run: TrainingRun) -> dict[str, float]:
    """Validation metrics on the same batches every time (read once, at the first interval)."""
    if run.val_batches is None:
        run.val_batches = run.session.val_batches(run.spec.train.batch_size,
                                                  run.spec.train.eval_batches)
    return evaluate(run.plain_model, run.val_batches, run.info.task, run.info.num_classes)


def report_with_checkpoint(session: Session, metrics: dict[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, tags: dict[str, str] | None,
                           trainer_state: dict[str, Any]) -> None:
    """Every worker saves its shards into its own staging directory and reports it; Ray Train
    merges them into one checkpoint and registers it once all workers have reported (Tune
    persists a one-worker trial's). With `tags` (rank 0) the figures also go to Prometheus."""
    rank = session.rank
    staging = staging_directory(trainer_state["step"], rank)
    try:
        started = time.perf_counter()
        save_checkpoint(staging, model, optimizer, {**trainer_state, "metrics": metrics}, rank)
        metrics = {**metrics, "checkpoint_s": time.perf_counter() - started}
        if tags:
            prometheus.record_training_report(metrics, **tags)
        session.report(metrics, str(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
