"""Offline checks for cluster.yaml (no Ray cluster needed)."""

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load_cluster_config() -> dict[str, Any]:
    """Parse cluster.yaml."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_ray_schema() -> dict[str, Any]:
    """Load the cluster config schema shipped inside the installed Ray package."""
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(schema_path.read_text())


def test_cluster_yaml_matches_ray_schema() -> None:
    jsonschema.validate(load_cluster_config(), load_ray_schema())


def test_cluster_yaml_passes_ray_validator() -> None:
    """Ray's own check, as `ray up` runs it before contacting AWS."""
    validate_config(prepare_config(load_cluster_config()))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("not_a_ray_field", True, "Additional properties are not allowed"),
        ("max_workers", "eight", "'eight' is not of type 'integer'"),
    ],
)
def test_broken_cluster_yaml_fails_schema(key: str, value: Any, message: str) -> None:
    broken = copy.deepcopy(load_cluster_config())
    broken[key] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(broken, load_ray_schema())


def test_gpu_worker_scales_from_zero() -> None:
    gpu = load_cluster_config()["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0
    assert gpu["resources"]["GPU"] >= 1


def test_dashboard_binds_localhost() -> None:
    head = " ".join(load_cluster_config()["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1\b", head)


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_enable_token_auth(key: str) -> None:
    assert any("RAY_AUTH_MODE=token" in cmd for cmd in load_cluster_config()[key])


def test_auth_token_is_mounted_on_every_node() -> None:
    """file_mounts reach the head and, through its autoscaler, every worker."""
    assert "~/.ray/auth_token" in load_cluster_config()["file_mounts"]
