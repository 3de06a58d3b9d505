"""What the connected Ray cluster can grow to, and what a job gets from it (ClusterPlan): the
device, one trial's resources, how many trials run at once, and the inference actors' GPUs.

`ray.cluster_resources()` counts only the nodes that are up; on an autoscaling cluster (cluster.yaml:
a 0-CPU head, workers from 0) that is nothing a trial could run on. Ray 2.60 has no API for the
cluster's limits, but `ray up` leaves its config on the head as ~/ray_bootstrap_config.yaml, where
job drivers run (Ray Tune checks the same file to know the cluster autoscales).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import Grid, JobSpec, SpecError

log = logging.getLogger("orchestrator.cluster")

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def launcher_capacity(config: dict[str, Any]) -> dict[str, float]:
    """Resources of a cluster launcher config's head plus every worker type at its max_workers."""
    capacity: dict[str, float] = {}
    for name, node in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node.get("max_workers", 0)
        for resource, amount in node.get("resources", {}).items():
            capacity[resource] = capacity.get(resource, 0) + count * amount
    return capacity


def cluster_capacity() -> dict[str, float]:
    """On a `ray up` cluster, every node type at its max_workers (or what is up, if more);
    elsewhere what the cluster has now."""
    import ray  # the connected cluster's; the plan's arithmetic below needs no Ray

    now = ray.cluster_resources()
    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        return now
    launcher = launcher_capacity(yaml.safe_load(path.read_text()))
    return {key: max(now.get(key, 0), launcher.get(key, 0)) for key in {*now, *launcher}}


@dataclass(frozen=True)
class ClusterPlan:
    """What a job gets from the cluster, decided once, by the driver, before any stage runs:
    trial drivers and actors on other nodes see other nodes, and must not decide again."""

    use_gpu: bool
    trial_resources: dict[str, float]  # one trial's workers together ("CPU", "GPU"), at most
    data_cpus: float                   # kept free for Ray Data while trials stream
    concurrent_trials: int             # trials that fit at once (at the cluster's largest)
    inference_gpus: int                # per batch-inference actor (evaluate, predict)


def plan_for(spec: JobSpec, capacity: dict[str, float],
             held: dict[str, dict[str, float]] | None = None) -> ClusterPlan:
    """The plan for `spec` on a cluster that can hold `capacity`, of which `held` (by name:
    deployed services) is not free; a SpecError when one trial needs more than is free, instead
    of waiting forever for it. An elastic trial (num_workers {min, max}) must fit with min
    workers; how many trials run at once counts max, so that trials do not starve each other's
    growth."""
    held = held or {}
    free = {resource: amount - sum(h.get(resource, 0) for h in held.values())
            for resource, amount in capacity.items()}
    resources = spec.resources
    use_gpu = (capacity.get("GPU", 0) > 0 if resources.use_gpu == "auto"
               else bool(resources.use_gpu))
    least, needs = (trial_needs(spec, workers, use_gpu)
                    for workers in (resources.min_workers, resources.max_workers))
    data_cpus = 0.0 if spec.data.cache else resources.data_cpus
    for resource, amount in {**least, "CPU": least["CPU"] + data_cpus}.items():
        if amount > free.get(resource, 0):
            raise SpecError(
                f"resources: one trial needs {amount:g} {resource} "
                f"(num_workers{'.min' if resources.elastic else ''} = {resources.min_workers}, "
                f"cpus_per_worker = {resources.cpus_per_worker:g}, "
                f"gpus_per_worker = {resources.gpus_per_worker:g}, "
                f"data_cpus = {data_cpus:g}) but the cluster has "
                f"{capacity.get(resource, 0):g}{_held_note(held, resource, free)}; lower "
                "resources.num_workers or add nodes")
    fits = math.floor((free.get("CPU", 0) - data_cpus) / needs["CPU"])
    if needs.get("GPU", 0) > 0:
        fits = min(fits, math.floor(free.get("GPU", 0) / needs["GPU"]))
    concurrent = spec.sweep.max_concurrent_trials or max(1, fits)
    return ClusterPlan(use_gpu=use_gpu, trial_resources=needs, data_cpus=data_cpus,
                       concurrent_trials=min(concurrent, trial_count(spec)),
                       inference_gpus=inference_gpus(capacity))


def trial_needs(spec: JobSpec, workers: int, use_gpu: bool) -> dict[str, float]:
    """What `workers` workers of one trial hold together."""
    resources = spec.resources
    needs = {"CPU": workers * resources.cpus_per_worker}
    if use_gpu:
        needs["GPU"] = workers * resources.gpus_per_worker
    return needs


def _held_note(held: dict[str, dict[str, float]], resource: str, free: dict[str, float]) -> str:
    holders = [f"{name} holds {amounts[resource]:g}" for name, amounts in sorted(held.items())
               if amounts.get(resource, 0) > 0]
    if not holders:
        return ""
    return (f", {max(0.0, free.get(resource, 0)):g} of them free beside what is deployed "
            f"({'; '.join(holders)}: `orchestrator services` lists them, `orchestrator undeploy "
            "MODEL` removes one)")


def plan_cluster(spec: JobSpec, held: dict[str, dict[str, float]] | None = None) -> ClusterPlan:
    """The plan on the connected cluster, at the size it can grow to. `held`: what deployed
    services hold, by name; on a cluster that cannot grow it is not there for the job."""
    autoscales = BOOTSTRAP_CONFIG.expanduser().is_file()
    return plan_for(spec, cluster_capacity(), None if autoscales else held)


def inference_gpus(capacity: dict[str, float]) -> int:
    """GPUs per batch-inference actor: one when the cluster has (or can get) a GPU."""
    return 1 if capacity.get("GPU", 0) >= 1 else 0


def trial_count(spec: JobSpec) -> int:
    """Trials the sweep runs: num_samples for every point of the grid."""
    grid = math.prod(len(d.grid) for d in spec.sweep.space.values() if isinstance(d, Grid))
    return spec.sweep.num_samples * grid


def with_device(spec: JobSpec, plan: ClusterPlan) -> JobSpec:
    """The spec with resources.use_gpu decided (no 'auto' left for a trial to re-decide)."""
    return spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"use_gpu": plan.use_gpu})})


def refuse_untrainable(spec: JobSpec, use_gpu: bool) -> None:
    """Refuse, before any worker starts, training options this cluster cannot honour."""
    train = spec.train
    if train.precision == "fp16" and not use_gpu:
        raise SpecError("train.precision = 'fp16': fp16 training needs a GPU (on CPU use 'bf16' "
                        "or 'fp32'), and this job trains on CPU")
    if train.precision == "fp16" and train.strategy == "fsdp":
        raise SpecError("train.precision = 'fp16' with train.strategy = 'fsdp' is not supported "
                        "(the grad scaler does not handle sharded gradients); use 'bf16' or ddp")


def training_spec(spec: JobSpec, use_gpu: bool) -> JobSpec:
    """The spec a run trains with: refused as refuse_untrainable says, and FSDP over one worker
    falls back to plain training, with a warning."""
    refuse_untrainable(spec, use_gpu)
    train = spec.train
    if train.strategy == "fsdp" and spec.resources.max_workers == 1:
        log.warning("train.strategy fsdp with resources.num_workers 1 has nothing to shard "
                    "over; training the whole model on the one worker")
        spec = spec.model_copy(update={"train": train.model_copy(update={"strategy": "ddp"})})
    return spec
