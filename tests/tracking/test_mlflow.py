"""Tracking in MLflow: one tiny job logged to a real `mlflow server` (sqlite backend, artifacts
in a temporary folder, 127.0.0.1, stopped by its process group), then the same run directory
logged to a server that is down (one warning, no error) and to the default local database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml
from conftest import free_port, tiny_spec
from processes import VENV_BIN

from orchestrator.pipeline import run_pipeline
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, SpecError, parse_spec
from orchestrator.tracking import RUN_DIR_TAG, TRIAL_TAG, Tracker, tracking_uri

LRS = [0.003, 0.01]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` as a user starts it, one worker (no job runner: it needs huey; no
    telemetry: nothing leaves this machine)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - the server writes it until the end
    process = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its group: the server and its uvicorn worker
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def tracked(ray_local, mlflow_server: str, tmp_path_factory) -> tuple[dict, list[str]]:
    """A tiny classifier job of two trials (one per learning rate), tracked in the server."""
    raw = tiny_spec("classifier", sweep={"num_samples": 1, "space": {"train.lr": {"grid": LRS}}},
                    serve={"enabled": False},
                    tracking={"mlflow": {"uri": mlflow_server, "experiment": "tracked"}})
    raw["runs_dir"] = str(tmp_path_factory.mktemp("tracked-runs"))
    lines: list[str] = []
    return run_pipeline(parse_spec(raw), say=lines.append), lines


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _check_tracked(uri: str, experiment: str, report: dict) -> None:
    """The parent run, a child per trial with every report by step, the artifacts, the digests
    and the registered winner with its metrics, as `uri` holds them."""
    client = _client(uri)
    run_dir = Path(report["run_dir"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              f"tags.`{RUN_DIR_TAG}` = '{run_dir}'")
    assert len(runs) == 1
    parent = runs[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_dir.name
    assert parent.data.params["train.max_steps"] == "20"
    assert parent.data.params["sweep.space.train.lr.grid"] == "[0.003, 0.01]"
    test = report["evaluation"]["test"]
    assert parent.data.metrics["test_accuracy"] == pytest.approx(test["model"]["accuracy"])
    assert parent.data.metrics["test_reference_accuracy"] == \
        pytest.approx(test["reference"]["accuracy"])
    assert parent.data.tags["data.test_digest"] == test["text"]["digest"]
    assert parent.data.tags["data.val_digest"] == report["evaluation"]["val"]["text"]["digest"]
    assert len(parent.data.tags["tokenizer.sha256"]) == 16
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"report.json", "report.md", "spec.yaml", "plots"} <= artifacts

    history = pd.read_parquet(run_dir / "sweep" / "history.parquet")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags[TRIAL_TAG] for c in children) == \
        sorted(t["trial_id"] for t in report["trials"])
    assert sorted(float(c.data.params["train.lr"]) for c in children) == LRS
    for child in children:
        assert child.info.status == "FINISHED"
        reports = history[history["trial_id"] == child.data.tags[TRIAL_TAG]].sort_values("step")
        assert reports["step"].tolist() == [10, 20]
        for name in ("val_accuracy", "val_loss", "train_loss"):
            logged = sorted(client.get_metric_history(child.info.run_id, name),
                            key=lambda m: m.step)
            assert [m.step for m in logged] == [10, 20], name
            assert [m.value for m in logged] == pytest.approx(reports[name].tolist()), name

    versions = client.search_model_versions(f"name = '{report['name']}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.run_id == parent.info.run_id and version.status == "READY"
    assert float(version.tags["test_accuracy"]) == pytest.approx(test["model"]["accuracy"])
    model = client.search_logged_models([parent.info.experiment_id])[0]
    assert model.source_run_id == parent.info.run_id
    assert [m.model_id for m in client.get_run(parent.info.run_id).outputs.model_outputs] == \
        [model.model_id]
    assert model.tags[TRIAL_TAG] == report["winner"]["trial_id"]
    assert {m.key: m.value for m in model.metrics}["test_accuracy"] == \
        pytest.approx(test["model"]["accuracy"])
    bundle = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert {"model.pt", "tokenizer.json", "spec.yaml", "metrics.json"} <= bundle
    assert version.source == model.artifact_location


def test_a_job_is_tracked_in_a_real_mlflow_server(tracked, mlflow_server) -> None:
    report, lines = tracked
    assert not [line for line in lines if "warning" in line]
    _check_tracked(mlflow_server, "tracked", report)


def _spec_of(run_dir: Path, mlflow: dict) -> JobSpec:
    """The run's own spec with `tracking.mlflow` set to `mlflow`."""
    raw = yaml.safe_load((run_dir / "spec.yaml").read_text())
    return parse_spec({**raw, "tracking": {"mlflow": mlflow}})


def test_a_server_that_is_down_is_one_warning_and_no_error(tracked) -> None:
    run_dir = Path(tracked[0]["run_dir"])
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lines: list[str] = []
    tracker = Tracker.for_job(_spec_of(run_dir, {"uri": down}), RunDir.open(run_dir),
                              lines.append)
    tracker.log_sweep()
    tracker.log_result()
    assert len(lines) == 1 and lines[0].startswith("warning: tracking in MLflow")
    assert f"no MLflow server answers at {down}" in lines[0]


def test_by_default_a_sqlite_database_beside_the_run_directories(tracked, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    report = tracked[0]
    run_dir = RunDir.open(report["run_dir"])
    spec = _spec_of(Path(run_dir.uri), {})
    uri = tracking_uri(spec, run_dir)
    assert uri == f"sqlite:///{Path(run_dir.uri).parent / 'mlflow.db'}"
    lines: list[str] = []
    for _ in range(2):  # a second pass (a resumed driver) adds nothing
        tracker = Tracker.for_job(spec, run_dir, lines.append)
        tracker.log_sweep()
        tracker.log_result()
    assert lines == []
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # nothing sent to MLflow's servers
    _check_tracked(uri, report["name"], report)
    assert (Path(run_dir.uri).parent / "mlartifacts").is_dir()


@pytest.mark.parametrize(("mlflow", "runs_dir", "error"), [
    ({"uri": "./mlruns"}, "runs", r"tracking.mlflow.uri = './mlruns': use http\(s\)://HOST"),
    ({"uri": "file:///tmp/mlruns"}, "runs", r"MLflow's file store\) is refused"),
    ({"uri": "http://"}, "runs", r"tracking.mlflow.uri = 'http://'"),
    ({"uri": "sqlite:///"}, "runs", r"sqlite:///PATH"),
    ({"experiment": ""}, "runs", r"tracking.mlflow.experiment = '': String should have"),
    ({"experiment": " x"}, "runs", r"neither starts nor ends with whitespace"),
    ({"url": "http://x"}, "runs", r"tracking.mlflow.url = 'http://x': unknown key"),
    ({}, "s3://bucket/runs", r"tracking.mlflow.uri is unset and runs_dir = 's3://bucket/runs'"),
])
def test_a_tracking_section_that_cannot_work_is_refused_naming_the_field(
        mlflow: dict, runs_dir: str, error: str) -> None:
    with pytest.raises(SpecError, match=error):
        parse_spec({**tiny_spec("gpt", tracking={"mlflow": mlflow}), "runs_dir": runs_dir})


def test_tracking_is_off_unless_asked_and_accepts_a_server_or_a_database() -> None:
    assert parse_spec(tiny_spec("gpt")).tracking.mlflow is None
    server = parse_spec(tiny_spec("gpt", tracking={"mlflow": {"uri": "https://mlflow.example/"}}))
    assert server.tracking.mlflow.uri == "https://mlflow.example"
    database = parse_spec(tiny_spec("gpt", tracking={"mlflow": {"uri": "sqlite:////x/m.db"}}))
    assert tracking_uri(database, RunDir.at("/runs/job-1")) == "sqlite:////x/m.db"
