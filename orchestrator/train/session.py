"""Where the training loop runs: one loop, four hosts.

A trial with several workers is a Ray Train run: a controller, a worker group, and Ray Data
splitting the training set between the workers. A trial with one worker whose splits fit in
memory (`data.cache`) trains inside its own Tune trial actor instead: the same loop, reporting
and checkpointing through Tune, with the splits read straight from the run directory's parquet.
On 2 cores a Ray Train run spent about 45 s per trial starting and stopping its controller,
worker, dataset manager, split coordinator and their queues, next to 30 s of training; the
trial actor pays none of it. Both keep checkpoints, resume after a worker death (Train's or
Tune's `FailureConfig`) and ASHA's early stopping, which acts on the reports either way. The
compress stage's short one-worker fine-tunes train the same way in an actor of their own (a
retried run starts over). Those three hosts are in train/hosts.py; the fourth, LocalSession,
runs the loop in this process without Ray (tests, and anyone who wants one run on one machine).

A session is what the loop asks of its host: who it is (rank, world, device, name), the
checkpoint to start from, its batches, and where its reports go.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.dataset as pa_dataset
import torch

from orchestrator.rundir import RunDir
from orchestrator.train.batches import EpochSource
from orchestrator.train.config import WorkerConfig


class Checkpoint(Protocol):
    """A checkpoint a host hands back (Ray Train's and Tune's have this method)."""

    def as_directory(self) -> AbstractContextManager[str]: ...


class Session(Protocol):
    world_size: int
    rank: int
    device: torch.device
    name: str  # the run's name in metrics: trial-<id>

    def restored(self) -> Checkpoint | None:
        """The checkpoint this host restarts the run from after a failure, if any."""

    def train_source(self, shuffle_buffer: int, seed: int) -> EpochSource:
        """This worker's part of the training split."""

    def val_batches(self, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
        """The first `count` validation batches (the same ones at every evaluation)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        """Hand the interval's metrics and this worker's checkpoint directory to the host."""


@dataclass
class LocalCheckpoint:
    path: str

    @contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


class InMemorySession:
    """A one-worker host with its splits in memory, read straight from the run directory's
    parquet: each epoch a full permutation, so no shuffle buffer is needed."""

    world_size, rank = 1, 0

    def __init__(self, config: WorkerConfig) -> None:
        self.device = torch.device("cuda" if config.use_gpu else "cpu")
        self.run_dir = config.run_dir

    def train_source(self, shuffle_buffer: int, seed: int) -> EpochSource:
        return InMemorySplit(read_split_tensors(self.run_dir, "train"), self.device, seed)

    def val_batches(self, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
        rows = read_split_tensors(self.run_dir, "val", first=batch_size * count)
        return first_batches(rows, batch_size, count, self.device)


class LocalSession(InMemorySession):
    """The loop in this process, without Ray: each report kept in `reports` with its checkpoint
    copied under `checkpoints/`. `restored` plays the host that restarts a failed run from a
    checkpoint of its own."""

    name = "local"

    def __init__(self, config: WorkerConfig, checkpoints: str | Path,
                 restored: str | Path | None = None) -> None:
        super().__init__(config)
        self.checkpoints = Path(checkpoints)
        self._restored = restored
        self.reports: list[dict[str, Any]] = []

    def restored(self) -> Checkpoint | None:
        return LocalCheckpoint(str(self._restored)) if self._restored else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        kept = self.checkpoints / f"step-{metrics['step']}"
        shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
        self.reports.append({**metrics, "checkpoint": str(kept)})


def first_batches(rows: dict[str, torch.Tensor], batch_size: int, count: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches of a split held in memory, on the device."""
    total = len(rows["ids"])
    return [{name: column[start:start + batch_size].to(device) for name, column in rows.items()}
            for start in range(0, min(total, batch_size * count), batch_size)]


class InMemorySplit:
    """A whole split as tensors; each epoch is a full permutation seeded by the epoch, so a
    restarted run replays the epoch it failed in exactly."""

    def __init__(self, columns: dict[str, torch.Tensor], device: torch.device, seed: int):
        self.columns, self.device, self.seed = columns, device, seed

    def fetches(self, epoch: int, rows: int) -> Iterator[dict[str, torch.Tensor]]:
        total = len(self.columns["ids"])
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed + epoch))
        for start in range(0, total, rows):
            picked = order[start:start + rows]
            yield {name: column[picked].to(self.device, non_blocking=True)
                   for name, column in self.columns.items()}


def read_split_tensors(run_dir: RunDir | str, split: str,
                       first: int | None = None) -> dict[str, torch.Tensor]:
    """A split the data stage wrote, as tensors: `ids` (rows × tokens) and, for the
    classifier, `label`; with `first`, only its first rows are read (what an evaluation uses)."""
    location = RunDir.at(run_dir).split(split)
    dataset = pa_dataset.dataset(location.path, filesystem=location.fs, format="parquet")
    table = dataset.to_table() if first is None else dataset.head(first)
    ids = table.column("ids").combine_chunks()
    if isinstance(ids, pa.ExtensionArray):  # Ray Data's tensor type over a list of values
        ids = ids.storage
    columns = {"ids": torch.from_numpy(ids.flatten().to_numpy().reshape(len(ids), -1).copy())}
    if "label" in table.column_names:
        columns["label"] = torch.from_numpy(table.column("label").to_numpy().copy())
    return columns
