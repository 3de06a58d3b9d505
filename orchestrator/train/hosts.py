"""The training loop's Ray hosts (see train/session.py): a Ray Train worker, a one-worker
trial inside its Tune trial actor, and a one-worker run in an actor of its own; and the
functions each runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray import tune

from orchestrator.spec import JobSpec
from orchestrator.storage import Location
from orchestrator.train.batches import EpochSource
from orchestrator.train.config import WorkerConfig
from orchestrator.train.loop import train_loop
from orchestrator.train.session import InMemorySession


def needs_ray_train(spec: JobSpec) -> bool:
    """Several workers, or splits streamed from storage (data.cache off), need a Ray Train run;
    one worker with its splits in memory trains in the process that hosts it (a Tune trial
    actor, a RunActor), without Train's start-up."""
    return spec.resources.num_workers != 1 or not spec.data.cache


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """What each Ray Train worker runs (build_trainer's train_loop_config)."""
    train_loop(config["worker"], RayTrainSession())


def train_in_trial(config: WorkerConfig) -> None:
    """What a one-worker trial runs inside its Tune trial actor."""
    train_loop(config, TrialSession(config))


@dataclass(frozen=True)
class FinishedRun:
    """A finished run's last checkpoint (its URI) and the metrics reported with it."""

    checkpoint: str
    metrics: dict[str, Any]


def train_in_actor(config: WorkerConfig, name: str) -> FinishedRun:
    """What a RunActor runs: the whole run, its checkpoints in the run directory's
    train/<name>/. A retried run trains again from the start, so what a failed try left there
    goes first."""
    folder = config.run_dir.train.join(name)
    folder.remove()
    session = ActorSession(config, folder, name)
    train_loop(config, session)
    if session.finished is None:
        raise RuntimeError(f"run {name} ended without a report")
    return session.finished


class RunActor:
    """A Ray actor that hosts one one-worker run (train_in_actor). Its caller kills it when the
    run ends, so its CPU is back at once, not whenever a task's worker lease is returned."""

    def train(self, config: WorkerConfig, name: str) -> FinishedRun:
        return train_in_actor(config, name)


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


class ActorSession(InMemorySession):
    """A one-worker run in a RunActor (the compress stage's short fine-tunes): the whole splits
    in memory, each report's checkpoint uploaded to `folder` in place of the one before. Never
    restored from a checkpoint (see train_in_actor)."""

    def __init__(self, config: WorkerConfig, folder: Location, name: str) -> None:
        super().__init__(config)
        self.folder, self.name = folder, name
        self.kept: Location | None = None
        self.finished: FinishedRun | None = None

    def restored(self) -> None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str) -> None:
        kept = self.folder.join(f"checkpoint_{metrics['step']:08d}")
        kept.upload(checkpoint_dir)
        if self.kept is not None:
            self.kept.remove()
        self.kept, self.finished = kept, FinishedRun(kept.uri, metrics)
