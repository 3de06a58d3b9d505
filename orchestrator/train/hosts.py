"""The training loop's Ray hosts (see train/session.py): a Ray Train worker, and a one-worker
trial inside its Tune trial actor; and the functions each runs."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray import tune

from orchestrator.train.batches import EpochSource
from orchestrator.train.config import WorkerConfig
from orchestrator.train.loop import train_loop
from orchestrator.train.session import InMemorySession


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """What each Ray Train worker runs (build_trainer's train_loop_config)."""
    train_loop(config["worker"], RayTrainSession())


def train_in_trial(config: WorkerConfig) -> None:
    """What a one-worker trial runs inside its Tune trial actor."""
    train_loop(config, TrialSession(config))


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
        shard = ray.train.get_dataset_shard("val")  # read no further than the batches used
        return list(islice(shard.iter_torch_batches(batch_size=batch_size, device=self.device),
                           count))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


class TrialSession(InMemorySession):
    """A one-worker run inside its Tune trial actor: the whole splits in memory, Tune's
    reports and checkpoints (persisted to the trial's storage when reported)."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.name = f"trial-{tune.get_context().get_trial_id()}"

    def restored(self) -> ray.train.Checkpoint | None:
        return tune.get_checkpoint()

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
