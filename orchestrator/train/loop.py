"""What one Ray Train worker runs: the training loop, with validation, checkpoints and resume."""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from orchestrator.data import DataInfo
from orchestrator.models import build_model
from orchestrator.spec import JobSpec
from orchestrator.train.metrics import classifier_loss, evaluate, lm_loss
from orchestrator.train.optim import (
    build_optimizer,
    build_scheduler,
    l1_penalty,
    split_decay_parameters,
)

STATE_FILE = "state.pt"


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on GPU ('auto' or 'bf16') and on CPU only when asked; else full precision."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def save_state(directory: Path, model: torch.nn.Module, optimizer, scheduler, step: int,
               metrics: dict[str, float]) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "metrics": metrics},
               directory / STATE_FILE)


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _micro_batches(shard, batch_size: int, shuffle_buffer: int, seed: int,
                   device: torch.device) -> Iterator[dict]:
    """Shuffled batches forever, epoch after epoch (files are in source order, often by topic)."""
    for epoch in itertools.count():
        yield from shard.iter_torch_batches(
            batch_size=batch_size, device=device, drop_last=True,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed + epoch if shuffle_buffer else None)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = JobSpec.model_validate(config["spec"])
    info = DataInfo(**config["data_info"])
    train = spec.train
    torch.manual_seed(train.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    model = build_model(spec.model, info.vocab_size, info.seq_len, info.pad_id, info.num_classes)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    l1_params = split_decay_parameters(model)[0]

    step, resumed_from = 0, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = resumed_from = state["step"]
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model

    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    batches = _micro_batches(ray.train.get_dataset_shard("train"), train.batch_size,
                             train.shuffle_buffer, train.seed + rank, device)
    val_shard = ray.train.get_dataset_shard("val")
    val_batches: list[dict] | None = None

    def step_loss(batch: dict) -> torch.Tensor:
        ids = batch["ids"].long()
        with autocast_context(device, train.precision):
            if info.family == "gpt":
                loss = lm_loss(model, ids)
            else:
                loss = classifier_loss(model, ids, batch["label"].long())
        if train.l1:
            loss = loss + train.l1 * l1_penalty(l1_params)
        return loss

    model.train()
    interval_loss, interval_tokens, interval_start = 0.0, 0, time.perf_counter()
    steps_in_interval = 0
    while step < train.max_steps:
        for _ in range(train.grad_accum_steps):
            batch = next(batches)
            loss = step_loss(batch) / train.grad_accum_steps
            loss.backward()
            interval_loss += loss.item()
            interval_tokens += batch["ids"].numel()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        steps_in_interval += 1
        if step % train.eval_interval and step != train.max_steps:
            continue
        elapsed = time.perf_counter() - interval_start
        if val_batches is None:  # the same validation batches every time, read once
            val_batches = list(itertools.islice(
                val_shard.iter_torch_batches(batch_size=train.batch_size, device=device),
                train.eval_batches))
        val = evaluate(raw_model, val_batches, info.family, info.num_classes)
        metrics = {"step": step, "train_loss": interval_loss / steps_in_interval,
                   "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": world * interval_tokens / max(elapsed, 1e-9),
                   "resumed_from_step": resumed_from,
                   **{f"val_{name}": value for name, value in val.items()}}
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_state(Path(directory), raw_model, optimizer, scheduler, step, metrics)
            ckpt = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
        interval_loss, interval_tokens, steps_in_interval = 0.0, 0, 0
        interval_start = time.perf_counter()
