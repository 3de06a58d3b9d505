"""`orchestrator bench quotas`: what serve.quotas costs a request. The serve benchmark's model
and request at the model's own route, on one replica, deployed with an API key; then with the
same key and quotas far above the load (every request is admitted, so only the check is
measured), counted in the replica (what one replica does) and in the app's shared ledger (what
several replicas do; forced here with autoscaling of 1 to 1 replica: one actor call per request,
and one sent after a completion to settle its reservation). Requests/s and p50/p99 latency at
concurrency 1 and 32.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.bench import BenchResult
from orchestrator.bench.bundles import initial_bundle
from orchestrator.bench.load import API_KEY_ENV
from orchestrator.bench.repository import sample_corpus
from orchestrator.bench.serve import REQUEST, bench_spec, free_port
from orchestrator.spec import JobSpec, ServeSpec

CONCURRENCIES = (1, 32)
KEY = "bench-quota-key"
KEYS_ENV = "ORCHESTRATOR_BENCH_KEYS"  # where deploy reads the key (the spec never holds it)
FAR_ABOVE = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}


SHARED = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}
VARIANTS = (("key", {}), ("key and quotas", {"quotas": {"default": FAR_ABOVE}}),
            ("key and quotas, shared ledger", {"quotas": {"default": FAR_ABOVE}, **SHARED}))


def keyed_spec(port: int, serve_options: dict[str, Any]) -> JobSpec:
    spec = bench_spec(port, 32)
    serve = ServeSpec.model_validate({**spec.serve.model_dump(), "api_keys_env": KEYS_ENV,
                                      **serve_options})
    return spec.model_copy(update={"serve": serve})


def measure(url: str, concurrency: int, seconds: float, request: dict[str, Any]) -> dict[str, float]:
    """One closed-loop run from a separate process that sends the key."""
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.bench.load", f"{url}/v1/completions",
         str(concurrency), str(seconds), json.dumps(request), str(min(2.0, seconds / 2))],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
        env={**os.environ, API_KEY_ENV: KEY})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> BenchResult:
    import ray
    from ray import serve

    from orchestrator.serve import deploy

    seconds, request = (1.0, {**REQUEST, "max_tokens": 4}) if quick else (10.0, REQUEST)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", log_to_driver=False, logging_level="WARNING")  # never another's
    os.environ[KEYS_ENV] = KEY  # deploy reads the key here, as from a user's environment
    port = free_port()
    rows_of_text = [json.loads(line) for line in sample_corpus().read_text().splitlines()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        bundle_dir = initial_bundle(Path(scratch) / "bundle", bench_spec(port, 32), rows_of_text)
        try:
            for variant, options in VARIANTS:
                url = deploy(keyed_spec(port, options), bundle_dir)
                rows += [{"server": variant, "concurrency": c,
                          **measure(url, c, seconds, request)}
                         for c in CONCURRENCIES]
        finally:
            serve.shutdown()
            os.environ.pop(KEYS_ENV)
    if started_ray:
        ray.shutdown()

    def cell(server: str, concurrency: int, key: str) -> float:
        return next(r[key] for r in rows if r["server"] == server and r["concurrency"] == concurrency)

    top = CONCURRENCIES[-1]
    without = cell("key", top, "requests_per_s")
    notes: dict[str, Any] = {f"p50 at concurrency 1, {variant} minus key (ms)":
                             round(cell(variant, 1, "p50_ms") - cell("key", 1, "p50_ms"), 2)
                             for variant, _ in VARIANTS[1:]}
    notes |= {"request": json.dumps(request), "seconds per cell": seconds}
    shared = cell(VARIANTS[-1][0], top, "requests_per_s")
    return BenchResult("quotas", rows, shared / without if without else math.nan,
                       f"requests/s with quotas in the shared ledger over without quotas at "
                       f"concurrency {top} (1.0: no cost)", notes)
