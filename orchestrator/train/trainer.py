"""Build a Ray Train TorchTrainer from the spec and the prepared data."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.cluster import check_training_options, plan_cluster
from orchestrator.data.stage import read_split
from orchestrator.records import DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec
from orchestrator.train.loop import train_loop_per_worker

log = logging.getLogger("orchestrator.train")


def ordered_ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options, with reads in order."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def build_trainer(spec: JobSpec, run_dir: RunDir | str, info: DataInfo, name: str,
                  callbacks: list | None = None,
                  resume_from: str | Path | None = None,
                  start: dict[str, Any] | None = None) -> TorchTrainer:
    """A TorchTrainer for one run; `resume_from` (a checkpoint directory) starts it from a
    checkpoint of another run, which may have had a different number of workers. `start` adds
    what a compress stage's run starts from to the loop's config (train/loop.py's set_up:
    `start_from`, `keep_zeros`, `distill`). The pipeline
    passes a spec whose resources.use_gpu is decided; 'auto' is decided here."""
    use_gpu = spec.resources.use_gpu
    if use_gpu == "auto":
        use_gpu = plan_cluster(spec).use_gpu
    spec = check_training_options(spec, use_gpu)
    run_dir = RunDir.at(run_dir)
    datasets = {split: read_split(run_dir, split) for split in ("train", "val")}
    if spec.data.cache:
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
    per_worker = {"CPU": spec.resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = spec.resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "data_info": asdict(info),
                           "base": run_dir.base.uri,
                           "resume_from": str(resume_from) if resume_from else None,
                           **(start or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.resources.num_workers, use_gpu=use_gpu,
            resources_per_worker=per_worker),
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


def checkpoint_retention(spec: JobSpec) -> dict[str, Any]:
    """Keep the N best checkpoints by the sweep metric or the N latest; Ray Train and Tune
    always keep the latest one too, which is what a restarted run resumes from. The arguments
    of Train's and Tune's CheckpointConfig alike."""
    if spec.train.checkpoint_keep == "latest":
        return {"num_to_keep": spec.train.checkpoints_to_keep}
    return {"num_to_keep": spec.train.checkpoints_to_keep,
            "checkpoint_score_attribute": spec.metric, "checkpoint_score_order": spec.metric_mode}
