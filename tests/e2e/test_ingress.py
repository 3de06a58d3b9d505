"""Serve's HAProxy ingress with its throughput-optimized mode (`serve.ingress: haproxy`), end to
end on a real `ray start --head` started with the mode's variables, as a cluster's nodes must be:
two models deployed side by side answer through the front by `model` and at their own routes,
`deploy` says which ingress serves, and undeploying one leaves the other serving; every
language-model test of tests/serve/test_service.py passes unchanged through HAProxy. On the same
head (no second one to start), a job beside a service that leaves it too little says what it waits
for and finishes once the service is undeployed.

HAProxy's files go under this test's directory (Ray's default is one fixed folder in /tmp, which
two clusters on a machine would share). In this mode Ray binds the replicas' own HTTP ports to
all interfaces (so that HAProxy on other nodes reaches them); the test talks to 127.0.0.1."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO, SAMPLE, TIMING, free_port, tiny_spec
from heads import CLI_TIMEOUT_S, Head, ray_cli, running_head
from processes import base_env

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
import test_service as service_tests  # its language-model tests run below, through HAProxy

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve.ingress import Ingress, environment
from orchestrator.spec import JobSpec, parse_spec

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60


def free_block(low: int, high: int, size: int = 50) -> int:
    """The first port of `size` consecutive free ones in [low, high): Serve hands replicas
    direct-ingress ports from a fixed range (30000 and 40000 up, the latter among the ports the
    kernel gives outgoing connections) without asking the kernel whether they are free."""
    for base in range(low, high, size):
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} free ports in [{low}, {high})")


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    files = Path(tempfile.mkdtemp(prefix="orch-haproxy-", dir="/tmp"))
    http, grpc = free_block(21000, 25000), free_block(25000, 29000)
    # HAProxy's stats and metrics ports are fixed too (8404, 9101): free ones, so that a second
    # cluster in this mode on the machine (a benchmark) cannot take them from this one.
    ports = {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
             "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
             "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
             "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + 49),
             "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
             "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 49),
             # A replica stopping in this mode is drained for at least 30 s by default (for
             # external load balancers to deregister it): each undeploy here took 31 s per app,
             # about 2 minutes of this module. No test here is about draining.
             "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    try:
        with running_head(**environment(Ingress.HAPROXY, files), **ports) as cluster:
            yield cluster
    finally:
        shutil.rmtree(files, ignore_errors=True)


def orchestrator_cli(head: Head, *args: str) -> subprocess.CompletedProcess[str]:
    env = base_env(HOME=str(head.root / "home-ingress"), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=head.token)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args, "--address", head.gcs],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)


def bundle(tmp_path: Path, family: str, name: str, port: int, **serve: object) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    spec = parse_spec({**tiny_spec(family, serve={"port": port, "ingress": "haproxy", **serve}),
                       "name": name})
    return initial_bundle(tmp_path / name, spec, rows)


def test_two_models_side_by_side_behind_haproxy(head: Head, tmp_path: Path) -> None:
    front = f"http://127.0.0.1:{head.serve_port}"
    for family, name in (("gpt", "writer"), ("classifier", "sorter")):
        deployed = orchestrator_cli(head, "deploy", str(bundle(tmp_path, family, name,
                                                                head.serve_port)))
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert f"at {front}/{name} (ingress: haproxy)" in deployed.stdout, deployed.stdout
        assert "note:" not in deployed.stdout  # the spec asks for the cluster's own mode

    completion = {"model": "writer", "prompt": "The event loop", "max_tokens": 4,
                  "temperature": 0}
    texts = {base: requests.post(f"{base}/v1/completions", json=completion, timeout=TIMEOUT_S)
             for base in (front, f"{front}/writer")}
    for answer in texts.values():
        assert answer.status_code == 200, answer.text
    assert len({a.json()["choices"][0]["text"] for a in texts.values()}) == 1  # one model
    for base in (front, f"{front}/sorter"):
        answer = requests.post(f"{base}/v1/classify", json={"model": "sorter", "input": ["x"]},
                               timeout=TIMEOUT_S)
        assert answer.status_code == 200, answer.text
    bad = requests.post(f"{front}/v1/completions", json={**completion, "max_tokens": -1},
                        timeout=TIMEOUT_S)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    models = requests.get(f"{front}/v1/models", timeout=TIMEOUT_S).json()["data"]
    assert {m["id"] for m in models} == {"writer", "sorter"}

    removed = orchestrator_cli(head, "undeploy", "sorter")
    assert removed.returncode == 0, removed.stderr[-3000:]
    assert "Serve drains each replica" in removed.stdout  # the wait is said, not a hang
    gone = requests.post(f"{front}/v1/classify", json={"model": "sorter", "input": ["x"]},
                         timeout=TIMEOUT_S)
    assert gone.status_code == 404
    after = requests.post(f"{front}/writer/v1/completions", json=completion, timeout=TIMEOUT_S)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == \
        texts[front].json()["choices"][0]["text"]


# --- a job beside a service that holds most of the head ------------------------------------------
# On this head too (one head less to start): nothing below depends on the ingress.

JOB_TIMEOUT_S = 600  # a tiny job on a busy 2-core machine, after its wait


def free_cpus(head: Head) -> float:
    """The head's unused CPUs, as `ray status` reports them (what this module deployed before
    holds some)."""
    status = ray_cli("status", "--address", head.gcs,
                     env=base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.token_path)))
    assert status.returncode == 0, status.stderr[-2000:]
    used, total = map(float, re.search(r"([\d.]+)/([\d.]+) CPU\b", status.stdout).groups())
    return total - used


def settled_free_cpus(head: Head, reads: int = 3, apart_s: float = 2.0) -> float:
    """free_cpus once `reads` reports in a row agree: `ray status` shows the autoscaler's view,
    which lags a service removed or deployed a moment before (CI's run read a removed model's
    CPUs as still held, and sized the test's hog half a CPU too small)."""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    seen = [free_cpus(head)]
    while len(seen) < reads or len(set(seen[-reads:])) > 1:
        assert time.monotonic() < deadline, f"the head's free CPUs never settled: {seen}"
        time.sleep(apart_s)
        seen.append(free_cpus(head))
    return seen[-1]


class Output:
    """A process's output lines (stderr with stdout), read as they come."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(process.stdout or ()),
                                       daemon=True)
        self.reader.start()

    def first(self, text: str, timeout_s: float) -> str:
        """The first line with `text`; fails with what was said when the process's output
        ends or the time runs out first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ended = not self.reader.is_alive()  # before looking: then every line is in
            if found := next((line for line in self.lines if text in line), None):
                return found
            if ended:
                break
            time.sleep(0.5)
        raise AssertionError(f"no line with {text!r}:\n{''.join(self.lines)[-4000:]}")


def test_a_job_beside_a_service_says_what_it_waits_for_and_finishes_once_it_is_undeployed(
        head: Head, tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    """The issue's case: a service holds all but half a CPU of the head; a tiny job whose trial
    fits in that half (so the plan lets it start) needs a whole CPU for Ray Data's reads. It says
    what it waits for and who holds the rest while it waits, and finishes once the service is
    undeployed."""
    hog_cpus = round(settled_free_cpus(head) - 0.5, 2)
    assert hog_cpus > 0
    deployed = orchestrator_cli(head, "deploy", str(bundle(tmp_path, "gpt", "hog", head.serve_port,
                                                           replica_cpus=hog_cpus)))
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert settled_free_cpus(head) == 0.5  # the case: half a CPU left beside the services
    spec = tmp_path / "beside.yaml"
    spec.write_text(yaml.safe_dump({
        **tiny_spec("gpt", resources={"cpus_per_worker": 0.5}, serve={"enabled": False}),
        "name": "beside", "runs_dir": str(head.root / "runs")}))
    env = base_env(HOME=str(head.root / "home-ingress"), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=head.token)
    job = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(spec),
                            "--address", head.gcs], cwd=REPO, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = Output(job)
    removed = None
    try:
        output.first("run directory:", CLI_TIMEOUT_S)
        began = time.monotonic()
        waiting = output.first("] waiting ", JOB_TIMEOUT_S)  # not "% waiting for data"
        record_property(TIMING, f"job beside a service: said {time.monotonic() - began:.0f} s "
                                f"after its run began: {waiting.strip()}")
        assert "to place a task of 1 CPU (Ray is asked for" in waiting, waiting
        assert f"0.5 of 2 CPU free (service hog-service holds {hog_cpus:g}" in waiting, waiting
        removed = orchestrator_cli(head, "undeploy", "hog")
        assert removed.returncode == 0, removed.stderr[-3000:]
        assert job.wait(timeout=JOB_TIMEOUT_S) == 0, "".join(output.lines)[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        if removed is None:  # the tests after this one need the CPUs
            orchestrator_cli(head, "undeploy", "hog")


# --- the completions tests, unchanged, through HAProxy --------------------------------------------
# Every test of tests/serve/test_service.py that calls the language model at its URL (`gpt_url`,
# or the openai `client` built on it) runs here as it is, against the same bundle and limits
# deployed on this head. Bound last: pytest runs a module's tests in the order of its names.

@pytest.fixture(scope="module")
def gpt_url(head: Head, bundles: dict[str, tuple[JobSpec, Path]]) -> Iterator[str]:
    _, bundle_dir = bundles["gpt"]
    deployed = orchestrator_cli(head, "deploy", str(bundle_dir), "--set",
                                f"serve.port={head.serve_port}", "--set", "serve.ingress=haproxy")
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = f"http://127.0.0.1:{head.serve_port}/{service_tests.GPT_NAME}"
    assert f"at {url} (ingress: haproxy)" in deployed.stdout, deployed.stdout
    yield url
    removed = orchestrator_cli(head, "undeploy", service_tests.GPT_NAME)
    assert removed.returncode == 0, removed.stderr[-3000:]


def _calls_the_language_model(test: object) -> bool:
    return callable(test) and bool({"gpt_url", "client"} & set(inspect.signature(test).parameters))


bundles, client = service_tests.bundles, service_tests.client
globals().update({name: test for name, test in vars(service_tests).items()
                  if name.startswith("test_") and _calls_the_language_model(test)})
