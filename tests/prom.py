"""The PromQL in dashboards/ (Grafana panels, alert rules) and a throwaway Prometheus to run it.

Shared by the offline checks (tests/test_dashboards.py) and the live end-to-end test: both need
the same list of queries, in the form Prometheus itself accepts (Grafana variables replaced).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from conftest import free_port

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "dashboards"
ALERTS_FILE = DASHBOARDS_DIR / "alerts.yaml"
ALERT_TESTS_FILE = DASHBOARDS_DIR / "alerts_test.yaml"
PROMETHEUS_CONFIG = DASHBOARDS_DIR / "prometheus.yml"

# What Grafana substitutes for its built-in variables; any other variable ($run, $app) is a
# multi-value selection whose "All" value is the regex `.*`.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s"}
ALL_VALUES = ".*"

# Exported only where a GPU is (Ray's GPU node metrics) or a GPU's peak FLOP/s is known (MFU):
# a live test on a CPU-only machine finds no series for them.
GPU_ONLY: frozenset[str] = frozenset({
    "ray_node_gpus_utilization", "ray_node_gpus_available", "ray_node_gram_used",
    "ray_node_gram_available", "ray_orchestrator_train_mfu"})

COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![\w:])ray_[A-Za-z0-9_:]*")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from, for messages ("training.json: MFU")."""
    source: str
    expr: str


def grafana_to_promql(expr: str) -> str:
    """The query Prometheus receives when every multi-value variable is set to "All"."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return GRAFANA_BUILTINS.get(name, ALL_VALUES)
    return _VARIABLE.sub(value, expr)


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict]:
    """Every Grafana dashboard (*.json) in `directory`, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(directory: Path = DASHBOARDS_DIR) -> list[Query]:
    """Every panel target's expression, as Prometheus would receive it."""
    return [Query(f"{file}: {panel['title']}", grafana_to_promql(target["expr"]))
            for file, dashboard in load_dashboards(directory).items()
            for panel in panels(dashboard) for target in panel.get("targets", [])]


def variable_queries(directory: Path = DASHBOARDS_DIR) -> list[Query]:
    """The template variables' queries (Grafana's `label_values(metric, label)`, not PromQL)."""
    return [Query(f"{file}: variable {variable['name']}", variable["query"]["query"])
            for file, dashboard in load_dashboards(directory).items()
            for variable in dashboard["templating"]["list"] if variable["type"] == "query"]


def alert_rules(path: Path = ALERTS_FILE) -> list[dict]:
    """The alerting rules of a Prometheus rule file, over all its groups."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def split_comparison(expr: str) -> tuple[str, str, str]:
    """(signal, operator, right-hand side) of `<signal> <comparison> <rhs>`.

    Raises ValueError unless exactly one comparison operator sits outside parentheses, brackets,
    braces and strings, and it has no `bool` modifier (which would turn a filter into 0/1)."""
    masked = _STRING.sub(lambda m: "_" * len(m.group()), expr)
    depth, found, i = 0, [], 0
    while i < len(masked):
        char = masked[i]
        depth += (char in "([{") - (char in ")]}")
        operator = next((op for op in COMPARISONS if masked.startswith(op, i)), None)
        if depth == 0 and operator:
            found.append((i, operator))
            i += len(operator)
            continue
        i += 1
    if len(found) != 1:
        raise ValueError(f"expected exactly one top-level comparison, found "
                         f"{[op for _, op in found] or 'none'} in: {expr}")
    (at, operator), = found
    rhs = expr[at + len(operator):].strip()
    if re.match(r"bool\b", rhs):
        raise ValueError(f"`{operator} bool` returns 0/1 for every series instead of filtering: "
                         f"{expr}")
    return expr[:at].strip(), operator, rhs


def alert_signals(path: Path = ALERTS_FILE) -> list[Query]:
    """Each alert's signal: its expression left of the comparison, a query that returns data
    whenever the alert's subject (a trial, an app, a node) exists."""
    return [Query(f"{path.name}: {rule['alert']}", split_comparison(rule["expr"])[0])
            for rule in alert_rules(path)]


def metric_names(expr: str) -> set[str]:
    """The `ray_...` metric names an expression selects (label values in strings are skipped)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _binary(name: str) -> Path | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin")
    return Path(found) if found else None


def find_prometheus() -> Path | None:
    """The prometheus server binary (Debian/Ubuntu package `prometheus`), if installed."""
    return _binary("prometheus")


def find_promtool() -> Path | None:
    """promtool, shipped with the prometheus package, if installed."""
    return _binary("promtool")


def promtool(*args: str, cwd: Path = DASHBOARDS_DIR) -> subprocess.CompletedProcess[str]:
    """Run promtool (e.g. `promtool("test", "rules", "alerts_test.yaml")`), output captured."""
    binary = find_promtool()
    if binary is None:
        raise FileNotFoundError("promtool is not installed (apt-get install prometheus)")
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def prometheus_config(sd_file: Path, rule_file: Path, scrape_interval_s: float) -> dict[str, Any]:
    """dashboards/prometheus.yml with another service-discovery file, rule file and interval."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    interval = f"{round(scrape_interval_s * 1000)}ms"
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(rule_file)]
    for scrape in config["scrape_configs"]:
        for discovery in scrape["file_sd_configs"]:
            discovery["files"] = [str(sd_file)]
            discovery["refresh_interval"] = interval
    return config


@contextlib.contextmanager
def running_prometheus(sd_file: Path, workdir: Path, scrape_interval_s: float = 1,
                       ready_timeout_s: float = 60) -> Iterator[str]:
    """A Prometheus that scrapes the targets in `sd_file` and evaluates dashboards/alerts.yaml,
    storing into `workdir`; yields its base URL and stops it on exit."""
    binary = find_prometheus()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
    rule_file = workdir / ALERTS_FILE.name
    shutil.copyfile(ALERTS_FILE, rule_file)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(sd_file, rule_file, scrape_interval_s)))
    address, log_file = f"127.0.0.1:{free_port()}", workdir / "prometheus.log"
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [str(binary), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={address}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"http://{address}", process, log_file, ready_timeout_s)
            yield f"http://{address}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"prometheus at {url} not ready after {timeout_s} s:\n{log.read_text()}")


class PromQLError(RuntimeError):
    """Prometheus rejected a query; the message carries its error."""


def query_range(base_url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """The `result` of /api/v1/query_range: one {"metric": labels, "values": [[t, "v"], ...]}
    per series. Raises PromQLError with Prometheus' message for a bad query."""
    response = requests.get(f"{base_url}/api/v1/query_range", timeout=30, params={
        "query": expr, "start": start, "end": end, "step": step})
    body = response.json()
    if body.get("status") != "success":
        raise PromQLError(f"{body.get('errorType')}: {body.get('error')} in: {expr}")
    return body["data"]["result"]
