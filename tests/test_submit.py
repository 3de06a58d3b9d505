"""Where a submitted job's results go, decided before anything is uploaded, and which Ray each
command reaches: the thin client's choices without a cluster (the whole path on a real head is in
tests/e2e/test_submission.py), a dead address, and a stale `ray_current_cluster`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, free_port
from processes import base_env

from orchestrator.runner import check_answers
from orchestrator.spec import SpecError
from orchestrator.submit import (
    DEFAULT_RUNS_BASE,
    JOB_CONFIG_ENV,
    RUNS_DIR_ENV,
    _entrypoint,
    runs_dir_in_submitted_job,
    submission_runs_dir,
)

REMOTE = "http://203.0.113.9:8265"  # TEST-NET-3: never this machine
LOCAL = "http://127.0.0.1:8265"


@pytest.fixture(autouse=True)
def no_runs_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUNS_DIR_ENV, raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)


def test_a_relative_runs_dir_goes_under_the_submitted_folder_for_a_head_on_this_machine(
        tmp_path: Path) -> None:
    assert submission_runs_dir("runs", LOCAL, tmp_path) == str(tmp_path / "runs")
    assert submission_runs_dir("runs", "http://localhost:8265", tmp_path) == str(tmp_path / "runs")


def test_a_relative_runs_dir_for_a_remote_head_is_refused_naming_the_settings(
        tmp_path: Path) -> None:
    with pytest.raises(SpecError) as refused:
        submission_runs_dir("runs", REMOTE, tmp_path)
    assert "runs_dir = 'runs' is relative" in str(refused.value)
    assert RUNS_DIR_ENV in str(refused.value) and "s3://" in str(refused.value)


def test_uris_and_absolute_paths_are_kept_and_the_base_setting_places_relative_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert submission_runs_dir("s3://bucket/runs", REMOTE, tmp_path) == "s3://bucket/runs"
    assert submission_runs_dir("/data/runs", REMOTE, tmp_path) == "/data/runs"
    monkeypatch.setenv(RUNS_DIR_ENV, "s3://team-bucket/orchestrator/")
    assert submission_runs_dir("runs", REMOTE, tmp_path) == "s3://team-bucket/orchestrator/runs"


def test_a_job_started_by_ray_job_submit_keeps_a_relative_runs_dir_out_of_rays_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert runs_dir_in_submitted_job("runs") is None  # not a submitted job: runs_dir as given
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"metadata": {"job_submission_id": "x"}}))
    assert runs_dir_in_submitted_job("runs") == str(Path(DEFAULT_RUNS_BASE).expanduser() / "runs")
    assert runs_dir_in_submitted_job("s3://bucket/runs") is None
    monkeypatch.setenv(RUNS_DIR_ENV, "/shared/results")
    assert runs_dir_in_submitted_job("runs") == "/shared/results/runs"


def test_the_entrypoint_names_the_run_directory_submit_chose(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text((REPO / "jobs" / "quickstart.yaml").read_text())
    command = _entrypoint(Path("job.yaml"), tmp_path, ["train.lr=0.01"], "/data/runs/job-1")
    assert command == ("python -m orchestrator run job.yaml --set train.lr=0.01 "
                       "--run-dir /data/runs/job-1")


def test_an_address_where_no_ray_answers_fails_in_one_line(tmp_path: Path) -> None:
    """Ray's own connect retries a dead address for minutes, saying nothing on the console."""
    dead = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(REPO / "jobs" / "quickstart.yaml"),
         "--address", dead], cwd=tmp_path, env=base_env(), capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"the Ray cluster at {dead} does not answer" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_jobs_api_url_in_ray_address_is_refused_naming_submit(tmp_path: Path) -> None:
    """`ray job submit` users export RAY_ADDRESS=http://HEAD:8265; a command that joins the
    cluster says at once that the URL is for `orchestrator submit`, and where its GCS is."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(REPO / "jobs" / "quickstart.yaml")],
        cwd=tmp_path, env=base_env(RAY_ADDRESS=LOCAL), capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {LOCAL} is a dashboard (Jobs API) URL: `orchestrator submit "
                           f"--address {LOCAL} SPEC`"), last
    assert "--address 127.0.0.1:6379" in last and "RAY_ADDRESS" in last, last
    assert "Traceback" not in result.stderr


def test_an_address_given_on_the_command_line_wins_over_ray_address(tmp_path: Path) -> None:
    """As for `run`, for the commands that never embed a Ray (`services`, `undeploy`)."""
    given, exported = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "orchestrator", "services", "--address", given],
                            cwd=tmp_path, env=base_env(RAY_ADDRESS=exported), capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"the Ray cluster at {given} does not answer" in result.stderr, result.stderr[-2000:]


def test_a_port_that_answers_http_is_refused_at_once_as_not_a_gcs() -> None:
    """The dashboard's port given for the GCS's: Ray's join would retry it for minutes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConnectionError, match=re.escape(
                f"{address} answers HTTP, as the dashboard (Jobs API) does, not gRPC as a GCS "
                f"does: `orchestrator submit --address http://{address} SPEC`")):
            check_answers(address)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.ray
def test_without_an_address_a_command_starts_its_own_ray_whatever_ray_remembers() -> None:
    """A head that died without `ray stop` leaves its address in ray_current_cluster; a command
    without --address must not try to join it (it hung, silent, for minutes)."""
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths
    try:
        (temp / "ray").mkdir()
        dead = f"127.0.0.1:{free_port()}"
        (temp / "ray" / "ray_current_cluster").write_text(dead)
        code = ("import ray\nfrom orchestrator.runner import connect\n"
                "assert connect()\nprint('joined', ray.get_runtime_context().gcs_address)\n"
                "ray.shutdown()")
        env = base_env(RAY_TMPDIR=str(temp))
        env.pop("RAY_ADDRESS", None)
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Ray: a local Ray embedded in this command" in result.stdout
        assert "joined" in result.stdout and dead not in result.stdout
    finally:
        shutil.rmtree(temp, ignore_errors=True)
