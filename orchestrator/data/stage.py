"""Run the data stage on Ray Data without materializing the dataset on the driver."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import ray
import ray.data
from tokenizers import Tokenizer

from orchestrator.data.datasets import (
    SPLITS,
    assign_splits,
    count_texts,
    sample_training_texts,
    tokenize_batch,
)
from orchestrator.data.sources import configure_ray_data, explain_read_failure, read_source
from orchestrator.pretrained import Base, stage_base
from orchestrator.records import DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import DataSpec, JobSpec, SpecError, Task
from orchestrator.storage import Location
from orchestrator.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer

# Texts per tokenizer call. 4096 was no faster on the 8 MB bench corpus (Ray Data's cost per batch
# is small beside the encoding), and a batch's Encoding objects grow with it (long documents).
TOKENIZE_BATCH_ROWS = 1024
# Texts per block of the split texts: the unit whose order is shuffled. Blocks far above Ray's
# 100 KB inline limit (8192 texts of 50 bytes are 400 KB): a smaller object returned by a task is
# held in its owner's memory, the driver's, which then grows with the corpus (Ray Data's
# random_shuffle did so: +1.25 GB of driver memory for 256 MB of text).
TEXTS_PER_BLOCK = 8192


@dataclass
class _Scan:
    """Texts and bytes of text per split, labels per split and texts without a label, summed on
    the driver from per-block counts (datasets.count_texts)."""

    texts: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    labels: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    unlabelled: int = 0


def _scan(texts: ray.data.Dataset) -> _Scan:
    scan = _Scan()
    for row in texts.map_batches(count_texts, batch_format="pyarrow", batch_size=None).iter_rows():
        scan.texts[row["split"]] += row["texts"]
        scan.bytes[row["split"]] += row["bytes"]
        if "label" not in row:
            continue
        if row["label"] is None:
            scan.unlabelled += row["texts"]
        else:
            scan.labels[row["split"]][row["label"]] += row["texts"]
    return scan


@ray.remote(num_cpus=1)
def _train_on_blocks(blocks: list[ray.ObjectRef], vocab_size: int, seed: int,
                     fraction: float) -> tuple[str, int, int]:
    """(tokenizer JSON, texts, bytes) of a tokenizer trained on the sample of the split texts'
    blocks (datasets.sample_training_texts), read one at a time in this task: neither the sample
    nor the trainer's counts live in the driver."""
    texts, size = 0, 0

    def batches() -> Iterator[list[str]]:
        nonlocal texts, size
        for ref in blocks:
            column = sample_training_texts(ray.get(ref), seed, fraction)["text"]
            texts, size = texts + len(column), size + pc.sum(pc.binary_length(column)).as_py()
            yield column.to_pylist()

    tokenizer = train_tokenizer(batches(), vocab_size)
    return tokenizer.to_str(), texts, size


def _start_training(spec: JobSpec, texts: ray.data.Dataset, scan: _Scan,
                    progress: Callable[[str], None]) -> ray.ObjectRef:
    """Start training a BPE tokenizer on a seeded sample of the training split of at most
    data.tokenizer_sample_mb (all of it when smaller), in a task of one CPU: the stage writes
    the split texts on the others meanwhile. ray.get the reference for _train_on_blocks'
    result."""
    data, train_mb = spec.data, scan.bytes["train"] / 1e6
    fraction = data.tokenizer_sample_mb / train_mb if train_mb else 1.0
    what = ("the training split" if fraction >= 1 else
            f"a {data.tokenizer_sample_mb:g} MB sample of the training split")
    progress(f"training the tokenizer on {what} ({train_mb:.3g} MB)")
    return _train_on_blocks.remote(texts.to_arrow_refs(), data.vocab_size, data.split_seed,
                                   fraction)


def _check_scan(spec: JobSpec, scan: _Scan) -> None:
    total = sum(scan.texts.values())
    if spec.model.task == Task.CLASSIFIER and scan.unlabelled:
        raise SpecError(
            f"data.label_column = {spec.data.label_column!r}: {scan.unlabelled} of the {total} "
            f"texts in {spec.data.path!r} have no label (null); label them or remove them"
        )
    if total == 0:
        raise SpecError(f"data.path = {spec.data.path!r}: the dataset has no non-empty texts "
                        f"in column {spec.data.text_column!r}")
    for split in SPLITS:
        if scan.texts[split] == 0:
            raise SpecError(
                f"data.path = {spec.data.path!r}: {total} texts leave the {split} split empty; "
                "add data or raise data.val_fraction / data.test_fraction"
            )
    if spec.model.task == Task.CLASSIFIER and len(scan.labels["train"]) < 2:
        found = ", ".join(map(repr, scan.labels["train"])) or "none"
        raise SpecError(
            f"data.label_column = {spec.data.label_column!r} has a single class in the training "
            f"split ({found}); a classifier needs at least two"
        )


def read_split_texts(run_dir: RunDir | str, split: str) -> pa.Table:
    """One split's `text` (and `label`) columns, as the data stage wrote them: what the classical
    references of the evaluate stage train and score on."""
    location = RunDir.at(run_dir).split_texts(split)
    return pa_dataset.dataset(location.path, filesystem=location.fs, format="parquet").to_table()


def read_split(run_dir: RunDir | str, split: str) -> ray.data.Dataset:
    """The tokenized rows of one split, as written by the data stage."""
    configure_ray_data()
    location = RunDir.at(run_dir).split(split)
    return ray.data.read_parquet(location.path, filesystem=location.fs, partitioning=None)


def read_splits(run_dir: RunDir | str, splits: tuple[str, ...]) -> ray.data.Dataset:
    """Rows of several splits, each with its `split` column (from the directory name)."""
    configure_ray_data()
    run_dir = RunDir.at(run_dir)
    return ray.data.read_parquet([run_dir.split(s).path for s in splits],
                                 filesystem=run_dir.root.fs)


def load_data_info(run_dir: RunDir | str) -> DataInfo:
    return DataInfo.from_dict(json.loads(RunDir.at(run_dir).data_info.read_text()))


def _rows_written(location: Location) -> int:
    """Rows in a written split, from the parquet footers alone (no data is read)."""
    if not location.exists():
        return 0
    return pa_dataset.dataset(location.path, filesystem=location.fs, format="parquet").count_rows()


@dataclass
class _Vocabulary:
    """The tokenizer the run uses and what DataInfo records of it."""

    tokenizer: Tokenizer
    size: int  # the model's embedding rows
    eos_id: int
    pad_id: int
    special_tokens: dict[str, str]
    architecture: dict[str, Any] | None = None


def _vocabulary(spec: JobSpec, base: Base | None, training: ray.ObjectRef | None,
                progress: Callable[[str], None]) -> _Vocabulary:
    """The BPE tokenizer `training` (_start_training) trained, or the pretrained checkpoint's."""
    if base is None:
        tokenizer_json, count, size = ray.get(training)
        progress(f"tokenizer trained on {count} texts, {size / 1e6:.3g} MB")
        tokenizer = Tokenizer.from_str(tokenizer_json)
        return _Vocabulary(tokenizer, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS),
                           tokenizer.token_to_id(PAD), {"eos_token": EOS, "bos_token": EOS,
                                                        "pad_token": PAD})
    tokenizer = base.tokenizer.backend_tokenizer
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return _Vocabulary(tokenizer, base.config["vocab_size"], base.eos_id, base.pad_id,
                       base.special_tokens, base.config)


def prepare_data(spec: JobSpec, run_dir: RunDir | str,
                 progress: Callable[[str], None] = lambda _: None) -> DataInfo:
    """Validate, split, train the tokenizer, tokenize and write the splits; return DataInfo.

    The source is read once: its texts, split, are held in Ray's object store (spilled to disk
    when larger) for the counts, the tokenizer's sample and the tokenization, all run in Ray
    tasks: the driver holds per-block counts and object references, nothing that grows with the
    corpus. The tokenizer trains in a task of one CPU while the split texts are written on the
    others; each block is then tokenized and written in one task. Sources are often sorted (by topic, date, label), and validation on the first few
    batches of a sorted split measures one corner of the data, so the order is shuffled in two
    steps that never move the whole corpus: blocks of TEXTS_PER_BLOCK consecutive texts in a
    seeded random order, and each tokenized batch's rows (TOKENIZE_BATCH_ROWS texts) permuted.
    """
    run_dir = RunDir.at(run_dir)
    data = spec.data
    configure_ray_data()
    base = None
    if spec.model.pretrained is not None:  # checked before any data is read
        progress(f"checking {spec.model.pretrained} and copying it into the run directory")
        base = stage_base(spec, run_dir.base)
    progress("reading, splitting and counting the texts")
    source = read_source(data, check_columns=False)
    try:
        # One execution reads and splits: no read of its own to learn the columns.
        texts = source.map_batches(
            assign_splits, batch_format="pandas",
            fn_kwargs={"seed": data.split_seed, "val_fraction": data.val_fraction,
                       "test_fraction": data.test_fraction},
        ).repartition(target_num_rows_per_block=TEXTS_PER_BLOCK) \
            .randomize_block_order(seed=data.split_seed).materialize()
    except SpecError:
        raise
    except Exception as error:
        explain_read_failure(data, source, error)  # the SpecError that says why, if one does
        raise
    scan = _scan(texts)
    _check_scan(spec, scan)
    training = _start_training(spec, texts, scan, progress) if base is None else None
    labels = sorted(scan.labels["train"]) if spec.model.task == Task.CLASSIFIER else []
    try:
        _write_texts(run_dir, texts, labels, progress)
        vocab = _vocabulary(spec, base, training, progress)
        with run_dir.tokenizer.local_folder() as folder:
            save_tokenizer(vocab.tokenizer, folder)
        rows = _write_splits(spec, run_dir, texts, vocab, labels, progress)
        _check_rows(data, scan, rows)
    except BaseException:
        run_dir.data.remove()  # nothing half-written is left to look like a split
        run_dir.texts.remove()
        raise
    finally:
        del texts  # the texts leave the object store
    context_length = data.block_size if spec.model.task == Task.LANGUAGE_MODEL else data.max_length
    info = DataInfo(
        task=spec.model.task, vocab_size=vocab.size, eos_id=vocab.eos_id,
        pad_id=vocab.pad_id, context_length=context_length,
        labels=labels, texts=dict(scan.texts), rows=rows,
        label_counts={s: dict(c) for s, c in scan.labels.items() if c},
        special_tokens=vocab.special_tokens, architecture=vocab.architecture,
    )
    run_dir.data_info.write_text(json.dumps(asdict(info), indent=2))
    return info


def _check_rows(data: DataSpec, scan: _Scan, rows: dict[str, int]) -> None:
    for split, count in rows.items():
        if count == 0:
            raise SpecError(
                f"data.path = {data.path!r}: the {split} split has {scan.texts[split]} texts but "
                f"no full block of data.block_size = {data.block_size} tokens; "
                "add data or lower data.block_size"
            )


def _write_texts(run_dir: RunDir, texts: ray.data.Dataset, labels: list[str],
                 progress: Callable[[str], None]) -> None:
    """Write the split texts (what the classical references read), streamed by Ray Data."""
    run_dir.data.remove()
    run_dir.texts.remove()
    progress("writing the split texts (for the classical references)")
    texts.select_columns(["text", "label", "split"] if labels else ["text", "split"]) \
        .write_parquet(run_dir.texts.path, filesystem=run_dir.root.fs, partition_cols=["split"])


def _write_splits(spec: JobSpec, run_dir: RunDir, texts: ray.data.Dataset, vocab: _Vocabulary,
                  labels: list[str], progress: Callable[[str], None]) -> dict[str, int]:
    """Tokenize and write the splits, each block in one task that reads, tokenizes and writes
    it (streamed by Ray Data); return the rows written per split."""
    data = spec.data
    progress("tokenizing and writing the splits")
    texts.map_batches(
        tokenize_batch, batch_format="numpy", batch_size=TOKENIZE_BATCH_ROWS,
        fn_kwargs={"tokenizer_json": vocab.tokenizer.to_str(), "task": spec.model.task,
                   "block_size": data.block_size, "max_length": data.max_length,
                   "labels": tuple(labels), "seed": data.split_seed, "eos_id": vocab.eos_id,
                   "pad_id": vocab.pad_id},
    ).write_parquet(run_dir.data.path, filesystem=run_dir.root.fs, partition_cols=["split"])
    progress("counting the rows written")
    return {split: _rows_written(run_dir.split(split)) for split in SPLITS}
