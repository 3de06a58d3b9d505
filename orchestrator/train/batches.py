"""A worker's training batches, epoch after epoch, that know where they are in the data.

The position (epoch, batches taken in it) goes into every checkpoint. A resumed run replays the
same epoch in the same order (the split and each epoch's local shuffle are seeded) and skips
the batches it already trained on, so no sample is trained twice within the epoch that failed.
With a different worker count the shards differ: the run then skips the same number of rows
in total, but which rows those are depends on the new split.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class DataPosition:
    epoch: int = 0
    batches: int = 0  # batches of `epoch` already taken by each worker


# Rows fetched from Ray Data at a time and cut into micro-batches here: Ray Data's cost per
# batch (fetch, collate, copy) is far above a DataLoader's, so small batches starved the loop.
FETCH_ROWS = 1024


class EpochSource(Protocol):
    def fetches(self, epoch: int, rows: int) -> Iterable[dict[str, torch.Tensor]]:
        """The epoch's rows, shuffled in an order fixed by the epoch, `rows` at a time, on the
        worker's device."""


class BatchStream:
    """Shuffled, fixed-size batches of one worker's rows, forever; times the waiting."""

    def __init__(self, source: EpochSource, batch_size: int, start: DataPosition | None = None):
        self.source, self.batch_size = source, batch_size
        start = start or DataPosition()
        self.position = DataPosition(start.epoch, 0)
        self.wait_s = 0.0  # time spent waiting for batches since the last reset
        self._epoch: Generator[dict[str, torch.Tensor], None, None] | None = None
        for _ in range(start.batches):  # replay the epoch up to where the checkpoint left it
            next(self)

    def _open_epoch(self) -> Generator[dict[str, torch.Tensor], None, None]:
        """This epoch's micro-batches: large fetches cut into batch_size rows; the last rows of
        the epoch that do not fill a batch are dropped."""
        rows = max(FETCH_ROWS // self.batch_size, 1) * self.batch_size
        for fetch in self.source.fetches(self.position.epoch, rows):
            fetched = len(next(iter(fetch.values())))
            for start in range(0, fetched - self.batch_size + 1, self.batch_size):
                yield {name: column[start:start + self.batch_size]
                       for name, column in fetch.items()}

    def close(self) -> None:
        """Stop the open epoch's prefetching, so that the process can exit."""
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        while True:
            if self._epoch is None:
                self._epoch = self._open_epoch()
            batch = next(self._epoch, None)
            if batch is not None:
                break
            if self.position.batches == 0:
                raise RuntimeError(f"this worker's shard holds fewer than batch_size "
                                   f"({self.batch_size}) rows: lower train.batch_size or "
                                   "resources.num_workers, or add data")
            self._epoch = None
            self.position = DataPosition(self.position.epoch + 1, 0)
        self.position.batches += 1
        self.wait_s += time.perf_counter() - started
        return batch
