"""A run whose directory is in object storage, on a cluster whose nodes share no disk.

A real S3-compatible server (moto's) on 127.0.0.1; a `ray start --head` with no CPUs, so that
every task, trial and replica runs on the one worker node; and that worker node started inside
`unshare --mount` with its own empty tmpfs over each folder the head side writes: the head's
temporary folder, pytest's temporary folder (this test's files) and the project's runs/
directory. Only those are hidden: the checkout and its venv stay visible wherever they live
(a clone under /tmp included). What the head's driver writes there, the
worker cannot read, and the other way round: the bucket is the only place they share.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO, SAMPLE, free_port, tiny_spec
from processes import VENV_BIN, base_env, stop_marked
from s3 import S3Server, s3_server

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")]

RAY = str(VENV_BIN / "ray")
MARKER = "ORCHESTRATOR_NO_SHARED_DISK"
JOB_TIMEOUT_S = 900  # 2x what the job took on a busy 2-core machine


@dataclass(frozen=True)
class Cluster:
    address: str
    env: dict[str, str]
    root: Path
    s3: S3Server


def _wait_for_cpus(address: str, env: dict[str, str], cpus: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = subprocess.run([RAY, "status", "--address", address], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        if f"/{cpus}.0 CPU" in status.stdout:
            return
        assert time.monotonic() < deadline, f"the worker node never joined:\n{status.stdout}"
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="orch-nsd-", dir="/tmp"))
    hidden = [root, tmp_path_factory.getbasetemp(), REPO / "runs"]
    marker = uuid.uuid4().hex
    (REPO / "runs").mkdir(exist_ok=True)
    with s3_server() as s3:
        s3.create_bucket("runs")
        s3.client().upload_file(str(SAMPLE), "runs", f"data/{SAMPLE.name}")
        port, dashboard_port = free_port(), free_port()
        # A home without ~/.ray/auth_token: token auth stays off on the head and the worker.
        env = base_env(HOME=str(root / "home"), **s3.env(), **{MARKER: marker},
                       RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}")
        (root / "home").mkdir()
        address = f"127.0.0.1:{port}"
        try:
            head = subprocess.run(
                [RAY, "start", "--head", "--num-cpus", "0", "--temp-dir", str(root / "ray"),
                 "--port", str(port), "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dashboard_port),
                 "--ray-client-server-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()),
                 "--object-store-memory", str(300 * 1024**2), "--disable-usage-stats"],
                env=env, capture_output=True, text=True, timeout=300, check=False)
            assert head.returncode == 0, f"ray start --head failed:\n{head.stderr}"
            mounts = " && ".join(f"mount -t tmpfs tmpfs {folder}" for folder in hidden)
            hide = (f"{mounts} && "
                    f"mkdir -p {root / 'home'} && exec {RAY} start --block --address {address} "
                    f"--num-cpus 2 --dashboard-agent-listen-port {free_port()} "
                    f"--object-store-memory {300 * 1024**2} --disable-usage-stats")
            subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", hide],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for_cpus(address, env, 2)
            _check_the_worker_cannot_see(root, address, env)
            yield Cluster(address, env, root, s3)
        finally:
            leftover = stop_marked(MARKER, marker, root)
            shutil.rmtree(root, ignore_errors=True)
            assert not leftover, f"processes of the test cluster survived: {leftover}"


def _check_the_worker_cannot_see(root: Path, address: str, env: dict[str, str]) -> None:
    """A task (it can only run on the worker: the head has no CPUs) looks for files the head
    side writes now, in /tmp and in runs/ (Ray makes a folder of the same name as the head's
    temporary directory on the worker, in the worker's own /tmp)."""
    probes = [root / f".probe-{uuid.uuid4().hex}", REPO / "runs" / f".probe-{uuid.uuid4().hex}"]
    for probe in probes:
        probe.write_text("the head's disk")
    try:
        paths = [str(probe) for probe in probes]
        code = (f"import os, ray; ray.init(address={address!r}); "
                f"print(ray.get(ray.remote(lambda: [os.path.exists(p) for p in {paths!r}])"
                ".remote()))")
        seen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=300, check=True).stdout.strip().splitlines()[-1]
    finally:
        for probe in probes:
            probe.unlink()
    assert seen == "[False, False]", seen


def _orchestrator(*args: str, cluster: Cluster, cwd: Path,
                  timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=cluster.env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def test_a_run_in_a_bucket_trains_on_a_node_without_the_heads_disk_and_serves_from_it(
        cluster: Cluster, tmp_path: Path) -> None:
    runs_before = sorted(p.name for p in (REPO / "runs").iterdir())
    workdir = tmp_path / "driver"
    workdir.mkdir()
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        **tiny_spec("gpt", path=f"s3://runs/data/{SAMPLE.name}", sweep={"num_samples": 2}),
        "runs_dir": "s3://runs/runs", "serve": {"enabled": False}}))

    run = _orchestrator("run", str(spec), "--address", cluster.address, cluster=cluster,
                        cwd=workdir, timeout=JOB_TIMEOUT_S)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    # Keys of objects (pyarrow also leaves empty "folder/" markers).
    keys = [key for key in cluster.s3.keys("runs", "runs/") if key.count("/") >= 2]
    run_names = {key.split("/")[1] for key in keys}
    assert len(run_names) == 1, run_names
    run_uri = f"s3://runs/runs/{run_names.pop()}"
    files = {key.split("/", 2)[2] for key in keys}
    for expected in ("spec.yaml", "stages.json", "tokenizer/tokenizer.json", "data/meta.json",
                     "sweep/trials.parquet", "sweep/history.parquet", "winner/model.pt",
                     "winner/tokenizer.json", "winner/metrics.json", "report.json", "report.md"):
        assert expected in files, sorted(files)
    for prefix in ("data/split=train/", "data/split=val/", "data/split=test/", "sweep/tune/",
                   "plots/"):
        assert any(f.startswith(prefix) for f in files), (prefix, sorted(files))
    assert any("/checkpoint_" in f for f in files if f.startswith("sweep/tune/")), sorted(files)
    # Nothing landed on the driver's disk: no local run directory, no `s3:` folder.
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in (REPO / "runs").iterdir()) == runs_before

    port = free_port()
    deployed = _orchestrator("deploy", run_uri, "--address", cluster.address,
                             "--set", f"serve.port={port}", cluster=cluster, cwd=workdir,
                             timeout=600)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert f"from {run_uri}/winner" in deployed.stdout
    answer = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"model": "test-gpt", "prompt": "The", "max_tokens": 4,
                                 "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1
