"""What the connected Ray cluster can grow to, which is what a job is sized against.

`ray.cluster_resources()` counts only the nodes that are up; on an autoscaling cluster (cluster.yaml:
a 0-CPU head, workers from 0) that is nothing a trial could run on. Ray 2.60 has no API for the
cluster's limits, but `ray up` leaves its config on the head as ~/ray_bootstrap_config.yaml, where
job drivers run (Ray Tune checks the same file to know the cluster autoscales).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import yaml

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
    now = ray.cluster_resources()
    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        return now
    launcher = launcher_capacity(yaml.safe_load(path.read_text()))
    return {key: max(now.get(key, 0), launcher.get(key, 0)) for key in {*now, *launcher}}
