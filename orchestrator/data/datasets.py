"""Split, tokenize and pack: the transforms the data stage runs with `map_batches`.

Each transform is a plain function or class on a pandas/numpy batch, so it is unit-tested
without Ray and runs unchanged inside Ray Data workers.
"""

from __future__ import annotations

import functools
import math
import numbers
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from orchestrator.spec import Task
from orchestrator.tokenizer import EOS, PAD

SPLITS = ("train", "val", "test")


def split_of(text: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A split that depends only on the text and the seed: stable across runs and partitionings,
    and duplicate texts always land in the same split, so no test text leaks into training."""
    bucket = zlib.crc32(f"{seed}:{text}".encode()) / 2**32
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def label_name(value: Any) -> str | None:
    """The class a label names, None for a missing one.

    Readers type a column by the values they meet, so one file or block holds 1 where another
    holds 1.0: numbers that are equal name one class ("1"; 0.5 stays "0.5"), text stays as
    written, booleans are "True" and "False". A CSV column that holds a byte that is not UTF-8 is
    read as bytes: decoding it raises UnicodeDecodeError, which the driver explains
    (sources.explain_read_failure)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return None
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
    return str(value)


def assign_splits(batch: pd.DataFrame, seed: int, val_fraction: float,
                  test_fraction: float) -> pd.DataFrame:
    """Drop empty texts, name the labels (label_name: a missing one stays missing, for the
    stage to count and refuse) and add the `split` column."""
    batch = batch[batch["text"].notna()]
    batch = batch[batch["text"].astype(str).str.strip() != ""].copy()
    batch["text"] = batch["text"].astype(str)
    if "label" in batch:
        # Typed: a block whose labels are all missing still writes a string column.
        batch["label"] = pd.Series([label_name(v) for v in batch["label"]], index=batch.index,
                                   dtype="string")
    batch["split"] = [split_of(t, seed, val_fraction, test_fraction) for t in batch["text"]]
    return batch


def count_texts(block: pa.Table) -> pa.Table:
    """Texts and bytes of text per split (and label) of one block: the stage sums these small
    tables, so no text crosses to the driver to be counted."""
    keys = ["split", "label"] if "label" in block.column_names else ["split"]
    sized = block.select(keys).append_column("bytes", pc.binary_length(block["text"]))
    counts = sized.group_by(keys).aggregate([([], "count_all"), ("bytes", "sum")])
    return counts.rename_columns({"count_all": "texts", "bytes_sum": "bytes"})


def in_sample(text: str, seed: int, fraction: float) -> bool:
    """Whether the tokenizer's sample keeps `text`: a hash of the text and the seed (salted apart
    from split_of's), so the sample is the same on every run and partitioning."""
    return fraction >= 1 or zlib.crc32(f"sample:{seed}:{text}".encode()) / 2**32 < fraction


def sample_training_texts(block: pa.Table, seed: int, fraction: float) -> pa.Table:
    """The training split's texts of one block that the tokenizer's sample keeps (all at
    fraction >= 1)."""
    train = block.filter(pc.equal(block["split"], "train")).select(["text"])
    if fraction >= 1:
        return train
    keep = [in_sample(text, seed, fraction) for text in train["text"].to_pylist()]
    return train.filter(pa.array(keep, type=pa.bool_()))


def pack_blocks(token_lists: list[list[int]], eos_id: int, block_size: int) -> np.ndarray:
    """Concatenate documents (each ended by EOS) and cut the stream into rows of block_size + 1
    tokens with stride block_size, so each token is a target exactly once. The tail is dropped."""
    flat: list[int] = []
    for tokens in token_lists:  # list.extend: a third less CPU than a generator of tokens
        flat += tokens
        flat.append(eos_id)
    stream = np.array(flat, dtype=np.int32)
    n_blocks = (len(stream) - 1) // block_size
    if n_blocks <= 0:
        return np.empty((0, block_size + 1), dtype=np.int32)
    starts = np.arange(n_blocks) * block_size
    return stream[starts[:, None] + np.arange(block_size + 1)]


def pad_or_truncate(token_lists: list[list[int]], pad_id: int, length: int) -> np.ndarray:
    out = np.full((len(token_lists), length), pad_id, dtype=np.int32)
    for row, tokens in enumerate(token_lists):
        tokens = tokens[:length]
        out[row, : len(tokens)] = tokens
    return out


class TokenizeBatch:
    """Tokenize a batch once per worker-held tokenizer (never rebuilt per batch).

    Language model: rows become packed blocks (`ids`, one more token than block_size).
    Classifier: rows become padded `ids` and an integer `label` from the training split's labels.
    The batch is a pandas DataFrame or a dict of numpy arrays (Ray Data's "numpy" format); the
    result is a dict of numpy arrays, `ids` one 2-D array (no per-row objects to convert).

    With `seed` set, the output rows are put in a random order, seeded by the seed and the
    batch's first text (so a rerun writes the same rows): packed blocks cut from one document
    stream would otherwise sit next to their neighbours.
    """

    def __init__(self, tokenizer_json: str, task: Task, block_size: int, max_length: int,
                 labels: list[str] | None = None, seed: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None):
        """eos_id / pad_id: a pretrained tokenizer's (ours: the ids of EOS and PAD)."""
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.eos_id = self.tokenizer.token_to_id(EOS) if eos_id is None else eos_id
        self.pad_id = self.tokenizer.token_to_id(PAD) if pad_id is None else pad_id
        self.task = task
        self.block_size = block_size
        self.max_length = max_length
        self.label_ids = {label: i for i, label in enumerate(labels or [])}
        self.seed = seed

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts)]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        splits = np.asarray(batch["split"], dtype=object)
        if self.task == Task.LANGUAGE_MODEL:
            ids_parts, split_parts = [], []
            for split in sorted(set(splits)):
                group = [t for t, s in zip(texts, splits) if s == split]
                blocks = pack_blocks(self._encode(group), self.eos_id, self.block_size)
                ids_parts.append(blocks)
                split_parts.append(np.full(len(blocks), split, dtype=object))
            out = {"ids": np.concatenate(ids_parts) if ids_parts
                   else np.empty((0, self.block_size + 1), dtype=np.int32),
                   "split": np.concatenate(split_parts) if split_parts
                   else np.empty(0, dtype=object)}
        else:
            # A label unseen in training cannot be predicted; -1 marks it so metrics count it
            # wrong.
            label_ids = (self.label_ids.get(label_name(v), -1) for v in batch["label"])
            out = {"ids": pad_or_truncate(self._encode(texts), self.pad_id, self.max_length),
                   "label": np.fromiter(label_ids, dtype=np.int64, count=len(texts)),
                   "split": splits}
        if self.seed is not None and texts:
            rng = np.random.default_rng([self.seed, zlib.crc32(texts[0].encode())])
            order = rng.permutation(len(out["ids"]))
            out = {name: column[order] for name, column in out.items()}
        return out


@functools.lru_cache(maxsize=1)
def _tokenize_batch(*settings: Any) -> TokenizeBatch:
    return TokenizeBatch(*settings)


def tokenize_batch(batch: Mapping[str, Any], tokenizer_json: str, task: Task, block_size: int,
                   max_length: int, labels: tuple[str, ...], seed: int | None, eos_id: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """TokenizeBatch as a function, for Ray Data's tasks: a task fuses with the write that
    follows (an actor pool's write takes a CPU of its own), and each worker process builds the
    tokenizer once for all the blocks it takes."""
    return _tokenize_batch(tokenizer_json, task, block_size, max_length, labels, seed, eos_id,
                           pad_id)(batch)
