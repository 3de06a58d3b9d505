"""Serve's HAProxy ingress with its throughput-optimized mode (`serve.ingress: haproxy`), end to
end on a real `ray start --head` started with the mode's variables, as a cluster's nodes must be:
two models deployed side by side answer through the front by `model` and at their own routes,
`deploy` says which ingress serves, and undeploying one leaves the other serving.

HAProxy's files go under this test's directory (Ray's default is one fixed folder in /tmp, which
two clusters on a machine would share). In this mode Ray binds the replicas' own HTTP ports to
all interfaces (so that HAProxy on other nodes reaches them); the test talks to 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import REPO, SAMPLE, free_port, tiny_spec
from heads import CLI_TIMEOUT_S, Head, running_head
from processes import base_env

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve.ingress import Ingress, environment
from orchestrator.spec import parse_spec

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
             "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 49)}
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


def bundle(tmp_path: Path, family: str, name: str, port: int) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    spec = parse_spec({**tiny_spec(family, serve={"port": port, "ingress": "haproxy"}),
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
    gone = requests.post(f"{front}/v1/classify", json={"model": "sorter", "input": ["x"]},
                         timeout=TIMEOUT_S)
    assert gone.status_code == 404
    after = requests.post(f"{front}/writer/v1/completions", json=completion, timeout=TIMEOUT_S)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == \
        texts[front].json()["choices"][0]["text"]
