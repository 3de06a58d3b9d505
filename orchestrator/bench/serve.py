"""`orchestrator bench serve`: the same model and request behind (a) our Serve app with its
continuous-batching engine (max_batch_size 32), (b) the same app with batches of one, (c) plain
FastAPI on uvicorn in one process (the same app, batches of one: requests take turns).

Closed loop: concurrency 1, 8 and 32, for all three. Open loop: Poisson arrivals at several rates
against (a), each request streamed: achieved requests/s, time to first token and inter-token
latency (p50, p99). The load comes from a separate process (bench/load.py). The model is the
quickstart's GPT with fresh weights (serving cost does not depend on training); the request is a
16-token greedy completion. Every server gets one CPU for the model: the replica reserves 1 CPU
(Ray sets its torch threads to match) and uvicorn runs with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from orchestrator.bench import BenchResult
from orchestrator.bench.bundles import initial_bundle
from orchestrator.bench.repository import sample_corpus
from orchestrator.spec import JobSpec, parse_spec

CONCURRENCIES = (1, 8, 32)
RATES = (20.0, 40.0, 60.0, 80.0)  # requests/s offered in the open loop
QUICK_RATES = (10.0, 20.0)
MODEL = {"task": "language_model", "n_layer": 2, "n_head": 4, "d_model": 128, "dropout": 0.0}
REQUEST = {"model": "bench", "prompt": "The event loop", "max_tokens": 16, "temperature": 0}


def bench_spec(port: int, max_batch_size: int) -> JobSpec:
    return parse_spec({
        "name": "bench", "data": {"path": str(sample_corpus()), "vocab_size": 2048, "block_size": 64},
        "model": MODEL,
        "serve": {"port": port, "replica_cpus": 1, "max_batch_size": max_batch_size,
                  "max_queued_requests": 128, "batch_wait_timeout_s": 0.002},
    })


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(url: str, concurrency: int, seconds: float, request: dict[str, Any]) -> dict[str, float]:
    """One closed-loop run from a separate process."""
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.bench.load", f"{url}/v1/completions",
         str(concurrency), str(seconds), json.dumps(request), str(min(2.0, seconds / 2))],
        capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_open(url: str, rate: float, seconds: float, request: dict[str, Any]) -> dict[str, float]:
    """One open-loop run from a separate process."""
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.bench.load", "open", f"{url}/v1/completions",
         str(rate), str(seconds), json.dumps(request)],
        capture_output=True, text=True, check=True, timeout=seconds + 300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s:.0f} s")


def serve_rows(variant: str, bundle_dir: Path, spec: JobSpec, seconds: float,
               request: dict[str, Any], rates: tuple[float, ...] = (),
               through_front: bool = False) -> tuple[list[dict], list[dict]]:
    """The model at its own route; with `through_front`, also through the front at `/` (the
    same replicas, one more hop: what routing by `model` costs)."""
    from orchestrator.serve import deploy, endpoint_url

    url = deploy(spec, bundle_dir)
    targets = [(variant, url)] + ([(f"{variant}, through the front", endpoint_url(spec))]
                                  if through_front else [])
    closed = [{"server": name, "concurrency": c, **measure(target, c, seconds, request)}
              for name, target in targets for c in CONCURRENCIES]
    opened = [{"server": variant, "rate": rate, **measure_open(url, rate, seconds, request)}
              for rate in rates]
    return closed, opened


def uvicorn_rows(bundle_dir: Path, seconds: float, request: dict[str, Any]) -> list[dict]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "orchestrator.bench.plain", str(bundle_dir),
                               str(port)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return [{"server": "plain uvicorn", "concurrency": c, **measure(url, c, seconds, request)}
                for c in CONCURRENCIES]
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(quick: bool) -> BenchResult:
    import ray
    from ray import serve

    # Quick: short cells and short answers, so that even unbatched requests at concurrency 32
    # finish within a cell.
    seconds, request = (1.0, {**REQUEST, "max_tokens": 4}) if quick else (10.0, REQUEST)
    rates = QUICK_RATES if quick else RATES
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(log_to_driver=False, logging_level="WARNING")
    port = free_port()
    rows_of_text = [json.loads(line) for line in sample_corpus().read_text().splitlines()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        bundle_dir = initial_bundle(Path(scratch) / "bundle", bench_spec(port, 32), rows_of_text)
        try:
            closed, opened = serve_rows("serve batched", bundle_dir, bench_spec(port, 32),
                                        seconds, request, rates, through_front=True)
            rows += closed
            rows += serve_rows("serve unbatched", bundle_dir, bench_spec(port, 1), seconds,
                               request)[0]
        finally:
            serve.shutdown()
        rows += uvicorn_rows(bundle_dir, seconds, request)
    if started_ray:
        ray.shutdown()
    return summarize(rows, opened, seconds, request)


def summarize(rows: list[dict[str, Any]], opened: list[dict[str, Any]], seconds: float,
              request: dict[str, Any]) -> BenchResult:
    def cell(server: str, concurrency: int, key: str) -> float:
        return next(r[key] for r in rows if r["server"] == server and r["concurrency"] == concurrency)

    def over(a: float, b: float) -> float:
        return a / b if b else math.nan  # no request finished within the cell

    top = CONCURRENCIES[-1]
    ratio = over(cell("serve batched", top, "requests_per_s"),
                 cell("plain uvicorn", top, "requests_per_s"))
    notes = {
        f"batched / unbatched requests/s at concurrency {top}":
            round(over(cell("serve batched", top, "requests_per_s"),
                       cell("serve unbatched", top, "requests_per_s")), 2),
        "p50 at concurrency 1, serve batched minus plain uvicorn (ms)":
            round(cell("serve batched", 1, "p50_ms") - cell("plain uvicorn", 1, "p50_ms"), 2),
        "p50 at concurrency 1, through the front minus the model's own route (ms)":
            round(cell("serve batched, through the front", 1, "p50_ms")
                  - cell("serve batched", 1, "p50_ms"), 2),
        f"through the front / own route requests/s at concurrency {top}":
            round(over(cell("serve batched, through the front", top, "requests_per_s"),
                       cell("serve batched", top, "requests_per_s")), 2),
        "open loop (serve batched, streamed, Poisson arrivals)": opened,
        "request": json.dumps(request), "seconds per cell": seconds,
        # Ray Serve's own switch (user code on the replica's main loop, direct ingress, ...),
        # read by Ray from the environment it starts in; reported so figures say how they ran.
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"),
    }
    return BenchResult("serve", rows, ratio,
                       f"batched (continuous-batching engine) over plain uvicorn requests/s at "
                       f"concurrency {top}", notes)
