"""What one training worker runs: the training loop, with validation, metrics, checkpoints and
resume (model, optimizer, schedule, random state and data position)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from orchestrator import metrics as prometheus
from orchestrator.data import DataInfo
from orchestrator.models import build_model
from orchestrator.spec import JobSpec
from orchestrator.train.batches import BatchStream, DataPosition
from orchestrator.train.checkpoint import load_checkpoint, save_checkpoint
from orchestrator.train.flops import model_flops_per_token, peak_flops
from orchestrator.train.metrics import classifier_loss, evaluate, lm_loss
from orchestrator.train.optim import (
    add_l1_gradient,
    build_optimizer,
    build_scheduler,
    split_decay_parameters,
)
from orchestrator.train.parallel import (
    Precision,
    compile_unsupported,
    parallelize,
    resolve_precision,
)
from orchestrator.train.session import RayTrainSession, Session, TrialSession

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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs."""
    train_loop(config, RayTrainSession())


def train_in_trial(config: dict[str, Any], run_dir: str) -> None:
    """What a one-worker trial runs inside its Tune trial actor (see train/session.py)."""
    train_loop(config, TrialSession(JobSpec.model_validate(config["spec"]), run_dir))


def train_loop(config: dict[str, Any], session: Session) -> None:
    """Train from the spec in `config` (or resume), validating, reporting and checkpointing every
    eval_interval steps through the session's host."""
    spec = JobSpec.model_validate(config["spec"])
    info = DataInfo(**config["data_info"])
    train, accum = spec.train, spec.grad_accum_steps
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

    model = build_model(spec.model, info.vocab_size, info.seq_len, info.pad_id, info.num_classes)
    flops_per_token = model_flops_per_token(model, info.seq_len - 1)
    peak = peak_flops(device, precision.dtype or torch.float32)
    model = parallelize(model, train, device, world, precision, compile_model)
    plain_model = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, train, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, train)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    l1_params = split_decay_parameters(model)[0]
    no_sync = getattr(model, "no_sync", None)  # DDP: no all-reduce on accumulation steps

    step, resumed_from, position, restarts = 0, -1, DataPosition(), 0
    # After a worker failure the host (Ray Train, or Tune) hands back this run's latest
    # checkpoint; a new run may start from another run's (Train V2 deprecated
    # resume_from_checkpoint for this).
    failed_over = session.restored()
    checkpoint = failed_over or (
        config.get("resume_from") and ray.train.Checkpoint(config["resume_from"]))
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, model, optimizer, rank)
        scheduler.load_state_dict(state["scheduler"])
        step = resumed_from = state["step"]
        position = resumed_position(state["data"], world, train.batch_size)
        restarts = state.get("restarts", 0) + bool(failed_over)
    # Rank 0 speaks for the trial in Prometheus; the others record nothing.
    tags = {"run": spec.name, "trial": session.name} if rank == 0 else None
    if tags:
        prometheus.record("train_restarts", restarts, **tags)
    batches = BatchStream(session.train_source(train.shuffle_buffer, train.seed + rank),
                          train.batch_size, position)
    val_batches: list[dict] | None = None

    def micro_step(batch: dict[str, torch.Tensor], sync: bool) -> torch.Tensor:
        ids = batch["ids"].long()
        with (nullcontext() if sync or no_sync is None else no_sync()), autocast(device, precision):
            if info.family == "gpt":
                loss = lm_loss(model, ids)
            else:
                loss = classifier_loss(model, ids, batch["label"].long())
            scaler.scale(loss / accum).backward()
        return loss.detach() / accum

    model.train()
    loss_sum = torch.zeros((), device=device)
    tokens = rows = steps_in_interval = 0
    batches.wait_s, started = 0.0, time.perf_counter()
    while step < train.max_steps:
        for micro in range(accum):
            batch = next(batches)
            loss_sum += micro_step(batch, sync=micro == accum - 1)
            rows += len(batch["ids"])
            tokens += batch["ids"][:, 1:].numel() if info.family == "gpt" else batch["ids"].numel()
        scaler.unscale_(optimizer)
        if train.l1:
            add_l1_gradient(l1_params, train.l1)
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        steps_in_interval += 1
        if tags:
            prometheus.record("train_steps", 1, **tags)
        if step % train.eval_interval and step != train.max_steps:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        per_worker = gather([tokens, rows, seconds, batches.wait_s, float(loss_sum)], device, world)
        metrics = {"step": step, "lr": scheduler.get_last_lr()[0], "resumed_from_step": resumed_from,
                   "epoch": batches.position.epoch,
                   **throughput(per_worker, steps_in_interval, flops_per_token, peak)}
        if val_batches is None:  # the same validation batches every time, read once
            val_batches = session.val_batches(train.batch_size, train.eval_batches)
        val = evaluate(plain_model, val_batches, info.family, info.num_classes)
        metrics.update({f"val_{name}": value for name, value in val.items()})
        report_with_checkpoint(session, metrics, model, optimizer, tags, trainer_state={
            "step": step, "scheduler": scheduler.state_dict(), "world_size": world,
            "restarts": restarts,
            "data": {"epoch": batches.position.epoch, "batches": batches.position.batches,
                     "batch_size": train.batch_size, "world_size": world}})
        loss_sum.zero_()
        tokens = rows = steps_in_interval = 0
        batches.wait_s, started = 0.0, time.perf_counter()


def report_with_checkpoint(session: Session, metrics: dict[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, tags: dict[str, str] | None,
                           trainer_state: dict[str, Any]) -> None:
    """Every worker saves its shards into its own staging directory and reports it; Ray Train
    merges them into one checkpoint and registers it once all workers have reported (Tune
    persists a one-worker trial's). With `tags` (rank 0) the figures also go to Prometheus."""
    rank = session.rank
    staging = tempfile.mkdtemp(prefix=f"orchestrator-ckpt-step{trainer_state['step']}-"
                                      f"rank{rank}-")
    try:
        started = time.perf_counter()
        save_checkpoint(staging, model, optimizer, {**trainer_state, "metrics": metrics}, rank)
        metrics = {**metrics, "checkpoint_s": time.perf_counter() - started}
        if tags:
            prometheus.record_training_report(metrics, **tags)
        session.report(metrics, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
