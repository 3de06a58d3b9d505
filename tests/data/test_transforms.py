"""Data transforms as plain functions: split, pack, pad, tokenize (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from orchestrator.data import datasets
from orchestrator.data.datasets import (
    TokenizeBatch,
    assign_splits,
    count_texts,
    in_sample,
    label_name,
    pack_blocks,
    pad_or_truncate,
    sample_training_texts,
    split_of,
    tokenize_batch,
)
from orchestrator.spec import Task
from orchestrator.tokenizer import (
    EOS,
    MAX_RUN,
    PAD,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


def test_split_is_deterministic_and_near_the_fractions(sample_rows):
    texts = [r["text"] for r in sample_rows]
    splits = [split_of(t, 0, 0.1, 0.1) for t in texts]
    assert splits == [split_of(t, 0, 0.1, 0.1) for t in texts]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.06 < share["val"] < 0.14 and 0.06 < share["test"] < 0.14
    assert splits != [split_of(t, 1, 0.1, 0.1) for t in texts]  # the seed matters


def test_assign_splits_drops_empty_texts_and_keeps_missing_labels_missing():
    """A text without a label is kept, its label missing, for the stage to count and refuse."""
    batch = pd.DataFrame({"text": ["a b", "", None, "  ", "c"], "label": ["x", "y", "z", "w", None]})
    out = assign_splits(batch, 0, 0.1, 0.1)
    assert out["text"].tolist() == ["a b", "c"] and set(out.columns) == {"text", "label", "split"}
    assert out["label"].iloc[0] == "x" and out["label"].isna().iloc[1]


def test_equal_numbers_are_one_class():
    """Readers type a column by the values they meet: 1 in one block is 1.0 in another."""
    batch = pd.DataFrame({"text": list("abcdef"), "label": [0, 1, 0.0, 1.0, "1", 0.5]})
    assert assign_splits(batch, 0, 0.1, 0.1)["label"].tolist() == ["0", "1", "0", "1", "1", "0.5"]
    floats = pd.DataFrame({"text": list("abc"), "label": [1.0, None, 2.0]})  # ints with a null
    assert assign_splits(floats, 0, 0.1, 0.1)["label"].tolist()[::2] == ["1", "2"]
    assert [label_name(v) for v in (np.int64(3), np.float32(2.5), True, "1.0", " x", None,
                                    float("nan"), b"caf\xc3\xa9")] \
        == ["3", "2.5", "True", "1.0", " x", None, None, "café"]


def test_tokenize_batch_maps_equal_numbers_to_one_label_id(sample_rows):
    tokenizer = train_tokenizer((r["text"] for r in sample_rows[:50]), vocab_size=300)
    batch = {"text": np.array(["a", "b", "c"], dtype=object),
             "label": np.array([1.0, 0, "2"], dtype=object),
             "split": np.array(["train"] * 3, dtype=object)}
    out = TokenizeBatch(tokenizer.to_str(), Task.CLASSIFIER, 0, 8, labels=["0", "1"])(batch)
    assert out["label"].tolist() == [1, 0, -1]


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


def test_tokenize_batch_as_a_function_builds_the_tokenizer_once_per_process(sample_rows):
    """The stage's tasks call tokenize_batch per batch: the same rows as TokenizeBatch, and the
    tokenizer is built once for every batch that follows."""
    tokenizer = train_tokenizer((r["text"] for r in sample_rows[:300]), vocab_size=300)
    batch = {"text": np.array([r["text"] for r in sample_rows[:50]], dtype=object),
             "split": np.array(["train", "val"] * 25, dtype=object)}
    settings = {"tokenizer_json": tokenizer.to_str(), "task": Task.LANGUAGE_MODEL,
                "block_size": 16, "max_length": 0, "labels": (), "seed": 3, "eos_id": 0,
                "pad_id": 1}
    first = tokenize_batch(batch, **settings)
    built = datasets._tokenize_batch.cache_info().misses
    second = tokenize_batch(batch, **settings)
    assert datasets._tokenize_batch.cache_info().misses == built
    expected = TokenizeBatch(tokenizer.to_str(), Task.LANGUAGE_MODEL, 16, 0, seed=3, eos_id=0,
                             pad_id=1)(batch)
    assert all((first[k] == expected[k]).all() and (second[k] == expected[k]).all()
               for k in expected)


def test_tokenizer_cuts_long_runs_and_encodes_as_it_trained(tmp_path, sample_rows):
    """BPE training is quadratic in a word's length: a line without whitespace is cut into
    pieces of MAX_RUN characters before the trainer sees it, and the saved tokenizer cuts the
    same way when it encodes. Prose is split as GPT-2's byte-level pre-tokenizer splits it."""
    from tokenizers import pre_tokenizers

    run = "ab" * 10_000 + " " * 200 + "7" * 300 + "é" * 100
    tokenizer = train_tokenizer([run], vocab_size=300)
    # At most MAX_RUN characters of text: é is two bytes, each one character in byte-level BPE.
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(run)]
    assert max(map(len, pieces)) == 2 * MAX_RUN
    assert max(map(len, tokenizer.get_vocab())) <= 2 * MAX_RUN
    save_tokenizer(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(run).ids == tokenizer.encode(run).ids
    assert loaded.decode(loaded.encode(run).ids) == run
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for row in sample_rows:
        assert tokenizer.pre_tokenizer.pre_tokenize_str(row["text"]) \
            == gpt2.pre_tokenize_str(row["text"])


def test_tokenizer_trains_on_a_megabyte_without_whitespace():
    """Before the cut, 300 KB of this took 35 s and 1 MB did not finish in 500 s."""
    tokenizer = train_tokenizer(["ab" * 500_000], vocab_size=512)
    assert len(tokenizer.encode("ab" * 5_000).ids) <= 2 * 10_000 // MAX_RUN


def test_count_texts_counts_texts_and_bytes_per_split_and_label():
    block = pa.table({"text": ["né", "ab", "c", "d"], "label": ["x", "x", None, "y"],
                      "split": ["train", "train", "train", "val"]})
    rows = sorted(count_texts(block).to_pylist(), key=lambda r: (r["split"], r["label"] or ""))
    assert rows == [{"split": "train", "label": None, "texts": 1, "bytes": 1},
                    {"split": "train", "label": "x", "texts": 2, "bytes": 5},
                    {"split": "val", "label": "y", "texts": 1, "bytes": 1}]
    assert count_texts(block.drop_columns(["label"])).column_names == ["split", "texts", "bytes"]


def test_the_tokenizer_sample_is_seeded_and_near_its_fraction(sample_rows):
    texts = [r["text"] for r in sample_rows]
    block = pa.table({"text": texts, "split": ["train"] * (len(texts) - 10) + ["val"] * 10})
    train = texts[:-10]
    assert sample_training_texts(block, 0, 1.0)["text"].to_pylist() == train  # all, in order
    sample = sample_training_texts(block, 0, 0.3)["text"].to_pylist()
    assert sample == [t for t in train if in_sample(t, 0, 0.3)]
    assert 0.2 < len(sample) / len(train) < 0.4
    assert sample == sample_training_texts(block, 0, 0.3)["text"].to_pylist()
    assert sample != sample_training_texts(block, 1, 0.3)["text"].to_pylist()  # the seed matters
