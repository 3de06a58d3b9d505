"""The evaluate stage: test-split metrics by batch inference with Ray Data, and the trivial
baselines the winner must beat (majority class; unigram perplexity)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import ray.data
import torch
import torch.nn.functional as F

from orchestrator.bundle import load_bundle
from orchestrator.data import DataInfo, read_split, read_splits
from orchestrator.train.metrics import classification_metrics

INFERENCE_BATCH = 64


class ScoreBatch:
    """Batch inference on one actor: the bundle is loaded once, then scores batch after batch.

    LM rows yield their summed next-token negative log-likelihood under the model and under the
    unigram baseline, and their token count; classifier rows yield the predicted and true class.
    """

    def __init__(self, bundle_dir: str, unigram_log_probs: np.ndarray | None = None):
        self.bundle = load_bundle(bundle_dir)
        self.unigram_log_probs = unigram_log_probs

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.as_tensor(np.stack(batch["ids"])).long()
        model = self.bundle.model
        if self.bundle.info.family == "gpt":
            logits = model(ids[:, :-1]).float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            unigram_nll = -self.unigram_log_probs[ids[:, 1:].numpy()].sum(1)
            return {"nll": nll.sum(1).numpy(), "unigram_nll": unigram_nll,
                    "tokens": np.full(len(ids), ids.shape[1] - 1), "split": batch["split"]}
        return {"prediction": model(ids).argmax(-1).numpy(), "label": batch["label"],
                "split": batch["split"]}


def _unigram_counts(run_dir: Path, vocab_size: int) -> np.ndarray:
    def count(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.stack(batch["ids"])[:, 1:].ravel()  # targets, as the LM is scored on them
        return {"counts": np.bincount(ids, minlength=vocab_size)[None, :]}

    totals = np.zeros(vocab_size, dtype=np.int64)
    for batch in read_split(run_dir, "train").map_batches(count).iter_batches(batch_size=None):
        totals += np.asarray(np.stack(batch["counts"])).sum(0)
    return totals


def unigram_log_probs(train_counts: np.ndarray) -> np.ndarray:
    """Log-probabilities of an add-one-smoothed unigram model fitted on the training tokens."""
    return np.log((train_counts + 1) / (train_counts.sum() + len(train_counts)))


def evaluate_bundle(run_dir: str | Path, bundle_dir: str | Path, info: DataInfo,
                    splits: tuple[str, ...] = ("val", "test"),
                    replicas: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """For each split: {'model': the bundle's metrics, 'baseline': the trivial baseline's}.

    All splits are scored in one Ray Data pass; rows carry their split from the directory name.
    """
    run_dir = Path(run_dir)
    log_probs = (unigram_log_probs(_unigram_counts(run_dir, info.vocab_size))
                 if info.family == "gpt" else None)
    scored = read_splits(run_dir, splits).map_batches(
        ScoreBatch, fn_constructor_kwargs={"bundle_dir": str(bundle_dir),
                                           "unigram_log_probs": log_probs},
        batch_size=INFERENCE_BATCH, compute=ray.data.ActorPoolStrategy(size=replicas),
    ).to_pandas()
    return {split: _split_metrics(scored[scored["split"] == split], info) for split in splits}


def _split_metrics(scored: pd.DataFrame, info: DataInfo) -> dict[str, dict[str, float]]:
    if info.family == "gpt":
        tokens = scored["tokens"].sum()
        loss = float(scored["nll"].sum() / tokens)
        baseline = float(math.exp(scored["unigram_nll"].sum() / tokens))
        return {"model": {"loss": loss, "perplexity": math.exp(loss)},
                "baseline": {"name": "unigram", "perplexity": baseline}}
    test = classification_metrics(scored["prediction"].to_numpy(), scored["label"].to_numpy(),
                                  info.num_classes)
    return {"model": test, "baseline": {"name": "majority class",
                                       **majority_baseline(info, scored["label"])}}


def majority_baseline(info: DataInfo, test_labels: pd.Series) -> dict[str, float]:
    """Always predict the training split's most frequent class."""
    train_counts = info.label_counts["train"]
    majority = info.labels.index(max(train_counts, key=train_counts.get))
    predictions = np.full(len(test_labels), majority)
    return classification_metrics(predictions, test_labels.to_numpy(), info.num_classes)
