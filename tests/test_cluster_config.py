"""Offline checks for cluster.yaml and the Grafana dashboard (no Ray cluster needed)."""

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
DASHBOARD_JSON = ROOT / "dashboards" / "orchestrator.json"
DASHBOARD_README = ROOT / "dashboards" / "README.md"
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])ray_[A-Za-z0-9_:]+")


def load_cluster_config() -> dict[str, Any]:
    """Parse cluster.yaml."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_ray_schema() -> dict[str, Any]:
    """Load the cluster config schema shipped inside the installed Ray package."""
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(schema_path.read_text())


def load_dashboard() -> dict[str, Any]:
    """Parse the Grafana dashboard JSON."""
    return json.loads(DASHBOARD_JSON.read_text())


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Return every PromQL expression in the dashboard's panels."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def documented_metrics() -> set[str]:
    """Return the backticked metric names in the README's "## Metrics" section."""
    section = DASHBOARD_README.read_text().split("\n## Metrics\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return set(re.findall(r"`(ray_[A-Za-z0-9_:]+)`", section))


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


def test_dashboard_has_datasource_variable() -> None:
    variables = load_dashboard()["templating"]["list"]
    datasource = [v for v in variables if v["name"] == "datasource"]
    assert datasource and datasource[0]["type"] == "datasource"
    assert datasource[0]["query"] == "prometheus"


def test_dashboard_panels_query_the_datasource_variable() -> None:
    for panel in load_dashboard()["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert any(t.get("expr") for t in panel.get("targets", [])), panel["title"]


def test_dashboard_metrics_are_documented() -> None:
    exprs = dashboard_exprs(load_dashboard())
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    documented = documented_metrics()
    assert used, "no ray_ metrics found in dashboard queries"
    assert used <= documented, f"undocumented metrics: {sorted(used - documented)}"
