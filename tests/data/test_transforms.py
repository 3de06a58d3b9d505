"""Data transforms as plain functions: split, pack, pad, tokenize (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.data.datasets import (
    TokenizeBatch,
    assign_splits,
    pack_blocks,
    pad_or_truncate,
    split_of,
)
from orchestrator.spec import Task
from orchestrator.tokenizer import EOS, PAD, load_tokenizer, save_tokenizer, train_tokenizer


def test_split_is_deterministic_and_near_the_fractions(sample_rows):
    texts = [r["text"] for r in sample_rows]
    splits = [split_of(t, 0, 0.1, 0.1) for t in texts]
    assert splits == [split_of(t, 0, 0.1, 0.1) for t in texts]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.06 < share["val"] < 0.14 and 0.06 < share["test"] < 0.14
    assert splits != [split_of(t, 1, 0.1, 0.1) for t in texts]  # the seed matters


def test_assign_splits_drops_empty_texts_and_labels():
    batch = pd.DataFrame({"text": ["a b", "", None, "  ", "c"], "label": ["x", "y", "z", "w", None]})
    out = assign_splits(batch, 0, 0.1, 0.1)
    assert out["text"].tolist() == ["a b"] and set(out.columns) == {"text", "label", "split"}


def test_pack_blocks_uses_every_target_once():
    blocks = pack_blocks([[1, 2, 3], [4, 5]], eos_id=0, block_size=3)
    # stream 1 2 3 0 4 5 0 -> rows of 4 tokens with stride 3
    assert blocks.tolist() == [[1, 2, 3, 0], [0, 4, 5, 0]]
    assert pack_blocks([[1]], eos_id=0, block_size=8).shape == (0, 9)


def test_pad_or_truncate():
    out = pad_or_truncate([[1, 2, 3, 4], [5]], pad_id=9, length=3)
    assert out.tolist() == [[1, 2, 3], [5, 9, 9]]


def test_tokenizer_round_trip(tmp_path, sample_rows):
    tokenizer = train_tokenizer((r["text"] for r in sample_rows[:300]), vocab_size=400)
    assert tokenizer.get_vocab_size() == 400
    save_tokenizer(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "Return the event loop — naïve ünïcode too."
    assert loaded.decode(loaded.encode(text).ids) == text
    assert loaded.token_to_id(EOS) is not None and loaded.token_to_id(PAD) is not None


def test_tokenize_batch_for_both_families(sample_rows):
    tokenizer = train_tokenizer((r["text"] for r in sample_rows[:300]), vocab_size=300)
    batch = pd.DataFrame(sample_rows[:40])
    batch["split"] = ["train"] * 30 + ["val"] * 10
    lm = TokenizeBatch(tokenizer.to_str(), Task.LANGUAGE_MODEL, block_size=16, max_length=0)(batch)
    assert set(lm["split"]) == {"train", "val"}
    assert lm["ids"].shape == (len(lm["split"]), 17) and lm["ids"].dtype == np.int32
    labels = sorted({r["label"] for r in sample_rows[:30]})
    clf = TokenizeBatch(tokenizer.to_str(), Task.CLASSIFIER, 0, 24, labels=labels)(batch)
    assert clf["ids"].shape == (40, 24)
    assert ((clf["label"] >= -1) & (clf["label"] < len(labels))).all()
    known = batch["label"].isin(labels).to_numpy()
    assert (clf["label"][known] >= 0).all() and (clf["label"][~known] == -1).all()
    assert clf["split"].tolist() == batch["split"].tolist()


def test_tokenize_batch_takes_numpy_batches_and_shuffles_rows_reproducibly(sample_rows):
    """Ray Data hands the stage's callable dict-of-numpy batches; with a seed, the rows come out
    in a random order that is the same on a rerun, each row still matched to its label."""
    tokenizer = train_tokenizer((r["text"] for r in sample_rows[:300]), vocab_size=300)
    rows = sample_rows[:200]
    batch = {"text": np.array([r["text"] for r in rows], dtype=object),
             "label": np.array([r["label"] for r in rows], dtype=object),
             "split": np.array(["train"] * 200, dtype=object)}
    labels = sorted({r["label"] for r in rows})
    plain = TokenizeBatch(tokenizer.to_str(), Task.CLASSIFIER, 0, 24, labels=labels)(batch)
    shuffle = TokenizeBatch(tokenizer.to_str(), Task.CLASSIFIER, 0, 24, labels=labels, seed=3)
    shuffled = shuffle(batch)
    assert shuffled["ids"].tolist() != plain["ids"].tolist()
    assert {(tuple(i), label) for i, label in zip(shuffled["ids"].tolist(), shuffled["label"])} \
        == {(tuple(i), label) for i, label in zip(plain["ids"].tolist(), plain["label"])}
    again = shuffle(batch)
    assert all((again[k] == shuffled[k]).all() for k in shuffled)
    lm = TokenizeBatch(tokenizer.to_str(), Task.LANGUAGE_MODEL, 16, 0, seed=3)(batch)
    unshuffled = TokenizeBatch(tokenizer.to_str(), Task.LANGUAGE_MODEL, 16, 0)(batch)
    assert sorted(map(tuple, lm["ids"].tolist())) == sorted(map(tuple, unshuffled["ids"].tolist()))
    assert lm["ids"].tolist() != unshuffled["ids"].tolist()
