"""Offline checks of dashboards/: the Grafana dashboards, alert rules and Prometheus config name
only metrics that exist, follow the conventions the live e2e test relies on, and parse.

No Ray here: Ray's metric names come from its installed source, ours from orchestrator.prometheus.
Whether the queries return data from a real job is the e2e test's business."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import prom
import pytest
import requests
import yaml

from orchestrator.prometheus import METRICS, exported_name

DASHBOARDS = ("training.json", "sweep.json", "serving.json")
VARIABLES = {"training.json": "run", "sweep.json": "run", "serving.json": "app"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
RAY_SUFFIXES = re.compile(r"(_bucket|_sum|_count|_total)$")

def our_metric_series() -> dict[str, str]:
    """Every series name Prometheus sees for orchestrator.prometheus.METRICS -> the METRICS key."""
    series = {}
    for name, spec in METRICS.items():
        exported = exported_name(name)
        if spec.kind == "histogram":
            base = exported.removesuffix("_bucket")
            series.update({base + suffix: name for suffix in HISTOGRAM_SERIES})
        else:
            series[exported] = name
    return series


@functools.cache
def ray_source_names(names: frozenset[str]) -> frozenset[str]:
    """Which of `names` (Ray-exported, `ray_` prefixed) Ray's installed source defines or queries.

    A name counts when Ray's Python source has it whole (its Grafana panels query
    `ray_object_store_memory`) or has the bare name, suffix dropped, as a string literal (the
    reporter agent defines `Gauge("node_cpu_utilization", ...)`)."""
    if not names:
        return frozenset()
    ray_dir = importlib.util.find_spec("ray").submodule_search_locations[0]
    patterns = {name: (name, f'"{RAY_SUFFIXES.sub("", name.removeprefix("ray_"))}"')
                for name in names}
    args = [arg for options in patterns.values() for pattern in options for arg in ("-e", pattern)]
    grep = subprocess.run(["grep", "-rhowF", "--include=*.py", *args, ray_dir],
                          capture_output=True, text=True, check=False)
    seen = set(grep.stdout.split())
    return frozenset(name for name, options in patterns.items() if seen & set(options))


def unknown_metrics(queries: list[prom.Query]) -> list[str]:
    """One message per query and metric that is neither ours nor Ray's."""
    ours = our_metric_series()
    used = {(query.source, name) for query in queries for name in prom.metric_names(query.expr)}
    ray_candidates = frozenset(name for _, name in used if not name.startswith("ray_orchestrator_"))
    known = ours.keys() | ray_source_names(ray_candidates)
    return [f"{source}: unknown metric {name} (not exported for orchestrator.prometheus.METRICS, "
            f"not in Ray's source)" for source, name in sorted(used) if name not in known]


def all_queries() -> list[prom.Query]:
    return [*prom.dashboard_queries(), *prom.variable_queries(),
            *(prom.Query(f"alerts.yaml: {rule['alert']}", rule["expr"])
              for rule in prom.alert_rules())]


def test_the_three_dashboards_replace_the_old_one():
    assert sorted(prom.load_dashboards()) == sorted(DASHBOARDS)


@pytest.mark.parametrize("file", DASHBOARDS)
def test_every_panel_reads_the_datasource_variable(file: str):
    dashboard = prom.load_dashboards()[file]
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    data_panels = [p for p in prom.panels(dashboard) if p["type"] != "row"]
    assert data_panels
    for panel in data_panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    ids = [p["id"] for p in prom.panels(dashboard)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("file", DASHBOARDS)
def test_orchestrator_panels_filter_by_the_run_or_app_variable(file: str):
    name = VARIABLES[file]
    dashboard = prom.load_dashboards()[file]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == name)
    assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    assert re.fullmatch(rf"label_values\(ray_orchestrator_\w+, {name}\)", variable["query"]["query"])
    for panel in prom.panels(dashboard):
        for target in panel.get("targets", []):
            selectors = re.findall(r"ray_orchestrator_\w+\{[^}]*\}|ray_orchestrator_\w+(?!\w|\{)",
                                   target["expr"])
            for selector in selectors:
                assert f'{name}=~"${name}"' in selector, f"{file}: {panel['title']}: {selector}"


def test_every_metric_is_ours_or_rays():
    assert unknown_metrics(all_queries()) == []
    assert unknown_metrics([prom.Query("GPU_ONLY", " ".join(prom.GPU_ONLY))]) == []


def test_a_panel_naming_a_made_up_metric_is_reported(tmp_path: Path):
    dashboard = prom.load_dashboards()["training.json"]
    panel = next(p for p in prom.panels(dashboard) if p["title"] == "Tokens per second")
    panel["targets"][0]["expr"] = 'sum by (run) (ray_orchestrator_train_warp_speed{run=~"$run"})'
    (tmp_path / "training.json").write_text(json.dumps(dashboard))
    messages = unknown_metrics(prom.dashboard_queries(tmp_path))
    assert messages == [("training.json: Tokens per second: unknown metric "
                         "ray_orchestrator_train_warp_speed (not exported for "
                         "orchestrator.prometheus.METRICS, not in Ray's source)")]
    assert unknown_metrics([prom.Query("x", "ray_node_flux_capacitor")]) != []


def test_every_metric_is_documented_and_charted():
    readme = (prom.DASHBOARDS_DIR / "README.md").read_text()
    metrics_section = readme.split("\n## Metrics\n", 1)[1]
    rows = {re.match(r"\| `(\w+)`", line).group(1): line
            for line in metrics_section.splitlines() if re.match(r"\| `ray_orchestrator_", line)}
    charted = {our_metric_series().get(name) for query in prom.dashboard_queries()
               for name in prom.metric_names(query.expr)}
    for name, spec in METRICS.items():
        row = rows.get(exported_name(name))
        assert row, f"{exported_name(name)} missing from the table in dashboards/README.md"
        assert f"| {spec.kind} |" in row and all(f"`{tag}`" in row for tag in spec.tags), row
        assert name in charted, f"no dashboard panel shows {exported_name(name)}"


def test_usage_per_key_is_charted_and_alerted_by_key_id():
    """Every per-key metric is charted per `key` (the key's id) in the serving dashboard, and
    the quota alert fires per app and key."""
    dashboard = prom.load_dashboards()["serving.json"]
    by_key = [target["expr"] for panel in prom.panels(dashboard)
              for target in panel.get("targets", []) if "by (app, key" in target["expr"]]
    for name in METRICS:
        if name.startswith("serve_key_"):
            assert any(exported_name(name) in expr for expr in by_key), name
    rule = next(r for r in prom.alert_rules() if r["alert"] == "ServeKeyAtQuota")
    assert "sum by (app, key)" in rule["expr"] and "rate_limited" in rule["expr"]


def test_alerts_follow_the_signal_comparison_convention():
    rules = prom.alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "TrainingStalled", "TrainingLossNaN", "TrainingLossDiverging", "DataWaitHigh",
        "Serve5xxRateHigh", "ServeP99AboveTarget", "ServeKeyAtQuota", "NodeMemoryNearFull"}
    for rule in rules:
        signal, _, rhs = prom.split_comparison(rule["expr"])
        assert prom.metric_names(signal) and rhs, rule["alert"]
        assert rule["for"] and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    for signal in prom.alert_signals():
        with pytest.raises(ValueError, match="none"):  # the comparison is not part of it
            prom.split_comparison(signal.expr)


@pytest.mark.parametrize("expr, error", [
    ("a > 1 and b < 2", "exactly one"), ("rate(a[5m])", "exactly one"),
    ("a > bool 1", "bool"), ('sum(a{x!="y"}) / sum(b)', "exactly one")])
def test_the_convention_check_rejects(expr: str, error: str):
    with pytest.raises(ValueError, match=error):
        prom.split_comparison(expr)


def test_the_convention_check_splits_at_the_top_level_comparison():
    assert prom.split_comparison('max by (a) (x{s=~"5.."} > 2) / y >= on (a) z') == (
        'max by (a) (x{s=~"5.."} > 2) / y', ">=", "on (a) z")


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases = [case for test in yaml.safe_load(prom.ALERT_TESTS_FILE.read_text())["tests"]
             for case in test["alert_rule_test"]]
    alerts = {rule["alert"] for rule in prom.alert_rules()}
    assert {case["alertname"] for case in cases if case["exp_alerts"]} == alerts
    assert {case["alertname"] for case in cases if not case["exp_alerts"]} == alerts


@pytest.mark.parametrize("args", [("check", "rules", "alerts.yaml"),
                                  ("test", "rules", "alerts_test.yaml"),
                                  ("check", "config", "prometheus.yml")])
def test_promtool(args: tuple[str, ...]):
    result = prom.promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("prometheus")
    sd_file = workdir / "targets.json"
    sd_file.write_text("[]")
    with prom.running_prometheus(sd_file, workdir) as url:
        yield url


def test_every_query_is_valid_promql(prometheus: str):
    end = time.time()
    errors = []
    for query in [*prom.dashboard_queries(), *prom.alert_signals()]:
        try:
            prom.query_range(prometheus, query.expr, end - 600, end, 15)
        except prom.PromQLError as error:
            errors.append(f"{query.source}: {error}")
    assert errors == []
    with pytest.raises(prom.PromQLError, match="parse error"):
        prom.query_range(prometheus, "sum by (run (ray_orchestrator_train_loss)", end - 60, end,
                         15)


def test_prometheus_loads_every_alert(prometheus: str):
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule["alert"] for rule in prom.alert_rules()}
