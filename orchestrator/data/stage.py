"""Run the data stage on Ray Data without materializing the dataset on the driver."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.data

from orchestrator.data.datasets import SPLITS, TokenizeBatch, assign_splits
from orchestrator.data.sources import read_source
from orchestrator.data.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer
from orchestrator.spec import JobSpec, SpecError

META_FILE = "meta.json"
SCAN_BATCH_ROWS = 1024


@dataclass
class DataInfo:
    """What later stages need to know about the prepared data."""

    family: str
    vocab_size: int
    eos_id: int
    pad_id: int
    seq_len: int
    labels: list[str] = field(default_factory=list)
    texts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass
class _Scan:
    """Counts gathered while the tokenizer trains, in the same single pass over the data."""

    texts: Counter = field(default_factory=Counter)
    labels: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})


def _training_texts(ds: ray.data.Dataset, scan: _Scan) -> Iterator[str]:
    for batch in ds.iter_batches(batch_size=SCAN_BATCH_ROWS, batch_format="pandas"):
        scan.texts.update(batch["split"].tolist())
        if "label" in batch:
            for split, label in zip(batch["split"], batch["label"]):
                scan.labels[split][label] += 1
        yield from batch.loc[batch["split"] == "train", "text"]


def _check_scan(spec: JobSpec, scan: _Scan) -> None:
    total = sum(scan.texts.values())
    if total == 0:
        raise SpecError(f"data.path = {spec.data.path!r}: the dataset has no non-empty texts "
                        f"in column {spec.data.text_column!r}")
    for split in SPLITS:
        if scan.texts[split] == 0:
            raise SpecError(
                f"data.path = {spec.data.path!r}: {total} texts leave the {split} split empty; "
                "add data or raise data.val_fraction / data.test_fraction"
            )
    if spec.model.family == "classifier" and len(scan.labels["train"]) < 2:
        found = ", ".join(map(repr, scan.labels["train"])) or "none"
        raise SpecError(
            f"data.label_column = {spec.data.label_column!r} has a single class in the training "
            f"split ({found}); a classifier needs at least two"
        )


def quiet_progress() -> None:
    """Ray Data's progress bars flood job logs; our own progress lines say what runs."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False


def read_split(run_dir: str | Path, split: str) -> ray.data.Dataset:
    """The tokenized rows of one split, as written by the data stage."""
    quiet_progress()
    return ray.data.read_parquet(str(Path(run_dir) / "data" / f"split={split}"),
                                 partitioning=None)


def read_splits(run_dir: str | Path, splits: tuple[str, ...]) -> ray.data.Dataset:
    """Rows of several splits, each with its `split` column (from the directory name)."""
    quiet_progress()
    return ray.data.read_parquet([str(Path(run_dir) / "data" / f"split={s}") for s in splits])


def load_data_info(run_dir: str | Path) -> DataInfo:
    return DataInfo(**json.loads((Path(run_dir) / "data" / META_FILE).read_text()))


def prepare_data(spec: JobSpec, run_dir: str | Path,
                 progress: Callable[[str], None] = lambda _: None) -> DataInfo:
    """Validate, split, train the tokenizer, tokenize and write the splits; return DataInfo.

    Rows are shuffled once before writing: sources are often sorted (by topic, date, label), and
    validation on the first few batches of a sorted split measures one corner of the data.
    """
    run_dir = Path(run_dir)
    data = spec.data
    quiet_progress()
    ds = read_source(data).map_batches(
        assign_splits, batch_format="pandas",
        fn_kwargs={"seed": data.split_seed, "val_fraction": data.val_fraction,
                   "test_fraction": data.test_fraction},
    )
    scan = _Scan()
    progress("training the tokenizer on the training split")
    tokenizer = train_tokenizer(_training_texts(ds, scan), data.vocab_size)
    _check_scan(spec, scan)
    save_tokenizer(tokenizer, run_dir / "tokenizer")

    labels = sorted(scan.labels["train"]) if spec.model.family == "classifier" else []
    seq_len = data.block_size + 1 if spec.model.family == "gpt" else data.max_length
    out = run_dir / "data"
    shutil.rmtree(out, ignore_errors=True)
    progress("tokenizing and writing the splits")
    ds.map_batches(
        TokenizeBatch, batch_format="pandas", batch_size=SCAN_BATCH_ROWS, concurrency=1,
        fn_constructor_kwargs={"tokenizer_json": tokenizer.to_str(),
                               "family": spec.model.family, "block_size": data.block_size,
                               "max_length": data.max_length, "labels": labels},
    ).random_shuffle(seed=data.split_seed).write_parquet(str(out), partition_cols=["split"])

    progress("counting the rows written")
    rows = {split: read_split(run_dir, split).count() if (out / f"split={split}").exists() else 0
            for split in SPLITS}
    for split, count in rows.items():
        if count == 0:
            raise SpecError(
                f"data.path = {data.path!r}: the {split} split has {scan.texts[split]} texts but "
                f"no full block of data.block_size = {data.block_size} tokens; "
                "add data or lower data.block_size"
            )
    info = DataInfo(
        family=spec.model.family, vocab_size=tokenizer.get_vocab_size(),
        eos_id=tokenizer.token_to_id(EOS), pad_id=tokenizer.token_to_id(PAD), seq_len=seq_len,
        labels=labels, texts=dict(scan.texts), rows=rows,
        label_counts={s: dict(c) for s, c in scan.labels.items() if c},
    )
    (out / META_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info
