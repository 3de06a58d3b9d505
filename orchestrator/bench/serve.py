"""`orchestrator bench serve`: the same model and request behind (a) our Serve app with its
continuous-batching engine (max_batch_size 32), (b) the same app with batches of one, (c) plain
FastAPI on uvicorn in one process (the same app, batches of one: requests take turns).

Closed loop: concurrency 1, 8 and 32, for all three. Open loop: Poisson arrivals at several rates
against (a), each request streamed: achieved requests/s, time to first token and inter-token
latency (p50, p99). The load comes from a separate process (bench/load.py). The model is the
quickstart's GPT with fresh weights (serving cost does not depend on training); the request is a
16-token greedy completion. Every server gets one CPU for the model: the replica reserves 1 CPU
(Ray sets its torch threads to match) and uvicorn runs with OMP_NUM_THREADS=1.

(a) and (b) are measured under each ingress (serve/ingress.py): Serve's proxy, and HAProxy with
Serve's throughput-optimized mode, each in a Ray of its own started by a child process.
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
from orchestrator.serve.ingress import SWITCHES, Ingress, environment
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


def serve_rows_in_own_ray(quick: bool) -> dict[str, list[dict[str, Any]]]:
    """Every Serve cell, in a Ray this process starts (with the ingress its environment sets):
    batched (its own route, through the front, open loop) and unbatched."""
    import ray
    from ray import serve

    seconds, request = cell_shape(quick)
    ray.init(address="local", log_to_driver=False, logging_level="WARNING")  # never a running cluster
    port = free_port()
    rows_of_text = [json.loads(line) for line in sample_corpus().read_text().splitlines()]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            bundle_dir = initial_bundle(Path(scratch) / "bundle", bench_spec(port, 32), rows_of_text)
            closed, opened = serve_rows("serve batched", bundle_dir, bench_spec(port, 32),
                                        seconds, request, QUICK_RATES if quick else RATES,
                                        through_front=True)
            closed += serve_rows("serve unbatched", bundle_dir, bench_spec(port, 1), seconds,
                                 request)[0]
            serve.shutdown()
    finally:
        ray.shutdown()
    return {"closed": closed, "opened": opened}


def rows_with_ingress(ingress: Ingress, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """serve_rows_in_own_ray in a child process whose Ray takes requests in by `ingress`: Ray
    reads the mode from the environment its processes start with, so each mode needs its own."""
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-") as files:
        env = {**os.environ, **{name: "0" for name in SWITCHES[Ingress.HAPROXY]},
               **environment(ingress, Path(files))}
        out = subprocess.run([sys.executable, "-m", "orchestrator.bench.serve",
                              "quick" if quick else "full"], env=env, capture_output=True,
                             text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"serve bench with ingress {ingress.value} failed:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    for row in measured["closed"] + measured["opened"]:
        row["server"] = f"{row['server']} ({ingress.value})"
    return measured


def cell_shape(quick: bool) -> tuple[float, dict[str, Any]]:
    """Seconds per cell and the request. Quick: short cells and short answers, so that even
    unbatched requests at concurrency 32 finish within a cell."""
    return (1.0, {**REQUEST, "max_tokens": 4}) if quick else (10.0, REQUEST)


def run(quick: bool) -> BenchResult:
    seconds, request = cell_shape(quick)
    rows: list[dict[str, Any]] = []
    opened: list[dict[str, Any]] = []
    for ingress in Ingress:
        measured = rows_with_ingress(ingress, quick)
        rows += measured["closed"]
        opened += measured["opened"]
    rows_of_text = [json.loads(line) for line in sample_corpus().read_text().splitlines()]
    with tempfile.TemporaryDirectory() as scratch:
        bundle_dir = initial_bundle(Path(scratch) / "bundle", bench_spec(free_port(), 32),
                                    rows_of_text)
        rows += uvicorn_rows(bundle_dir, seconds, request)
    return summarize(rows, opened, seconds, request)


def summarize(rows: list[dict[str, Any]], opened: list[dict[str, Any]], seconds: float,
              request: dict[str, Any]) -> BenchResult:
    def cell(server: str, concurrency: int, key: str) -> float:
        return next(r[key] for r in rows if r["server"] == server and r["concurrency"] == concurrency)

    def over(a: float, b: float) -> float:
        return a / b if b else math.nan  # no request finished within the cell

    top = CONCURRENCIES[-1]
    plain = "plain uvicorn"
    notes: dict[str, Any] = {}
    for ingress in Ingress:
        batched, front = f"serve batched ({ingress.value})", \
            f"serve batched, through the front ({ingress.value})"
        unbatched = f"serve unbatched ({ingress.value})"
        notes |= {
            f"{ingress.value}: batched / plain uvicorn requests/s at concurrency {top}":
                round(over(cell(batched, top, "requests_per_s"),
                           cell(plain, top, "requests_per_s")), 2),
            f"{ingress.value}: p50 at concurrency 1, batched minus plain uvicorn (ms)":
                round(cell(batched, 1, "p50_ms") - cell(plain, 1, "p50_ms"), 2),
            f"{ingress.value}: batched / unbatched requests/s at concurrency {top}":
                round(over(cell(batched, top, "requests_per_s"),
                           cell(unbatched, top, "requests_per_s")), 2),
            f"{ingress.value}: p50 at concurrency 1, through the front minus own route (ms)":
                round(cell(front, 1, "p50_ms") - cell(batched, 1, "p50_ms"), 2),
            f"{ingress.value}: through the front / own route requests/s at concurrency {top}":
                round(over(cell(front, top, "requests_per_s"),
                           cell(batched, top, "requests_per_s")), 2),
        }
    notes |= {"open loop (serve batched, streamed, Poisson arrivals)": opened,
              "request": json.dumps(request), "seconds per cell": seconds}
    ratio = over(cell(f"serve batched ({Ingress.HAPROXY.value})", top, "requests_per_s"),
                 cell(f"serve batched ({Ingress.PROXY.value})", top, "requests_per_s"))
    return BenchResult("serve", rows, ratio,
                       f"batched requests/s at concurrency {top}, haproxy ingress over Serve's "
                       "proxy", notes)


if __name__ == "__main__":  # one ingress mode's cells, in this process's own Ray (see run)
    print(json.dumps(serve_rows_in_own_ray(sys.argv[1] == "quick")))
