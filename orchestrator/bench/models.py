"""`orchestrator bench models`: two models side by side on one cluster.

A language model (`writer`) is measured at its own route at concurrency 32 alone, then with a
second model (`other`) deployed beside it and idle; `other` likewise beside `writer` idle and,
once `writer` is removed, alone. Then both take load while `writer` is rolled to new weights
(`deploy` of a second bundle): every failed request on either model is counted. Each replica
reserves 0.5 CPU, so that the rolling update's extra replica fits on 2 CPUs beside both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.bench import BenchResult
from orchestrator.bench.bundles import initial_bundle
from orchestrator.bench.repository import sample_corpus
from orchestrator.bench.serve import bench_spec, cell_shape, free_port, measure
from orchestrator.spec import JobSpec, parse_spec

CONCURRENCY = 32
REPLICA_CPUS = 0.5


def model_spec(name: str, port: int) -> JobSpec:
    raw = bench_spec(port, max_batch_size=32).model_dump(mode="json")
    return parse_spec({**raw, "name": name, "serve": {**raw["serve"], "replica_cpus": REPLICA_CPUS}})


def start_load(url: str, seconds: float, request: dict[str, Any]) -> subprocess.Popen[str]:
    """A closed loop at CONCURRENCY against `url` for `seconds`, in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.bench.load", f"{url}/v1/completions",
         str(CONCURRENCY), str(seconds), json.dumps(request), "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(load: subprocess.Popen[str], seconds: float) -> dict[str, float]:
    out, err = load.communicate(timeout=seconds + 120)
    if load.returncode != 0:
        raise RuntimeError(f"load generator failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool) -> BenchResult:
    import ray
    from ray import serve

    from orchestrator.serve import deploy, undeploy

    seconds, request = cell_shape(quick)
    update_s = 15.0 if quick else 40.0  # long enough to cover the rolling update
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", log_to_driver=False, logging_level="WARNING")
    port = free_port()
    writer, other = model_spec("writer", port), model_spec("other", port)
    texts = [json.loads(line) for line in sample_corpus().read_text().splitlines()]
    rows: list[dict[str, Any]] = []

    def cell(model: str, beside: str, url: str) -> None:
        rows.append({"model": model, "beside": beside, "concurrency": CONCURRENCY,
                     **measure(url, CONCURRENCY, seconds, {**request, "model": model})})

    try:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            writer_v1 = initial_bundle(root / "writer-v1", writer, texts)
            writer_v2 = initial_bundle(root / "writer-v2", writer, texts)
            writer_url = deploy(writer, writer_v1)
            cell("writer", "nothing", writer_url)
            other_url = deploy(other, initial_bundle(root / "other", other, texts))
            cell("writer", "other, idle", writer_url)
            cell("other", "writer, idle", other_url)
            loads = {name: start_load(url, update_s, {**request, "model": name})
                     for name, url in (("writer", writer_url), ("other", other_url))}
            time.sleep(update_s / 4)
            rolled_at = time.monotonic()
            deploy(writer, writer_v2)
            rolled_s = time.monotonic() - rolled_at
            for name, load in loads.items():
                rows.append({"model": name, "beside": "writer rolled to new weights",
                             "concurrency": CONCURRENCY, **finished(load, update_s)})
            undeploy(writer.name)
            cell("other", "nothing", other_url)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return summarize(rows, rolled_s, seconds)


def summarize(rows: list[dict[str, Any]], rolled_s: float, seconds: float) -> BenchResult:
    def rate(model: str, beside: str) -> float:
        return next(r["requests_per_s"] for r in rows
                    if r["model"] == model and r["beside"] == beside)

    kept = {model: round(rate(model, f"{peer}, idle") / rate(model, "nothing"), 3)
            for model, peer in (("writer", "other"), ("other", "writer"))}
    failed = {r["model"]: r["errors"] for r in rows if r["beside"].startswith("writer rolled")}
    return BenchResult(
        "models", rows, min(kept.values()),
        "the lower of the two models' requests/s beside the other (idle) over alone",
        {"beside / alone requests/s, by model": kept,
         "failed requests during writer's rolling update, by model": failed,
         "rolling update took (s)": round(rolled_s, 1), "seconds per cell": seconds})
