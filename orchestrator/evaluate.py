"""Batch inference with Ray Data, and the evaluate stage built on it.

`predict` runs a bundle over any dataset (`orchestrator predict`); `evaluate_bundle` scores the
validation and test splits against the trivial baselines (majority class; unigram model) and the
classical references the winner must beat (TF-IDF + logistic regression; xz primed on the
training text, in bits per byte: see reference.py). Both map batches on a pool of actors that
load the bundle once each, on GPU when the cluster has GPUs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.data
import torch
import torch.nn.functional as F

from orchestrator.bundle import read_spec_and_info
from orchestrator.cluster import cluster_capacity, inference_gpus
from orchestrator.data.sources import TEXT, configure_ray_data, read_source
from orchestrator.data.stage import read_split, read_splits
from orchestrator.inference.predictor import Predictor, SamplingParams
from orchestrator.records import DataInfo, Evaluation, SplitEvaluation
from orchestrator.reference import bits_per_byte, run_references
from orchestrator.rundir import RunDir
from orchestrator.spec import DataSpec, SpecError, Task
from orchestrator.storage import resolve
from orchestrator.train.objectives import classification_metrics
from orchestrator.weights.model import Bundle, load_bundle

INFERENCE_BATCH = 64
READ_CPUS = 1.0  # what Ray Data's file listing asks for (it takes no options)
MIN_SCORING_CPUS = 0.25


class ScoreBatch:
    """Batch inference on one actor: the bundle is loaded once, then scores batch after batch.

    LM rows yield their summed next-token negative log-likelihood under the model and under the
    unigram baseline, and their token count; classifier rows yield the predicted and true class.
    """

    def __init__(self, bundle_dir: str, unigram_log_probs: np.ndarray | None = None):
        self.bundle = load_on_device(bundle_dir)
        self.unigram_log_probs = unigram_log_probs

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = self.bundle.model
        ids = torch.as_tensor(np.stack(batch["ids"])).long().to(next(model.parameters()).device)
        if self.bundle.info.task == Task.LANGUAGE_MODEL:
            logits = model(ids[:, :-1]).float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            targets = ids[:, 1:].cpu().numpy()
            return {"nll": nll.sum(1).cpu().numpy(),
                    "unigram_nll": -self.unigram_log_probs[targets].sum(1),
                    "tokens": np.full(len(ids), ids.shape[1] - 1), "split": batch["split"]}
        return {"prediction": model(ids).argmax(-1).cpu().numpy(), "label": batch["label"],
                "split": batch["split"]}


class PredictBatch:
    """`orchestrator predict` on one actor: the same Predictor the service uses, so a batch
    prediction equals the online answer for the same input and settings."""

    def __init__(self, bundle_dir: str, max_tokens: int, temperature: float, seed: int | None):
        self.predictor = Predictor(load_on_device(bundle_dir))
        self.task = self.predictor.info.task
        self.params = SamplingParams(max_tokens, temperature, seed=seed)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch[TEXT].astype(str).tolist()
        if self.task == Task.CLASSIFIER:
            predictions = self.predictor.classify(texts)
            return batch.assign(label=[p["label"] for p in predictions],
                                score=[p["score"] for p in predictions],
                                scores=[p["scores"] for p in predictions])
        # A prompt too long for the context keeps its last tokens (the service refuses it).
        room = self.predictor.context_length - self.params.max_tokens
        prompts = [self.predictor.encode(text)[-room:] for text in texts]
        completions = self.predictor.complete(prompts, [self.params] * len(prompts))
        return batch.assign(completion=[c.text for c in completions],
                            finish_reason=[c.finish_reason for c in completions],
                            prompt_tokens=[len(p) for p in prompts],
                            completion_tokens=[c.completion_tokens for c in completions])


def load_on_device(bundle_dir: str) -> Bundle:
    """The bundle, with its model on the GPU when this actor has one (an int8 model is for CPUs
    and stays)."""
    bundle = load_bundle(bundle_dir)
    if torch.cuda.is_available() and not (bundle.compression
                                          and bundle.compression["variant"] == "int8"):
        bundle.model.to("cuda")
    return bundle


def scoring_cpus() -> float:
    """CPUs for each scoring actor: one, or less when less is free beside a CPU for the reads.
    A service on the cluster holds its replicas' CPUs for good, and Ray Data's file listing
    asks for a whole CPU: an actor that took the last one would leave the reads, and the stage,
    waiting forever (a 2-CPU head serving a 0.5-CPU replica did). With less than
    MIN_SCORING_CPUS beside that CPU, the actor reserves none: a quarter CPU held by the actor
    left 0.75 of the read's whole one on a 2-CPU head serving two 0.5-CPU replicas, for good."""
    spare = min(1.0, ray.available_resources().get("CPU", 0.0) - READ_CPUS)
    return spare if spare >= MIN_SCORING_CPUS else 0.0


def on_actor_pool(replicas: int, cpus: float = 1.0, gpus: int = 0) -> dict[str, Any]:
    """map_batches options for batch inference: a pool of actors, with `gpus` each."""
    return {"batch_size": INFERENCE_BATCH, "num_gpus": gpus, "num_cpus": cpus,
            "compute": ray.data.ActorPoolStrategy(size=replicas)}


def refuse_non_empty_output(output_path: str) -> None:
    """Predictions go to a new or empty folder: other files there would be counted as rows and
    could be lost."""
    if present := resolve(output_path).entries():
        raise SpecError(f"--output {output_path!r} is not empty ({', '.join(present[:5])}): "
                        "write predictions to a new or empty folder")


def predict(bundle_dir: str | Path, input_path: str, output_path: str,
            text_column: str | None = None, max_tokens: int = 32, temperature: float = 0.0,
            seed: int | None = None, replicas: int = 1, cpus: float = 1.0) -> int:
    """Run the bundle over every row of `input_path` and write parquet to `output_path` (a new
    or empty folder); the input's other columns are kept. Returns the number of rows written."""
    refuse_non_empty_output(output_path)
    spec, info = read_spec_and_info(bundle_dir)
    if info.task == Task.LANGUAGE_MODEL and not 1 <= max_tokens < info.context_length:
        raise ValueError(f"max_tokens must be in [1, {info.context_length - 1}] for this model's "
                         f"context of {info.context_length} tokens, not {max_tokens}")
    source = DataSpec(path=input_path, text_column=text_column or spec.data.text_column)
    predicted = read_source(source, keep_other_columns=True).map_batches(
        PredictBatch, batch_format="pandas",
        **on_actor_pool(replicas, cpus, inference_gpus(cluster_capacity())),
        fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "max_tokens": max_tokens,
                               "temperature": temperature, "seed": seed})
    predicted.write_parquet(output_path)
    configure_ray_data()
    return ray.data.read_parquet(output_path).count()


def _unigram_counts(run_dir: RunDir, vocab_size: int) -> np.ndarray:
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


def evaluate_bundle(run_dir: RunDir | str, bundle_dir: str, info: DataInfo,
                    splits: tuple[str, ...] = ("val", "test"), replicas: int = 1,
                    gpus: int = 0, known: dict[str, SplitEvaluation] | None = None) -> Evaluation:
    """Each split's evaluation (records.SplitEvaluation): the bundle's metrics beside the
    trivial baseline's and the classical reference's, and a classifier's confusion matrix. A
    language model's figures include bits per byte.

    All splits are scored in one Ray Data pass; rows carry their split from the directory name.
    The references run beside it, as one Ray task, on the texts of the same splits. `known`:
    these splits evaluated for another model of the run (the compress stage's winner), whose
    reference and text statistics, which depend on the data alone, are taken as they are
    rather than fitted again.
    """
    run_dir = RunDir.at(run_dir)
    cpus = scoring_cpus()  # before the references take theirs
    pending = (None if known else
               ray.remote(num_cpus=1)(run_references).remote(run_dir.uri, info, splits))
    log_probs = (unigram_log_probs(_unigram_counts(run_dir, info.vocab_size))
                 if info.task == Task.LANGUAGE_MODEL else None)
    scored = read_splits(run_dir, splits).map_batches(
        ScoreBatch, fn_constructor_kwargs={"bundle_dir": str(bundle_dir),
                                           "unigram_log_probs": log_probs},
        **on_actor_pool(replicas, cpus, gpus=gpus),
    ).to_pandas()
    references = ({split: {"reference": known[split].reference, "text": known[split].text}
                   for split in splits} if known else ray.get(pending))
    return Evaluation({split: _split_metrics(scored[scored["split"] == split], info,
                                             references[split])
                       for split in splits})


def _split_metrics(scored: pd.DataFrame, info: DataInfo,
                   reference: dict[str, Any]) -> SplitEvaluation:
    common = {"reference": reference["reference"], "text": reference["text"],
              "rows": len(scored)}
    if info.task == Task.LANGUAGE_MODEL:
        tokens = scored["tokens"].sum()
        loss = float(scored["nll"].sum() / tokens)
        unigram = float(scored["unigram_nll"].sum() / tokens)
        per_byte = reference["text"]["tokens_per_byte"]
        return SplitEvaluation(
            model={"loss": loss, "perplexity": math.exp(loss),
                   "bits_per_byte": bits_per_byte(loss, per_byte)},
            baseline={"name": "unigram", "perplexity": math.exp(unigram),
                      "bits_per_byte": bits_per_byte(unigram, per_byte)}, **common)
    predictions, labels = scored["prediction"].to_numpy(), scored["label"].to_numpy()
    test = classification_metrics(predictions, labels, info.num_classes)
    return SplitEvaluation(
        model=test, baseline={"name": "majority class", **majority_baseline(info, scored["label"])},
        confusion_matrix=confusion_matrix(predictions, labels, info.num_classes).tolist(),
        **common)


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]. Rows whose label was unseen in training (-1) have no row of their
    own and are left out: the matrix only shows confusions between classes the model knows."""
    known = (labels >= 0) & (labels < num_classes)
    cells = labels[known].astype(np.int64) * num_classes + predictions[known].astype(np.int64)
    return np.bincount(cells, minlength=num_classes**2).reshape(num_classes, num_classes)


def majority_baseline(info: DataInfo, test_labels: pd.Series) -> dict[str, float]:
    """Always predict the training split's most frequent class."""
    train_counts = info.label_counts["train"]
    majority = info.labels.index(max(train_counts, key=train_counts.get))
    predictions = np.full(len(test_labels), majority)
    return classification_metrics(predictions, test_labels.to_numpy(), info.num_classes)
