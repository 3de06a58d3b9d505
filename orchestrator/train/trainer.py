"""Build a Ray Train TorchTrainer from the spec and the prepared data."""

from __future__ import annotations

import logging
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.data.stage import read_split
from orchestrator.spec import JobSpec
from orchestrator.train.config import WorkerConfig
from orchestrator.train.hosts import train_loop_per_worker

log = logging.getLogger("orchestrator.train")


def ordered_ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options, with reads in order."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def build_trainer(config: WorkerConfig, name: str,
                  callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer for one run of `config` (its workers' orders: the device is decided there,
    not here); a config's `resume_from` may be a checkpoint of a run with another number of
    workers."""
    spec, run_dir = config.spec, config.run_dir
    datasets = {split: read_split(run_dir, split) for split in ("train", "val")}
    if spec.data.cache:
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
    return TorchTrainer(
        train_loop_per_worker,
        # Ray Train takes a dict here (its dashboard shows each value as a string).
        train_loop_config={"worker": config},
        scaling_config=scaling_config(spec, config.use_gpu),
        datasets=datasets,
        # Ordered reads make every worker's shard the same after a restart, so a resumed run
        # can skip exactly the batches it already trained on.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options={"train": ordered_ingest_options()}),
        run_config=ray.train.RunConfig(
            name=name,
            # Restarted with the same name and storage (a resumed sweep), Train V2 continues
            # from the run's latest checkpoint.
            storage_path=run_dir.train.path, storage_filesystem=run_dir.train.fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(**checkpoint_retention(spec)),
            callbacks=callbacks or [],
        ),
    )


def scaling_config(spec: JobSpec, use_gpu: bool) -> ray.train.ScalingConfig:
    """A fixed number of workers, or Ray Train's elastic (min, max): the group starts with what
    fits, and is restarted smaller after a failure (train.max_failures) or larger when room
    appears, from the latest checkpoint each time (the loop keeps the global batch)."""
    resources = spec.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    if not resources.elastic:
        return ray.train.ScalingConfig(num_workers=resources.num_workers, use_gpu=use_gpu,
                                       resources_per_worker=per_worker)
    return ray.train.ScalingConfig(
        num_workers=(resources.min_workers, resources.max_workers), use_gpu=use_gpu,
        resources_per_worker=per_worker,
        elastic_resize_monitor_interval_s=resources.num_workers.resize_check_s)


def checkpoint_retention(spec: JobSpec) -> dict[str, Any]:
    """Keep the N best checkpoints by the sweep metric or the N latest; Ray Train and Tune
    always keep the latest one too, which is what a restarted run resumes from. The arguments
    of Train's and Tune's CheckpointConfig alike."""
    if spec.train.checkpoint_keep == "latest":
        return {"num_to_keep": spec.train.checkpoints_to_keep}
    return {"num_to_keep": spec.train.checkpoints_to_keep,
            "checkpoint_score_attribute": spec.metric, "checkpoint_score_order": spec.metric_mode}
