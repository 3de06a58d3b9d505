"""Classical references: what a model from this job must beat to have earned its keep.

Classifier: TF-IDF over word uni- and bigrams with logistic regression (scikit-learn), trained on
the run's training split and scored on its validation and test splits, the same texts the winner
is scored on. Its regularisation C is picked on the validation split, as the sweep picks its
winner.

Language model: bits per byte, the tokenizer-independent measure (a model's loss in nats per
token × tokens per byte / ln 2), next to a compressor primed on the training text: xz (LZMA,
preset 9e) codes the training text, then the training text followed by the split's text; the
difference is what the split's text costs given the training text.

A split's text is its documents, each followed by one newline (the byte that stands for the
EOS token the language model reads between documents); its tokens are the tokenizer's tokens of
each document plus that EOS.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import time
from typing import Any

import numpy as np

from orchestrator.spec import Task

TFIDF_NAME = "TF-IDF (word 1-2-grams) + logistic regression"
C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
XZ_NAME = "xz -9e primed on the training text"
XZ_PRESET = 9 | lzma.PRESET_EXTREME
XZ_WINDOW = 64 * 2**20  # preset 9's dictionary: older training text is out of its reach


def bits_per_byte(loss_nats: float, tokens_per_byte: float) -> float:
    """Nats per token to bits per byte of the same text."""
    return loss_nats * tokens_per_byte / math.log(2)


def split_bytes(texts: list[str]) -> bytes:
    return "".join(text + "\n" for text in texts).encode("utf-8")


def text_stats(texts: list[str], tokenizer: Any) -> dict[str, Any]:
    """Texts, bytes and tokens of a split (see the module docstring), and a digest of its texts
    that tells which texts they were."""
    tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(texts)) if tokenizer else 0
    size = len(split_bytes(texts))
    digest = hashlib.sha1("\n".join(sorted(texts)).encode("utf-8")).hexdigest()[:16]
    return {"texts": len(texts), "bytes": size, "tokens": tokens,
            "tokens_per_byte": tokens / size if size else 0.0, "digest": digest}


def xz_bits_per_byte(train: list[str], splits: dict[str, list[str]]) -> dict[str, float]:
    """Each split's bits per byte under xz primed on the training text (its last 32 MiB, so that
    it and the split fit xz's 64 MiB window together)."""
    prime = split_bytes(train)[-XZ_WINDOW // 2:]
    base = len(lzma.compress(prime, preset=XZ_PRESET))
    out = {}
    for split, texts in splits.items():
        text = split_bytes(texts)
        out[split] = 8 * (len(lzma.compress(prime + text, preset=XZ_PRESET)) - base) / len(text)
    return out


def tfidf_logistic_regression(train_texts: list[str], train_labels: np.ndarray,
                              splits: dict[str, tuple[list[str], np.ndarray]],
                              num_classes: int) -> dict[str, dict[str, Any]]:
    """Fit on the training texts (labels are class indices; -1, a label unseen in training, is
    left out of the fit and counts as wrong when scored), pick C on 'val', score every split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from orchestrator.train.objectives import classification_metrics

    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    known = train_labels >= 0
    features = vectorizer.fit_transform([t for t, k in zip(train_texts, known) if k])
    labels = train_labels[known]
    encoded = {split: (vectorizer.transform(texts), y) for split, (texts, y) in splits.items()}
    pick_on = "val" if "val" in encoded else next(iter(encoded))
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, solver="saga", max_iter=1000,
                                   random_state=0).fit(features, labels)
        x, y = encoded[pick_on]
        accuracy = float(np.mean(model.predict(x) == y)) if len(y) else 0.0
        if best is None or accuracy > best[0]:
            best = (accuracy, c, model)
    _, c, model = best
    seconds = time.perf_counter() - started
    return {split: {"name": TFIDF_NAME, **classification_metrics(model.predict(x), y, num_classes),
                    "C": c, "fit_s": round(seconds, 1), "features": features.shape[1]}
            for split, (x, y) in encoded.items()}


def run_references(run_dir: str, info: Any,
                   splits: tuple[str, ...] = ("val", "test")) -> dict[str, dict[str, Any]]:
    """For each split: {'reference': the classical reference's figures, 'text': text_stats}, from
    the texts the data stage wrote for this run (so on exactly the winner's splits)."""
    from tokenizers import Tokenizer

    from orchestrator.data.stage import read_split_texts
    from orchestrator.rundir import RunDir
    from orchestrator.tokenizer import TOKENIZER_FILE

    tables = {split: read_split_texts(run_dir, split) for split in ("train", *splits)}
    texts = {split: table.column("text").to_pylist() for split, table in tables.items()}
    tokenizer = (Tokenizer.from_str(RunDir.at(run_dir).tokenizer.join(TOKENIZER_FILE).read_text())
                 if info.task == Task.LANGUAGE_MODEL else None)
    stats = {split: text_stats(texts[split], tokenizer) for split in splits}
    if info.task == Task.LANGUAGE_MODEL:
        xz = xz_bits_per_byte(texts["train"], {split: texts[split] for split in splits})
        references = {split: {"name": XZ_NAME, "bits_per_byte": xz[split]} for split in splits}
    else:
        index = {label: i for i, label in enumerate(info.labels)}

        def label_ids(split: str) -> np.ndarray:
            return np.array([index.get(str(v), -1) for v in tables[split].column("label")
                             .to_pylist()], dtype=np.int64)

        references = tfidf_logistic_regression(
            texts["train"], label_ids("train"),
            {split: (texts[split], label_ids(split)) for split in splits}, info.num_classes)
    return {split: {"reference": references[split], "text": stats[split]} for split in splits}
