"""Where the training loop runs: one loop, two hosts.

A trial with several workers is a Ray Train run: a controller, a worker group, and Ray Data
splitting the training set between the workers. A trial with one worker whose splits fit in
memory (`data.cache`) trains inside its own Tune trial actor instead: the same loop, reporting
and checkpointing through Tune, with the splits read straight from the run directory's parquet.
On 2 cores a Ray Train run spent about 45 s per trial starting and stopping its controller,
worker, dataset manager, split coordinator and their queues, next to 30 s of training; the
trial actor pays none of it. Both keep checkpoints, resume after a worker death (Train's or
Tune's `FailureConfig`) and ASHA's early stopping, which acts on the reports either way.

A session is what the loop asks of its host: who it is (rank, world, device, name), the
checkpoint to start from, its batches, and where its reports go.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
from ray import tune

from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec
from orchestrator.train.batches import EpochSource


class Session(Protocol):
    world_size: int
    rank: int
    device: torch.device
    name: str  # the run's name in metrics: trial-<id>

    def restored(self) -> ray.train.Checkpoint | None:
        """The checkpoint this host restarts the run from after a failure, if any."""

    def train_source(self, shuffle_buffer: int, seed: int) -> EpochSource:
        """This worker's part of the training split."""

    def val_batches(self, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
        """The first `count` validation batches (the same ones at every evaluation)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        """Hand the interval's metrics and this worker's checkpoint directory to the host."""


class RayTrainSession:
    """A Ray Train worker: Train's context, its dataset shards and its reports."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.world_size, self.rank = context.get_world_size(), context.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.name = context.get_experiment_name()

    def restored(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def train_source(self, shuffle_buffer: int, seed: int) -> EpochSource:
        return RayDataShard(ray.train.get_dataset_shard("train"), self.device, shuffle_buffer,
                            seed)

    def val_batches(self, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
        shard = ray.train.get_dataset_shard("val")
        return list(shard.iter_torch_batches(batch_size=batch_size, device=self.device))[:count]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


class TrialSession:
    """A one-worker run inside its Tune trial actor: the whole splits in memory, Tune's
    reports and checkpoints (persisted to the trial's storage when reported)."""

    world_size, rank = 1, 0

    def __init__(self, spec: JobSpec, run_dir: RunDir | str) -> None:
        self.device = torch.device("cuda" if spec.resources.use_gpu is True else "cpu")
        self.name = f"trial-{tune.get_context().get_trial_id()}"
        self.run_dir = RunDir.at(run_dir)

    def restored(self) -> ray.train.Checkpoint | None:
        return tune.get_checkpoint()

    def train_source(self, shuffle_buffer: int, seed: int) -> EpochSource:
        """The whole split, each epoch fully permuted: no buffer needed (shuffle_buffer unused)."""
        return InMemorySplit(read_split_tensors(self.run_dir, "train"), self.device, seed)

    def val_batches(self, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
        rows = read_split_tensors(self.run_dir, "val")
        total = len(rows["ids"])
        return [{name: column[start:start + batch_size].to(self.device)
                 for name, column in rows.items()}
                for start in range(0, min(total, batch_size * count), batch_size)]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))


class RayDataShard:
    """One worker's Ray Data shard; each epoch shuffled in a local buffer seeded by the epoch."""

    def __init__(self, shard: Any, device: torch.device, shuffle_buffer: int, seed: int):
        self.shard, self.device, self.shuffle_buffer, self.seed = shard, device, shuffle_buffer, seed

    def fetches(self, epoch: int, rows: int) -> Iterator[dict[str, torch.Tensor]]:
        buffer = self.shuffle_buffer or None
        return self.shard.iter_torch_batches(
            batch_size=rows, device=self.device, pin_memory=self.device.type == "cuda",
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=self.seed + epoch if buffer else None)


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


def read_split_tensors(run_dir: RunDir | str, split: str) -> dict[str, torch.Tensor]:
    """A split the data stage wrote, as tensors: `ids` (rows × tokens) and, for the
    classifier, `label`."""
    location = RunDir.at(run_dir).split(split)
    table = pq.read_table(location.path, filesystem=location.fs, partitioning=None)
    ids = table.column("ids").combine_chunks()
    if isinstance(ids, pa.ExtensionArray):  # Ray Data's tensor type over a list of values
        ids = ids.storage
    columns = {"ids": torch.from_numpy(ids.flatten().to_numpy().reshape(len(ids), -1).copy())}
    if "label" in table.column_names:
        columns["label"] = torch.from_numpy(table.column("label").to_numpy().copy())
    return columns
