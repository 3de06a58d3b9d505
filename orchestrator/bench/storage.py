"""The quickstart with its run directory in an S3-compatible store against local disk, back to back.

Each run is a whole `python -m orchestrator run jobs/quickstart.yaml` (its own embedded Ray), the
two kinds taking turns so that a drift in the machine's speed hits both. The store is the one
AWS_ENDPOINT_URL names (with the usual AWS_* credentials and ORCHESTRATOR_BENCH_BUCKET, an
existing bucket), or else a local moto server (`pip install 'moto[server]'`) started here.
The headline ratio is the local run's wall time over the object-store run's (1: storage costs
nothing; the target is at least 1 / 1.2).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.bench import BenchmarkUnavailable, BenchResult
from orchestrator.bench.jobs import QUICK, run_quickstart


@contextmanager
def object_store() -> Iterator[tuple[dict[str, str], str]]:
    """(environment for the runs, bucket): the configured store, or a moto server of our own."""
    if os.environ.get("AWS_ENDPOINT_URL") and os.environ.get("ORCHESTRATOR_BENCH_BUCKET"):
        yield {}, os.environ["ORCHESTRATOR_BENCH_BUCKET"]
        return
    # This environment's own first: another Python's moto on PATH may be older (pyenv's shim
    # ran one whose CompleteMultipartUpload fails every pyarrow upload).
    beside = Path(sys.executable).parent / "moto_server"
    server = str(beside) if beside.exists() else shutil.which("moto_server")
    if server is None:
        raise BenchmarkUnavailable("no S3-compatible store: set AWS_ENDPOINT_URL and "
                                   "ORCHESTRATOR_BENCH_BUCKET, or pip install 'moto[server]'")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        _create_bucket(env, "bench")
        yield env, "bench"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _create_bucket(env: dict[str, str], bucket: str, timeout_s: float = 60) -> None:
    import boto3  # moto's own dependency
    from botocore.exceptions import EndpointConnectionError

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# --quick: the shrunk quickstart with one trial on each kind of storage.
QUICK_STORAGE = [*QUICK, "sweep.num_samples=1"]


def _timed_quickstart(run_dir: str, env: dict[str, str], quick: bool) -> dict[str, float]:
    wall, report = run_quickstart([f"runs_dir={run_dir}", *(QUICK_STORAGE if quick else [])], env)
    return {"wall_s": wall, **{f"{k}_s": v for k, v in report["stage_seconds"].items()}}


def run(quick: bool) -> BenchResult:
    pairs = 1 if quick else 2
    rows = []
    with object_store() as (env, bucket), tempfile.TemporaryDirectory() as local:
        prefix = f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}"
        for turn in range(pairs):
            for storage, run_dir in (("local disk", local), ("object store", prefix)):
                rows.append({"storage": storage, "turn": turn + 1,
                             **_timed_quickstart(run_dir, env, quick)})
    wall = {kind: statistics.median(r["wall_s"] for r in rows if r["storage"] == kind)
            for kind in ("local disk", "object store")}
    return BenchResult(
        name="storage", rows=rows, ratio=wall["local disk"] / wall["object store"],
        ratio_means="quickstart wall time on local disk over with run_dir in the object store "
                    "(1 = free; target >= 0.83, i.e. within 1.2x)",
        notes={"mode": "quick (shrunk quickstart)" if quick else "the quickstart as shipped",
               "store": env.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")})
