"""The classical references (no Ray): bits per byte, xz primed on the training text, TF-IDF +
logistic regression, and the verdict the report states."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from conftest import TASKS

from orchestrator.records import Evaluation, SplitEvaluation
from orchestrator.reference import (
    TFIDF_NAME,
    bits_per_byte,
    split_bytes,
    text_stats,
    tfidf_logistic_regression,
    xz_bits_per_byte,
)
from orchestrator.report import reference_verdict, render_markdown, summary
from orchestrator.spec import Task


def test_bits_per_byte_is_nats_per_token_times_tokens_per_byte_over_ln2():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 0.25) == pytest.approx(0.5 / math.log(2))


def test_text_stats_count_one_eos_token_and_one_newline_per_document():
    class Tokenizer:  # one token per word
        def encode_batch_fast(self, texts):
            return [type("E", (), {"ids": text.split()})() for text in texts]

    stats = text_stats(["a bc", "déf"], Tokenizer())
    assert stats["texts"] == 2 and stats["bytes"] == len("a bc\ndéf\n".encode()) == 10
    assert stats["tokens"] == 2 + 1 + 1 + 1 and stats["tokens_per_byte"] == pytest.approx(0.5)
    assert stats["digest"] == text_stats(["déf", "a bc"], Tokenizer())["digest"]
    assert stats["digest"] != text_stats(["a bc"], Tokenizer())["digest"]


def test_xz_primed_on_training_text_codes_what_it_has_seen_cheaply():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(400)]
    train = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    fresh = ["".join(rng.choice("klmnopqrstuvwxyz") for _ in range(72)) for _ in range(40)]
    figures = xz_bits_per_byte(train, {"seen": train[:40], "vocab": train[300 - 40:][::-1],
                                       "fresh": fresh})
    assert figures["seen"] < 0.5  # repeated text costs little more than its position
    assert figures["seen"] < figures["fresh"]
    assert 3.0 < figures["fresh"] < 6.0  # 16 letters: 4 bits each, and newlines
    assert split_bytes(["a", "b"]) == b"a\nb\n"


def test_tfidf_reference_fits_train_picks_c_on_val_and_scores_every_split():
    rng = random.Random(0)
    topics = {0: ["matrix", "eigen", "solve", "sparse"], 1: ["frame", "column", "index", "group"],
              2: ["tensor", "gradient", "module", "device"]}
    filler = ["the", "a", "of", "returns", "value", "given"]

    def texts(n):
        labels = np.array([rng.randrange(3) for _ in range(n)])
        return [" ".join(rng.choice(topics[y] + filler) for _ in range(8)) for y in labels], labels

    train, val, test = texts(300), texts(60), texts(60)
    unseen = (test[0] + ["the a of"], np.append(test[1], -1))  # a label unseen in training
    result = tfidf_logistic_regression(*train, {"val": val, "test": unseen}, num_classes=3)
    assert set(result) == {"val", "test"}
    assert result["val"]["name"] == TFIDF_NAME and result["val"]["accuracy"] > 0.9
    assert result["test"]["accuracy"] < 1.0  # the unseen label counts as wrong
    assert result["val"]["C"] == result["test"]["C"] and result["val"]["features"] > 10


def _report(family: str, winner: float, reference: float) -> dict:
    metric = "accuracy" if family == "classifier" else "bits_per_byte"
    name = "TF-IDF" if family == "classifier" else "xz"
    evaluation = Evaluation({"test": SplitEvaluation(
        model={metric: winner}, baseline={"name": "trivial", metric: 0.1},
        reference={"name": name, metric: reference}, text={}, rows=10)})
    return {"name": "r", "run_dir": "/runs/r", "task": Task(TASKS[family]), "metric": "val_loss",
            "data": {"texts": {}, "rows": {}, "vocab_size": 10},
            "winner": {"trial_id": "t1", "config": {}, "bundle": "/runs/r/winner"},
            "endpoint": None, "stage_seconds": {}, "trials": [], "sample_responses": [],
            "evaluation": evaluation.to_json(), "verdict": reference_verdict(evaluation, Task(TASKS[family]))}


@pytest.mark.parametrize("family,winner,reference,beats,by", [
    ("classifier", 0.80, 0.75, True, 0.05), ("classifier", 0.70, 0.75, False, -0.05),
    ("gpt", 1.5, 2.0, True, 0.5), ("gpt", 2.4, 2.0, False, -0.4)])
def test_the_report_says_whether_the_winner_beats_the_reference(family, winner, reference,
                                                                beats, by):
    report = _report(family, winner, reference)
    verdict = report["verdict"]
    assert verdict["beats_reference"] is beats and verdict["better_by"] == pytest.approx(by)
    assert verdict["text"].startswith("the winner beats" if beats else "the winner does NOT beat")
    assert verdict["text"] in render_markdown(report)
    assert f"verdict: {verdict['text']}" in summary(report)
    assert "reference" in summary(report).splitlines()[1]  # the split's line shows it too
