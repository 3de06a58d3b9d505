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

from orchestrator.cluster import cluster_capacity
from orchestrator.data import DataInfo, read_split
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, SpecError
from orchestrator.train.loop import train_loop_per_worker

log = logging.getLogger("orchestrator.train")


def wants_gpu(spec: JobSpec) -> bool:
    """use_gpu 'auto' means: on GPU when the cluster has or can get one (the pipeline resolves
    it once, in the driver, so trials on other nodes agree)."""
    if spec.resources.use_gpu == "auto":
        return cluster_capacity().get("GPU", 0) > 0
    return bool(spec.resources.use_gpu)


def trial_resources(spec: JobSpec) -> dict[str, float]:
    """What one trial's workers need, all together."""
    workers = spec.resources.num_workers
    needs = {"CPU": workers * spec.resources.cpus_per_worker}
    if wants_gpu(spec):
        needs["GPU"] = workers * spec.resources.gpus_per_worker
    return needs


def data_cpus(spec: JobSpec) -> float:
    """CPUs Ray Data needs while trials train: none when the splits are cached in memory."""
    return 0.0 if spec.data.cache else spec.resources.data_cpus


def check_cluster_fits(spec: JobSpec) -> None:
    """Fail fast when one trial needs more than the whole cluster has or can get, instead of
    waiting."""
    cluster = cluster_capacity()
    needs = trial_resources(spec)
    needs["CPU"] += data_cpus(spec)
    for resource, amount in needs.items():
        if amount > cluster.get(resource, 0):
            raise SpecError(
                f"resources: one trial needs {amount:g} {resource} "
                f"(num_workers = {spec.resources.num_workers}, "
                f"cpus_per_worker = {spec.resources.cpus_per_worker:g}, "
                f"gpus_per_worker = {spec.resources.gpus_per_worker:g}, "
                f"data_cpus = {data_cpus(spec):g}) but the cluster has "
                f"{cluster.get(resource, 0):g}; lower resources.num_workers or add nodes"
            )


def ordered_ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options, with reads in order."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def check_training_options(spec: JobSpec, use_gpu: bool) -> JobSpec:
    """Refuse options that cannot work on this cluster before any worker starts; return the
    spec to train with (FSDP over one worker falls back to plain training, with a warning)."""
    train = spec.train
    if train.precision == "fp16" and not use_gpu:
        raise SpecError("train.precision = 'fp16': fp16 training needs a GPU (on CPU use 'bf16' "
                        "or 'fp32'), and this job trains on CPU")
    if train.precision == "fp16" and train.strategy == "fsdp":
        raise SpecError("train.precision = 'fp16' with train.strategy = 'fsdp' is not supported "
                        "(the grad scaler does not handle sharded gradients); use 'bf16' or ddp")
    if train.strategy == "fsdp" and spec.resources.num_workers == 1:
        log.warning("train.strategy fsdp with resources.num_workers 1 has nothing to shard "
                    "over; training the whole model on the one worker")
        spec = spec.model_copy(update={"train": train.model_copy(update={"strategy": "ddp"})})
    return spec


def build_trainer(spec: JobSpec, run_dir: RunDir | str, info: DataInfo, name: str,
                  callbacks: list | None = None,
                  resume_from: str | Path | None = None) -> TorchTrainer:
    """A TorchTrainer for one run; `resume_from` (a checkpoint directory) starts it from a
    checkpoint of another run, which may have had a different number of workers."""
    use_gpu = wants_gpu(spec)
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
                           "resume_from": str(resume_from) if resume_from else None},
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
