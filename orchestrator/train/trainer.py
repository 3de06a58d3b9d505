"""Build a Ray Train TorchTrainer from the spec and the prepared data."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.data import DataInfo, read_split
from orchestrator.spec import JobSpec, SpecError
from orchestrator.train.loop import train_loop_per_worker


def wants_gpu(spec: JobSpec) -> bool:
    """use_gpu 'auto' means: on GPU when the cluster has one."""
    if spec.resources.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
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
    """Fail fast when one trial needs more than the whole cluster has, instead of waiting."""
    cluster = ray.cluster_resources()
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


def build_trainer(spec: JobSpec, run_dir: str | Path, info: DataInfo, name: str,
                  callbacks: list | None = None) -> TorchTrainer:
    use_gpu = wants_gpu(spec)
    datasets = {split: read_split(run_dir, split) for split in ("train", "val")}
    if spec.data.cache:
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
    per_worker = {"CPU": spec.resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = spec.resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "data_info": asdict(info)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.resources.num_workers, use_gpu=use_gpu,
            resources_per_worker=per_worker),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(Path(run_dir, "train").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=spec.metric,
                checkpoint_score_order=spec.metric_mode),
            callbacks=callbacks or [],
        ),
    )
