"""Offline checks for cluster.yaml (no Ray cluster, no AWS): Ray's schema and validator, and ours."""

import copy
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
Config = dict[str, Any]


def load_cluster_config() -> Config:
    """Parse cluster.yaml."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_ray_schema() -> Config:
    """Load the cluster config schema shipped inside the installed Ray package."""
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(schema_path.read_text())


def _field(path: Iterable[object]) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def _node_type_bounds(config: Config) -> list[str]:
    """min_workers above max_workers within one node type: Ray's schema and validate_config
    both accept it (validate_config only compares the sum of min_workers with the global
    max_workers), so we check it ourselves."""
    return [f"available_node_types.{name}.min_workers: {node['min_workers']} is more than "
            f"its max_workers {node['max_workers']}"
            for name, node in config.get("available_node_types", {}).items()
            if "max_workers" in node and node.get("min_workers", 0) > node["max_workers"]]


def cluster_config_errors(config: Config) -> list[str]:
    """Every problem with a cluster config as 'field.path: problem' lines, so a failing test says
    which field is wrong. Ray's schema first (all of its errors at once, where `ray up` shows only
    one); when the schema passes, Ray's own validate_config (what `ray up` runs before it contacts
    the cloud) and our per-node-type bounds."""
    validator = jsonschema.Draft7Validator(load_ray_schema())
    schema_errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path)))
    if schema_errors:
        return [f"{_field(error.absolute_path)}: {error.message}" for error in schema_errors]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, RuntimeError) as error:
        return [f"validate_config: {error}"]
    return _node_type_bounds(config)


def test_cluster_yaml_matches_ray_schema() -> None:
    jsonschema.validate(load_cluster_config(), load_ray_schema())


def test_cluster_yaml_passes_ray_validator() -> None:
    """Ray's own check, as `ray up` runs it before contacting AWS."""
    validate_config(prepare_config(load_cluster_config()))


def test_cluster_yaml_has_no_errors() -> None:
    assert cluster_config_errors(load_cluster_config()) == []


def _parent(config: Config, path: str) -> tuple[Config, str]:
    *parents, last = path.split(".")
    for key in parents:
        config = config[key]
    return config, last


def _set(changes: dict[str, Any]) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        for path, value in changes.items():
            parent, key = _parent(config, path)
            parent[key] = value
    return mutate


def _delete(path: str) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        parent, key = _parent(config, path)
        del parent[key]
    return mutate


GPU = "available_node_types.gpu_worker"
CPU = "available_node_types.cpu_worker"


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [
        (_set({"not_a_ray_field": True}), "(top level)", "'not_a_ray_field' was unexpected"),
        (_set({"max_workers": "eight"}), "max_workers", "'eight' is not of type 'integer'"),
        (_delete(f"{GPU}.resources"), GPU, "'resources' is a required property"),
        (_set({f"{GPU}.resources": {"GPU": 0.5}}), f"{GPU}.resources.GPU",
         "0.5 is not of type 'integer'"),
        (_set({f"{CPU}.min_worker": 1}), CPU, "'min_worker' was unexpected"),
        (_set({"head_node_type": "no_such_type"}), "validate_config",
         "`head_node_type` must be one of `available_node_types`"),
        # 2 + 2 minimum workers, global max_workers 3: only Ray's validator catches it
        (_set({f"{GPU}.min_workers": 2, f"{CPU}.min_workers": 2, "max_workers": 3}),
         "validate_config",
         "global `max_workers` is smaller than the sum of `min_workers`"),
        # 5 > 4 within gpu_worker: Ray accepts it, our bounds check does not
        (_set({f"{GPU}.min_workers": 5}), f"{GPU}.min_workers", "5 is more than its max_workers 4"),
    ],
    ids=["unknown-key", "max-workers-type", "no-resources", "fractional-gpu", "typo-in-node-type",
         "unknown-head-type", "min-workers-sum", "min-above-max"],
)
def test_broken_cluster_config_names_the_field(mutate: Callable[[Config], None], field: str,
                                               problem: str) -> None:
    broken = load_cluster_config()
    mutate(broken)
    errors = cluster_config_errors(broken)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{field}: ") and problem in errors[0], errors[0]


def test_every_schema_error_is_reported_at_once() -> None:
    broken = load_cluster_config()
    for mutate in (_set({"max_workers": "eight"}), _delete(f"{GPU}.resources")):
        mutate(broken)
    assert [error.split(":")[0] for error in cluster_config_errors(broken)] == [GPU, "max_workers"]


def _node_types() -> Config:
    return load_cluster_config()["available_node_types"]


def test_head_runs_no_training() -> None:
    """The head advertises no CPU and no GPU: anything that asks for one goes to a worker."""
    config = load_cluster_config()
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_gpu_worker_scales_from_zero_on_spot() -> None:
    gpu = _node_types()["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}


def test_cpu_worker_scales_from_zero() -> None:
    cpu = _node_types()["cpu_worker"]
    assert cpu["min_workers"] == 0 and cpu["max_workers"] >= 1
    assert "GPU" not in cpu["resources"]


def test_dashboard_binds_localhost() -> None:
    head = " ".join(load_cluster_config()["head_start_ray_commands"])
    assert re.search(r"--dashboard-host[ =]127\.0\.0\.1\b", head)


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_enable_token_auth(key: str) -> None:
    """Set in the same shell command, before `ray start` runs."""
    commands = load_cluster_config()[key]
    assert any(re.search(r"export RAY_AUTH_MODE=token;.*\bray start\b", cmd) for cmd in commands)


def test_auth_token_is_mounted_on_every_node() -> None:
    """file_mounts reach the head and, through its autoscaler, every worker."""
    assert load_cluster_config()["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _pins(text: str, package: str) -> SpecifierSet:
    """The version specifiers of the first quoted requirement on `package` in `text`."""
    match = re.search(rf'"{package}(?:\[[^\]]*\])?([<>=!~][^"]*)"', text)
    assert match, f"no quoted requirement on {package}"
    return SpecifierSet(match.group(1))


def test_setup_installs_this_project_with_its_pins() -> None:
    """Every node installs the mounted project, with the Ray these tests run and pyproject's torch."""
    config = load_cluster_config()
    assert config["file_mounts"]["~/orchestrator"] == "."
    setup = "\n".join(config["setup_commands"])
    assert "pip install -e ~/orchestrator" in setup
    assert _pins(setup, "ray") == SpecifierSet(f"=={ray.__version__}")
    assert _pins(setup, "torch") == _pins((ROOT / "pyproject.toml").read_text(), "torch")


def test_head_keeps_rays_aws_setup() -> None:
    """head_setup_commands is unset on purpose: Ray's default installs boto3 for the autoscaler."""
    head_setup = prepare_config(load_cluster_config())["head_setup_commands"]
    assert any("boto3" in cmd for cmd in head_setup)


def test_mount_leaves_out_local_state() -> None:
    assert {".git", ".venv", "runs"} <= set(load_cluster_config()["rsync_exclude"])
