"""Our metrics reach Ray's Prometheus endpoint under the names the dashboards and alerts query."""

from __future__ import annotations

import time

import pytest
import requests

from orchestrator import prometheus


def scrape(ray_local) -> str:
    """The text this node's metrics exporter serves to Prometheus."""
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_every_metric_is_exported_under_its_documented_name(ray_local):
    @ray_local.remote(num_cpus=0)
    def record_everything() -> None:
        for name, spec in prometheus.METRICS.items():
            prometheus.record(name, 1.0, **{tag: f"test-{tag}" for tag in spec.tags})
        prometheus.record_training_report({"train_loss": 2.5, "val_perplexity": 11.0, "step": 3},
                                       run="test-report", trial="trial-1")
        time.sleep(1.5)  # stay alive until the exporter has taken the values (1 s interval)

    ray_local.get(record_everything.remote())
    wanted = {prometheus.exported_name(name) for name in prometheus.METRICS}
    deadline = time.monotonic() + 30
    while True:
        text = scrape(ray_local)
        series = [line for line in text.splitlines() if line.startswith("ray_orchestrator_")]
        missing = {name for name in wanted if not any(s.startswith(name + "{") for s in series)}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"never exported: {sorted(missing)}"
    assert any(s.startswith("ray_orchestrator_serve_requests_total{") and 'route="test-route"'
               in s and 'status="test-status"' in s for s in series)
    assert any(s.startswith("ray_orchestrator_train_loss{") and 'run="test-report"' in s
               and s.endswith(" 2.5") for s in series)
    assert any(s.startswith("ray_orchestrator_train_val_metric{") and
               'metric="val_perplexity"' in s and s.endswith(" 11.0") for s in series)
    assert not any('run="test-report"' in s and "_train_steps" in s for s in series)  # not a gauge


def test_switched_off_recording_does_nothing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ORCHESTRATOR_METRICS", "0")
    assert not prometheus.enabled()
    prometheus.record("serve_requests", 1, app="a", route="/r", status="200")  # no error, no metric


def test_exported_names_follow_rays_conventions():
    assert prometheus.exported_name("serve_requests") == "ray_orchestrator_serve_requests_total"
    assert prometheus.exported_name("train_loss") == "ray_orchestrator_train_loss"
    assert (prometheus.exported_name("serve_latency_seconds")
            == "ray_orchestrator_serve_latency_seconds_bucket")
