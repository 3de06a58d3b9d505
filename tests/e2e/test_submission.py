"""End to end: a real `ray start --head` with token auth, real job submissions, real HTTP.

One head per module (heads.py), with its own freshly generated token.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import prom
import pytest
import requests
from conftest import REPO, TIMING, stage_times
from heads import CLI_TIMEOUT_S, SHRINK, Head, ray_cli, running_head
from processes import base_env

from orchestrator.submit import EXCLUDES, RESULT_MARKER

pytestmark = pytest.mark.e2e

# Limits sized for a machine at half the speed of the fastest we get, inside the whole suite:
# the quickstart job below did not end in 300 s there. Reaching one is a failure that says
# where the job was; pytest-timeout's global limit (pyproject.toml) is only the last resort.
JOB_TIMEOUT_S = 720
SERVICE_KEY = "e2e-service-key-0123456789abcdef"
QUOTA_PER_MINUTE = 12  # the job's 2 sample requests and the traffic's 6 fit; a dozen more do not


def failure_excerpt(text: str, size: int = 4000) -> str:
    """The first Python traceback in a failed job's output (the cause; Ray's C++ stack dumps
    that follow it fill any tail), else the output's end."""
    start = text.find("Traceback (most recent call last)")
    return text[start:start + size] if start >= 0 else text[-size:]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    with running_head() as cluster:
        yield cluster


@dataclass(frozen=True)
class Prometheus:
    url: str
    started: float  # when it began scraping: the start of every range query


@pytest.fixture(scope="module")
def prometheus(head: Head) -> Iterator[Prometheus]:
    """A real Prometheus scraping this head through Ray's service-discovery file, as
    dashboards/prometheus.yml does, every second, with dashboards/alerts.yaml loaded."""
    workdir = head.root / "prometheus"
    workdir.mkdir()
    sd_file = head.root / "ray" / "prom_metrics_service_discovery.json"
    with prom.running_prometheus(sd_file, workdir) as url:
        yield Prometheus(url, time.time())


def result_line(logs: str) -> dict:
    lines = [line for line in logs.splitlines() if line.startswith(RESULT_MARKER)]
    assert lines, f"no result line in the job's logs:\n{logs[-4000:]}"
    return json.loads(lines[-1].removeprefix(RESULT_MARKER))


def check_report(report: dict, head: Head, served: bool = True) -> None:
    """The whole pipeline ran: a 2-trial sweep, a winner, and (if served) the service answered."""
    print(f"{report['name']}: stage seconds {report['stage_seconds']}")
    assert len(report["trials"]) >= 2
    stages = {"data", "sweep", "select", "evaluate"} | ({"deploy"} if served else set())
    assert set(report["stage_seconds"]) == stages
    if served:
        assert report["sample_responses"], "the service was never called"
        assert all(sample["status"] == 200 for sample in report["sample_responses"])
    assert Path(report["run_dir"]).is_relative_to(head.root)
    assert not Path(report["run_dir"]).is_relative_to(head.root / "ray")  # not Ray's temp folder
    assert (Path(report["run_dir"]) / "report.json").is_file()
    markdown = (Path(report["run_dir"]) / "report.md").read_text()
    for plot in ("learning_curves.png", "sweep_results.png", "winner_perplexity.png"):
        assert (Path(report["run_dir"]) / "plots" / plot).is_file(), plot
        assert f"(plots/{plot})" in markdown, plot


# --- refusals: cheap, so first ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/jobs/", "/api/v0/nodes", "/api/cluster_status"])
def test_dashboard_api_answers_401_without_token_and_403_with_a_wrong_one(
        head: Head, path: str) -> None:
    """The Jobs API, the state API (`ray list nodes`) and the dashboard's cluster status."""
    url = f"{head.dashboard}{path}"
    assert requests.get(url, timeout=30).status_code == 401
    wrong = {"Authorization": f"Bearer {'0' * 64}"}
    assert requests.get(url, headers=wrong, timeout=30).status_code == 403
    answer = requests.get(url, headers=head.auth(), timeout=30)
    assert answer.status_code == 200, answer.text[:500]


@pytest.mark.parametrize("case", ["auth-mode-off", "token-file-missing", "wrong-token"])
def test_ray_job_submit_without_the_token_is_refused(head: Head, case: str) -> None:
    empty_home = head.root / f"home-{case}"  # so that no ~/.ray/auth_token can be found
    empty_home.mkdir()
    wrong = head.root / "wrong_token"
    wrong.write_text("f" * 64)
    extra = {
        "auth-mode-off": {},
        "token-file-missing": {"RAY_AUTH_MODE": "token",
                               "RAY_AUTH_TOKEN_PATH": str(head.root / "no_such_token")},
        "wrong-token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
    }[case]
    submission_id = f"e2e-refused-{case}-{uuid.uuid4().hex[:6]}"
    refused = ray_cli("job", "submit", "--address", head.dashboard,
                      "--submission-id", submission_id, "--no-wait", "--",
                      "python", "-c", "print('should never run')",
                      env=base_env(HOME=str(empty_home), **extra))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "Authentication" in output or "authentication" in output, output
    assert submission_id not in {job.submission_id for job in head.client().list_jobs()}


def test_sdk_with_a_wrong_token_is_refused(head: Head) -> None:
    from ray.exceptions import AuthenticationError

    import orchestrator

    with pytest.raises(AuthenticationError, match="Authentication failed"):
        orchestrator.submit("jobs/quickstart.yaml", head.dashboard, working_dir=REPO,
                            token="0" * 64)


def test_sdk_without_a_token_is_refused(head: Head) -> None:
    """In a fresh process (Ray keeps a token it has loaded once, as this one's ray_local did),
    with no token anywhere: no RAY_AUTH_* variables and no ~/.ray/auth_token."""
    code = ("import orchestrator, ray.exceptions\n"
            "try:\n"
            f"    orchestrator.submit('jobs/quickstart.yaml', {head.dashboard!r}, working_dir='.')\n"
            "except ray.exceptions.AuthenticationError as error:\n"
            "    print('refused:', error)\n")
    refused = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, timeout=CLI_TIMEOUT_S, check=False,
                             env=base_env(HOME=str(head.root / "home-sdk")))
    assert refused.returncode == 0, refused.stderr[-3000:]
    assert refused.stdout.startswith("refused:") and "Authentication required" in refused.stdout


def test_orchestrator_submit_rejects_a_bad_spec_before_contacting_a_cluster(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on 127.0.0.1: nothing listens, so any contact would be a connection error.
    bad = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "jobs/quickstart.yaml",
         "--set", "train.max_steps=-1", "--address", "http://127.0.0.1:9"],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "invalid job spec" in bad.stderr and "train.max_steps" in bad.stderr
    assert "Traceback" not in bad.stderr and "connect" not in bad.stderr

    from orchestrator.cli import main

    assert main(["submit", str(tmp_path / "nope.yaml"), "--address", "http://127.0.0.1:9"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_entrypoint_names_specs_in_the_tree_and_carries_the_others(tmp_path: Path) -> None:
    """Ray's upload skips what .gitignore lists, so only a spec file in the uploaded tree is
    named by path; a JobSpec or an outside file travels inside the command (no cluster here)."""
    from orchestrator.spec import load_spec, spec_to_yaml
    from orchestrator.submit import _entrypoint

    assert _entrypoint("jobs/quickstart.yaml", REPO, ["train.lr=0.001"], "/runs/job-1") == (
        "python -m orchestrator run jobs/quickstart.yaml --set train.lr=0.001 "
        "--run-dir /runs/job-1")
    tricky = 'serve.sample_requests=["it\'s $HOME `id` \\\\n"]'  # quotes, $, backticks
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [tricky])
    assert spec.serve.sample_requests == ["it's $HOME `id` \\n"]
    outside = tmp_path / "spec.yaml"
    outside.write_text(spec_to_yaml(spec))
    for command in (_entrypoint(spec, REPO, [], "/runs/job-1"),
                    _entrypoint(outside, REPO, [], "/runs/job-1")):
        # Run the real shell command with `cat` standing in for the CLI: the spec round-trips.
        assert " --run-dir /runs/job-1;" in command
        shown = subprocess.run(
            ["/bin/sh", "-c", command.replace("python -m orchestrator run", "cat")
                                     .replace(" --run-dir /runs/job-1", "")],
            cwd=tmp_path, capture_output=True, text=True, check=True)
        assert shown.stdout == spec_to_yaml(spec)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_orchestrator_submit_without_token_fails_cleanly(head: Head) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "jobs/quickstart.yaml",
         "--address", head.dashboard, "--no-wait"],
        cwd=REPO, env=base_env(HOME=str(head.root / "home-orchestrator-cli")),
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "error:" in refused.stderr and "Authentication required" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("token", ["none", "wrong", "right"])
def test_orchestrator_services_joins_the_token_head_only_with_its_token(head: Head,
                                                                        token: str) -> None:
    """A command that joins the cluster (`services`, as `run`, `deploy`, `predict` and
    `compress` with --address do): refused in one line naming RAY_AUTH_TOKEN without the
    token or with a wrong one (a wrong one at the GCS's first refusal, not after Ray's own 20
    retries of the join); with it, it answers."""
    home = head.root / f"home-services-{token}"  # no ~/.ray/auth_token to find
    home.mkdir()
    env = base_env(HOME=str(home), RAY_AUTH_MODE="token")
    if token != "none":
        env["RAY_AUTH_TOKEN"] = head.token if token == "right" else "f" * 64
    result = subprocess.run([sys.executable, "-m", "orchestrator", "services", "--address",
                             head.gcs], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S, check=False)
    if token == "right":
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.startswith(("no application", "model")), result.stdout
        return
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]  # Ray's core may log its own warning before it
    assert last.startswith(f"error: the Ray cluster at {head.gcs}") and "RAY_AUTH_TOKEN" in last
    if token == "wrong":  # said at the GCS's first refusal, not after Ray's 20 retries
        assert "its auth token is wrong or missing" in last, last
    assert "Traceback" not in result.stderr, result.stderr


def test_a_command_given_the_dashboards_port_for_the_gcs_is_refused_at_once(head: Head) -> None:
    """The real dashboard (auth on: it answers 401, still HTTP) given where the GCS goes: one
    line naming `orchestrator submit` and the GCS, not Ray's join retrying for minutes."""
    dashboard = head.dashboard.removeprefix("http://")
    env = base_env(HOME=str(head.root / "home-services-dashboard"), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=head.token)
    result = subprocess.run([sys.executable, "-m", "orchestrator", "services", "--address",
                             dashboard], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S, check=False)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {dashboard} answers HTTP, as the dashboard (Jobs API) does"), last
    assert f"`orchestrator submit --address {head.dashboard} SPEC`" in last, last
    assert "Traceback" not in result.stderr, result.stderr


# --- whole pipeline ----------------------------------------------------------------------------


def test_ray_job_submit_uploads_the_tree_and_runs_our_cli(head: Head) -> None:
    """The documented client path: `ray job submit --working-dir . -- python -m orchestrator ...`
    with the token. The entrypoint only validates the spec: the whole pipeline runs in the SDK
    test below, through the same Jobs API and the same `python -m orchestrator run` entrypoint."""
    submission_id = f"e2e-cli-{uuid.uuid4().hex[:8]}"
    overrides = [arg for override in head.shrink("e2e-cli") for arg in ("--set", override)]
    submitted = ray_cli(
        "job", "submit", "--address", head.dashboard, "--submission-id", submission_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", "python", "-m", "orchestrator", "validate", "jobs/quickstart.yaml", *overrides,
        env=base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token,
                     HOME=str(head.root / "home-cli")),
        timeout=JOB_TIMEOUT_S)
    output = submitted.stdout + submitted.stderr
    client = head.client()
    assert str(client.get_job_status(submission_id).value) == "SUCCEEDED", failure_excerpt(
        client.get_job_logs(submission_id) + output)
    assert submitted.returncode == 0, failure_excerpt(output)
    logs = client.get_job_logs(submission_id)
    assert "jobs/quickstart.yaml: valid" in logs and "name: e2e-cli" in logs, logs[-2000:]


def test_ray_job_submit_of_a_run_keeps_its_results_out_of_rays_copy(head: Head) -> None:
    """`ray job submit -- python -m orchestrator run jobs/quickstart.yaml` with the shipped
    relative runs_dir: the job says where its run directories go (ORCHESTRATOR_RUNS_DIR, set
    cluster-wide; here in the job's runtime env) and creates its run directory there, not in Ray's
    copy of the working directory. The job is made to fail in its data stage (a column the data
    lacks), after the run directory exists: the whole pipeline runs in the SDK test."""
    submission_id = f"e2e-cli-run-{uuid.uuid4().hex[:8]}"
    results = head.root / "cli-run-results"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"ORCHESTRATOR_RUNS_DIR": str(results)}}
    submitted = ray_cli(
        "job", "submit", "--address", head.dashboard, "--submission-id", submission_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "orchestrator", "run", "jobs/quickstart.yaml",
        "--set", "name=e2e-cli-run", "--set", "data.text_column=no_such_column",
        env=base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token,
                     HOME=str(head.root / "home-cli-run")),
        timeout=JOB_TIMEOUT_S)
    logs = head.client().get_job_logs(submission_id)
    assert str(head.client().get_job_status(submission_id).value) == "FAILED", logs[-3000:]
    assert submitted.returncode != 0
    assert f"run directories go under {results / 'runs'}" in logs, logs[-3000:]
    assert "no_such_column" in logs
    made = list((results / "runs").glob("e2e-cli-run-*"))
    assert len(made) == 1 and (made[0] / "spec.yaml").is_file(), made
    copies = (head.root / "ray").glob("session_*/runtime_resources/working_dir_files/*/runs")
    assert not list(copies)


def stage_lines(logs: str) -> list[str]:
    """The job's progress lines (`[2/5 sweep] ...`): how far it got."""
    return [line for line in logs.splitlines() if re.match(r"\[\d+/\d+ \w+\]", line)]


class ProgressClock(threading.Thread):
    """Reads a job's logs every poll_s and notes when each progress line first showed (seconds
    since `started`): where a job that runs out of time spent it. Its logs carry no times."""

    def __init__(self, job, started: float, poll_s: float = 5.0):
        super().__init__(daemon=True)
        self.job, self.started, self.poll_s = job, started, poll_s
        self.seen: dict[str, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                logs = self.job.logs()
            except (requests.RequestException, RuntimeError):  # a busy dashboard: next poll
                continue
            for line in stage_lines(logs):
                self.seen.setdefault(line, time.monotonic() - self.started)

    def stop(self) -> list[str]:
        """The progress lines seen, each after the second it was first seen by."""
        self.stopped.set()
        self.join(timeout=30)
        return [f"by {seconds:4.0f} s: {line}" for line, seconds in self.seen.items()]


def failed_tasks(head: Head, job_id: str) -> dict[str, int]:
    """The job's tasks that ended FAILED, by name, from the state API (the dashboard's job page
    counts the same)."""
    answer = requests.get(f"{head.dashboard}/api/v0/tasks/summarize", headers=head.auth(),
                          params={"filter_keys": "job_id", "filter_predicates": "=",
                                  "filter_values": job_id}, timeout=60)
    answer.raise_for_status()
    summary = answer.json()["data"]["result"]["result"]["node_id_to_summary"]["cluster"]["summary"]
    return {name: row["state_counts"].get("FAILED", 0) for name, row in summary.items()
            if row["state_counts"].get("FAILED", 0)}


@pytest.mark.timeout(JOB_TIMEOUT_S + 300)  # so that JOB_TIMEOUT_S, with its message, comes first
def test_sdk_submit_runs_the_quickstart_and_returns_results(
        head: Head, prometheus: Prometheus, record_property, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline through our SDK: data, a 2-trial sweep, select, evaluate, deploy. The
    shipped spec's relative runs_dir goes under ORCHESTRATOR_RUNS_DIR, decided and said before
    the upload, named in the Jobs API's metadata, and outlives Ray's copy of the working
    directory. The service stays up for the metrics test that follows; Prometheus watches all of
    it. Its wall time and stage times are printed in the run's summary."""
    import orchestrator
    from orchestrator.spec import load_spec
    from orchestrator.submit import RUNS_DIR_ENV

    label = "e2e quickstart (SDK job, 2 trials)"
    keys = head.root / "service-keys.txt"  # the service keys its callers; the usage panels
    keys.write_text(f"{SERVICE_KEY}\n")   # and the quota alert watch them
    spec = load_spec(REPO / "jobs" / "quickstart.yaml",
                     [*SHRINK, "name=e2e-sdk", f"serve.port={head.serve_port}",
                      "serve.keep_running=true", f"serve.api_keys_file={keys}",
                      f"serve.quotas={{default: {{requests_per_minute: {QUOTA_PER_MINUTE}}}}}"])
    assert spec.runs_dir == "runs"  # the shipped spec's, unchanged
    monkeypatch.setenv(RUNS_DIR_ENV, str(head.root / "results"))
    said: list[str] = []
    started = time.monotonic()
    job = orchestrator.submit(spec, head.dashboard, working_dir=REPO, token=head.token,
                              say=said.append)
    assert job.run_dir is not None and said == [f"run directory: {job.run_dir}"]
    assert Path(job.run_dir).parent == head.root / "results" / "runs"
    info = head.client().get_job_info(job.job_id)
    assert info.metadata["job_name"] == Path(job.run_dir).name
    assert info.metadata["job_name"].startswith("e2e-sdk-")
    assert info.metadata["run_dir"] == job.run_dir and info.metadata["spec_sha256"]
    clock = ProgressClock(job, started)
    clock.start()
    try:
        status = job.wait(timeout_s=JOB_TIMEOUT_S)
    except TimeoutError:
        progress, logs = clock.stop(), job.logs()
        last = progress[-1] if progress else "no stage started"
        record_property(TIMING, f"{label}: not done after {time.monotonic() - started:.0f} s; "
                                f"last progress {last}")
        head.client().stop_job(job.job_id)  # its CPUs go back to the tests that follow
        pytest.fail(f"the quickstart job did not end in {JOB_TIMEOUT_S} s; its progress:\n"
                    + "\n".join(progress[-20:]) + f"\nits output's end:\n{logs[-3000:]}")
    finally:
        clock.stop()
    seconds = time.monotonic() - started
    if status != "SUCCEEDED":
        record_property(TIMING, f"{label}: {status} after {seconds:.0f} s")
    assert status == "SUCCEEDED", failure_excerpt(job.logs())
    report = job.report()
    record_property(TIMING, stage_times(label, seconds, report))
    check_report(report, head)
    assert report["run_dir"] == job.run_dir
    results = job.results()
    assert len(results) == 2
    config_columns = [c for c in results.columns if c.startswith("config/")]
    assert {"config/train.optimizer", "config/train.lr", "config/train.weight_decay"} <= set(
        config_columns)
    assert "best_val_loss" in results.columns
    assert results["best_val_loss"].notna().all() and (results["best_val_loss"] > 0).all()

    # Ray's copy of the uploaded folder is a cache: the results do not live there.
    copies = [path for path in (head.root / "ray").glob(
        "session_*/runtime_resources/working_dir_files/*") if path.is_dir()]
    assert copies
    for copy in copies:  # Ray may be removing it too, once the job is over
        shutil.rmtree(copy, ignore_errors=True)
    fetched = job.download(tmp_path / "fetched")
    assert json.loads((fetched / "report.json").read_text())["run_dir"] == job.run_dir
    assert (fetched / "winner" / "model.pt").is_file()
    ray_job_id = head.client().get_job_info(job.job_id).job_id  # set once its driver started
    assert failed_tasks(head, ray_job_id) == {}


def send_service_traffic(head: Head) -> None:
    """What the serving panels need to see: plain and streamed completions, a bad request, and
    the key held at its quota (the per-key panels and the ServeKeyAtQuota alert)."""
    url = f"http://127.0.0.1:{head.serve_port}/v1/completions"
    auth = {"Authorization": f"Bearer {SERVICE_KEY}"}
    body = {"model": "e2e-sdk", "prompt": "The event loop", "max_tokens": 4}
    for _ in range(3):
        assert requests.post(url, json=body, headers=auth, timeout=60).status_code == 200
        with requests.post(url, json={**body, "stream": True}, headers=auth, stream=True,
                           timeout=60) as streamed:
            assert streamed.status_code == 200
            assert b"[DONE]" in b"".join(streamed.iter_content(None))
    assert requests.post(url, json={**body, "max_tokens": -1}, headers=auth,
                         timeout=60).status_code == 400
    statuses = [requests.post(url, json=body, headers=auth, timeout=60)
                for _ in range(QUOTA_PER_MINUTE)]  # more than the minute has left
    refused = [r for r in statuses if r.status_code == 429]
    assert refused and int(refused[0].headers["Retry-After"]) >= 1, [
        r.status_code for r in statuses]


def series_of(prometheus: Prometheus, expr: str) -> list[dict]:
    return prom.query_range(prometheus.url, expr, prometheus.started, time.time(), step=2)


def test_every_dashboard_and_alert_query_returns_data(head: Head, prometheus: Prometheus) -> None:
    """Against what Prometheus scraped from the quickstart job (data, sweep, training, serving)
    and the service it left running: every panel and every alert's signal has data; only the
    GPU metrics cannot on this CPU-only machine (they must still be valid PromQL)."""
    try:
        check_queries_return_data(head, prometheus)
    finally:  # the service's CPU goes back to the SDK test's sweep
        deleted = requests.delete(f"{head.dashboard}/api/serve/applications/",
                                  headers=head.auth(), timeout=60)
        assert deleted.ok, deleted.text


def check_queries_return_data(head: Head, prometheus: Prometheus) -> None:
    send_service_traffic(head)
    queries = prom.dashboard_queries() + prom.alert_signals()
    # Series born with this traffic (time to first token, the 429s at the end) reach Prometheus
    # through the replica's exporter, and a rate needs two scrapes of them: poll, do not sample.
    deadline = time.monotonic() + 120
    while empty := [f"{query.source}: {query.expr}" for query in queries
                    if not series_of(prometheus, query.expr)
                    and not prom.metric_names(query.expr) & prom.GPU_ONLY]:
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, f"{len(empty)} of {len(queries)} queries returned no data:\n" + "\n".join(
        empty)
    statuses = {series["metric"]["status"] for series in series_of(
        prometheus, 'sum by (status) (ray_orchestrator_serve_requests_total'
                    '{route="/v1/completions"})')}
    assert {"200", "400"} <= statuses
    finished = series_of(prometheus, 'max(ray_orchestrator_sweep_trials{state="TERMINATED"})')
    assert max(float(v) for _, v in finished[0]["values"]) == 2  # the 2-trial sweep, both done
    rules = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {rule["name"]: rule["health"] for group in rules for rule in group["rules"]}
    assert len(health) == len(prom.alert_rules()) and set(health.values()) == {"ok"}, health


def test_orchestrator_submit_with_token_submits(head: Head) -> None:
    """`orchestrator submit --token ... --no-wait` reaches the Jobs API; the job is then stopped
    (last, so that nothing it started can get in the way of the whole-pipeline tests)."""
    submitted = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "jobs/quickstart.yaml",
         *[arg for override in SHRINK for arg in ("--set", override)],
         "--address", head.dashboard, "--token", head.token, "--no-wait"],
        cwd=REPO, env=base_env(HOME=str(head.root / "home-orchestrator-cli"),
                               ORCHESTRATOR_RUNS_DIR=str(head.root / "cli-results")),
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    said = submitted.stdout.splitlines()
    assert said[0].startswith(f"run directory: {head.root / 'cli-results' / 'runs'}/quickstart-")
    job_id = submitted.stdout.split("submitted job ", 1)[1].split()[0]
    assert job_id.startswith(Path(said[0]).name)  # the dashboard's id reads as the run
    client = head.client()
    client.stop_job(job_id)
    deadline = time.monotonic() + 120
    while str(client.get_job_status(job_id).value) not in {"STOPPED", "FAILED", "SUCCEEDED"}:
        assert time.monotonic() < deadline, "the submitted job did not stop"
        time.sleep(1)
