"""Optimizer, learning-rate schedule and L1 penalty from the spec's train section."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from orchestrator.spec import TrainSpec


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matrices and embeddings get weight decay; biases and norm gains do not (as in nanoGPT).
    Tied parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return decay, no_decay


def build_optimizer(model: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """The spec's optimizer. Adam and AdamW are fused (one kernel over all parameters), on CPU
    as on GPU: on CPU the unfused update of a model with large embedding tables took twice as
    long as its forward and backward together."""
    decay, no_decay = split_decay_parameters(model)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    adam = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return adam(groups, lr=train.lr, betas=train.betas, fused=True)


def set_hyperparameters(optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainSpec) -> None:
    """The spec's lr, weight decay and momentum on a restored optimizer and schedule (groups as
    build_optimizer makes them): a checkpoint holds the values it was saved with, and
    population-based training continues a trial from another's checkpoint with its own."""
    for group, decay in zip(optimizer.param_groups, (train.weight_decay, 0.0)):
        group["weight_decay"] = decay
        group["initial_lr"] = train.lr
        if "momentum" in group:
            group["momentum"] = train.momentum
    scheduler.base_lrs = [train.lr] * len(optimizer.param_groups)
    for group, scale in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = train.lr * scale(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # get_last_lr's


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Horizon:
    """The step at which the lr schedule reaches its end: train.max_steps, or sooner when
    train.max_time_s will run out first, so that a trial stopped by its time still ends on a
    decayed lr (training to the budget, not to a step count it never reaches). Projected from
    the seconds per step so far on the slowest worker's clock, which every worker shares, so
    every worker's lr stays the same."""

    max_steps: int
    max_time_s: float = 0.0
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps = self.max_steps

    def update(self, step: int, train_time_s: float) -> None:
        """After `step` steps in `train_time_s` seconds of training (over restarts)."""
        if self.max_time_s > 0 and step > 0 and train_time_s > 0:
            projected = round(self.max_time_s * step / train_time_s)
            self.steps = max(step, min(self.max_steps, projected))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec,
                    horizon: Horizon | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then cosine decay to the horizon's step (train.max_steps without one)."""
    horizon = horizon or Horizon(train.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, train.warmup_steps, horizon.steps)
    )


def add_l1_gradient(parameters: list[nn.Parameter], l1: float) -> None:
    """Add the gradient of l1 * sum(|w|) to each parameter's gradient.

    Done on the gradients (after they are averaged over workers) rather than as a loss term, so
    it works the same on FSDP's sharded parameters, whose shards never appear in the forward."""
    with torch.no_grad():
        for param in parameters:
            if param.grad is not None:
                param.grad.add_(torch.sign(param), alpha=l1)
