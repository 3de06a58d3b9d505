"""Loss and validation metrics shared by training, evaluation and tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.spec import Task


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on a packed block of block_size + 1 tokens."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def classifier_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids).float(), labels, ignore_index=-1)


def squared_hinge_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor
                       ) -> torch.Tensor:
    """One-vs-rest squared hinge, a linear SVM's loss (scikit-learn's LinearSVC): each class's
    logit is pushed above 1 for its texts and below -1 for the others. Labels of -1 (unseen in
    training) are left out, as cross entropy's ignore_index leaves them."""
    logits = model(ids).float()
    known = labels >= 0
    logits, labels = logits[known], labels[known]
    signs = F.one_hot(labels, logits.shape[-1]).float() * 2 - 1
    return (1 - signs * logits).clamp(min=0).pow(2).sum(-1).mean() if len(labels) \
        else logits.sum() * 0


@dataclass(frozen=True)
class Objective:
    """What training minimises for a task, and how many tokens a batch holds (for tokens/s)."""

    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    tokens: Callable[[dict[str, torch.Tensor]], int]


CLASSIFIER_LOSSES = {"cross_entropy": classifier_loss, "squared_hinge": squared_hinge_loss}


def objective_for(info, loss: str = "cross_entropy") -> Objective:
    """The objective of the task the data was prepared for (DataInfo.task); `loss` is the
    classifier's (train.loss)."""
    if info.task == Task.LANGUAGE_MODEL:
        # Packed blocks, every column but the first is a target.
        return Objective(loss=lambda model, batch: lm_loss(model, batch["ids"].long()),
                         tokens=lambda batch: batch["ids"][:, 1:].numel())
    # Padded texts and their labels.
    classify = CLASSIFIER_LOSSES[loss]
    return Objective(loss=lambda model, batch: classify(model, batch["ids"].long(),
                                                        batch["label"].long()),
                     tokens=lambda batch: batch["ids"].numel())


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes present in labels or predictions."""
    scores = []
    for cls in range(num_classes):
        tp = np.sum((predictions == cls) & (labels == cls))
        fp = np.sum((predictions == cls) & (labels != cls))
        fn = np.sum((predictions != cls) & (labels == cls))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def classification_metrics(predictions: np.ndarray, labels: np.ndarray,
                           num_classes: int) -> dict[str, float]:
    return {"accuracy": float(np.mean(predictions == labels)) if len(labels) else 0.0,
            "f1": macro_f1(predictions, labels, num_classes)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: Task,
             num_classes: int) -> dict[str, float]:
    """Validation metrics over the given batches: loss (+ perplexity or accuracy and macro F1)."""
    was_training = model.training
    model.eval()
    total_loss, count = 0.0, 0
    predictions, labels = [], []
    for batch in batches:
        ids = batch["ids"].long()
        if task == Task.LANGUAGE_MODEL:
            total_loss += lm_loss(model, ids).item() * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
        else:
            logits = model(ids).float()
            target = batch["label"].long()
            total_loss += F.cross_entropy(logits, target, ignore_index=-1,
                                          reduction="sum").item()
            count += int((target != -1).sum())  # rows of a label unseen in training: no loss
            predictions.append(logits.argmax(-1).cpu().numpy())
            labels.append(target.cpu().numpy())
    model.train(was_training)
    loss = total_loss / max(count, 1)
    if task == Task.LANGUAGE_MODEL:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return {"loss": loss, **classification_metrics(np.concatenate(predictions),
                                                   np.concatenate(labels), num_classes)}
