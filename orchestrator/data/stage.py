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

from orchestrator.data.datasets import SPLITS, TokenizeBatch, assign_splits
from orchestrator.data.sources import configure_ray_data, explain_read_failure, read_source
from orchestrator.pretrained import Base, stage_base
from orchestrator.records import DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, SpecError, Task
from orchestrator.storage import Location
from orchestrator.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer

# Texts per tokenizer call. 4096 was no faster on the 8 MB bench corpus (Ray Data's cost per batch
# is small beside the encoding), and a batch's Encoding objects grow with it (long documents).
TOKENIZE_BATCH_ROWS = 1024


@dataclass
class _Scan:
    """Texts per split, labels per split and texts without a label, counted on the driver from
    the split texts."""

    texts: Counter = field(default_factory=Counter)
    labels: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    unlabelled: int = 0


def _blocks(refs: list[ray.ObjectRef]) -> Iterator[pa.Table]:
    """The materialized blocks one at a time (a block held in the local object store is read
    without a copy; nothing else is held on the driver)."""
    for ref in refs:
        yield ray.get(ref)


def _scan(refs: list[ray.ObjectRef]) -> _Scan:
    scan = _Scan()
    for block in _blocks(refs):
        columns = ["split", "label"] if "label" in block.column_names else ["split"]
        counts = block.select(columns).group_by(columns).aggregate([([], "count_all")])
        for row in counts.to_pylist():
            scan.texts[row["split"]] += row["count_all"]
            if "label" not in row:
                continue
            if row["label"] is None:
                scan.unlabelled += row["count_all"]
            else:
                scan.labels[row["split"]][row["label"]] += row["count_all"]
    return scan


def _training_texts(refs: list[ray.ObjectRef]) -> Iterator[list[str]]:
    """Batches of the training split's texts (the tokenizer trainer takes lists of strings)."""
    for block in _blocks(refs):
        yield block.filter(pc.equal(block["split"], "train"))["text"].to_pylist()


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


def _vocabulary(spec: JobSpec, base: Base | None, blocks: list[ray.ObjectRef],
                progress: Callable[[str], None]) -> _Vocabulary:
    """A BPE tokenizer trained on the training split, or the pretrained checkpoint's own."""
    if base is None:
        progress("training the tokenizer on the training split")
        tokenizer = train_tokenizer(_training_texts(blocks), spec.data.vocab_size)
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

    The source is read once: its texts, split and shuffled, are held in Ray's object store
    (spilled to disk when larger) for the counts, the tokenizer and the tokenization. Texts are
    shuffled before tokenizing and each tokenized batch's rows again: sources are often sorted
    (by topic, date, label), and validation on the first few batches of a sorted split measures
    one corner of the data.
    """
    run_dir = RunDir.at(run_dir)
    data = spec.data
    configure_ray_data()
    base = None
    if spec.model.pretrained is not None:  # checked before any data is read
        progress(f"checking {spec.model.pretrained} and copying it into the run directory")
        base = stage_base(spec, run_dir.base)
    progress("reading, splitting and shuffling the texts")
    source = read_source(data, check_columns=False)
    try:
        # One execution reads, splits and shuffles: no read of its own to learn the columns.
        texts = source.map_batches(
            assign_splits, batch_format="pandas",
            fn_kwargs={"seed": data.split_seed, "val_fraction": data.val_fraction,
                       "test_fraction": data.test_fraction},
        ).random_shuffle(seed=data.split_seed).materialize()
    except SpecError:
        raise
    except Exception as error:
        explain_read_failure(data, source, error)  # the SpecError that says why, if one does
        raise
    blocks = texts.to_arrow_refs()
    scan = _scan(blocks)
    _check_scan(spec, scan)
    vocab = _vocabulary(spec, base, blocks, progress)
    tokenizer = vocab.tokenizer
    with run_dir.tokenizer.local_folder() as folder:
        save_tokenizer(tokenizer, folder)

    labels = sorted(scan.labels["train"]) if spec.model.task == Task.CLASSIFIER else []
    context_length = data.block_size if spec.model.task == Task.LANGUAGE_MODEL else data.max_length
    run_dir.data.remove()
    run_dir.texts.remove()
    progress("writing the split texts (for the classical references)")
    texts.select_columns(["text", "label", "split"] if labels else ["text", "split"]) \
        .write_parquet(run_dir.texts.path, filesystem=run_dir.root.fs, partition_cols=["split"])
    progress("tokenizing and writing the splits")
    texts.map_batches(
        TokenizeBatch, batch_format="numpy", batch_size=TOKENIZE_BATCH_ROWS,
        compute=ray.data.ActorPoolStrategy(min_size=1),
        fn_constructor_kwargs={"tokenizer_json": tokenizer.to_str(),
                               "task": spec.model.task, "block_size": data.block_size,
                               "max_length": data.max_length, "labels": labels,
                               "seed": data.split_seed, "eos_id": vocab.eos_id,
                               "pad_id": vocab.pad_id},
    ).write_parquet(run_dir.data.path, filesystem=run_dir.root.fs, partition_cols=["split"])
    del texts, blocks  # the texts leave the object store

    progress("counting the rows written")
    rows = {split: _rows_written(run_dir.split(split)) for split in SPLITS}
    for split, count in rows.items():
        if count == 0:
            raise SpecError(
                f"data.path = {data.path!r}: the {split} split has {scan.texts[split]} texts but "
                f"no full block of data.block_size = {data.block_size} tokens; "
                "add data or lower data.block_size"
            )
    info = DataInfo(
        task=spec.model.task, vocab_size=vocab.size, eos_id=vocab.eos_id,
        pad_id=vocab.pad_id, context_length=context_length,
        labels=labels, texts=dict(scan.texts), rows=rows,
        label_counts={s: dict(c) for s, c in scan.labels.items() if c},
        special_tokens=vocab.special_tokens, architecture=vocab.architecture,
    )
    run_dir.data_info.write_text(json.dumps(asdict(info), indent=2))
    return info
