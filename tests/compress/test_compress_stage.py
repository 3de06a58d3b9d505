"""The compress stage end to end on a real local Ray and the tiny models: every variant built
(the pruned one and the student by Ray Train runs), evaluated on the test split, measured, the
one to serve chosen by the rule and left where the deploy stage finds it; a classifier run and
its compression by `orchestrator compress` beside a live keyed service of the same name, which
answers its client throughout, untouched, and the chosen variant then serving in its place."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

import pandas as pd
import pytest
import ray
import requests
from conftest import TIMING, stage_times, tiny_spec

from orchestrator.bench import compress as bench_compress
from orchestrator.bench.bundles import initial_bundle
from orchestrator.compress.stage import _fine_tune, compress_finished_run
from orchestrator.evaluate import predict
from orchestrator.pipeline import run_pipeline
from orchestrator.rundir import RunDir, find_bundle
from orchestrator.spec import parse_spec
from orchestrator.train.config import worker_config
from orchestrator.weights.model import load_bundle, save_bundle

STEPS = {"max_steps": 20, "eval_interval": 10, "warmup_steps": 2, "eval_batches": 2}


def test_every_variant_of_a_language_model_built_measured_and_the_chosen_one_kept(
        ray_local, tmp_path, record_property):
    """Without serving (the classifier's test below serves its chosen variant): the run
    directory names the chosen bundle, which is what `deploy` and the deploy stage serve."""
    raw = tiny_spec("gpt", train=STEPS, model={"n_layer": 2}, serve={"enabled": False},
                    compress={"variants": ["int8", "prune", "distill"], "latency_requests": 0,
                              "max_quality_loss": 0.05,
                              "prune": {"sparsity": 0.5, "recovery_steps": 10},
                              "distill": {"steps": 20}})
    raw["runs_dir"] = str(tmp_path / "runs")
    started = time.monotonic()
    report = run_pipeline(parse_spec(raw), say=lambda _: None)
    record_property(TIMING, stage_times("compress: gpt int8+prune+distill",
                                        time.monotonic() - started, report))
    compression = report["compression"]
    variants = {v["name"]: v for v in compression["variants"]}
    assert list(variants) == ["winner", "int8", "prune", "distill"]
    winner_ppl = report["evaluation"]["test"]["model"]["perplexity"]
    assert variants["winner"]["quality"] == winner_ppl
    for variant in variants.values():
        assert variant["quality"] > 1 and variant["size_bytes"] > 0
        assert variant["speed"]["decode_tokens_per_s_batch1"] > 0
        assert variant["p50_latency_s"] is None  # latency_requests 0 (the classifier test's)
        assert variant["quality_loss"] == pytest.approx(variant["quality"] / winner_ppl - 1)
        assert variant["within_bound"] == (variant["quality_loss"] <= 0.05)
    assert variants["int8"]["size_bytes"] < 0.5 * variants["winner"]["size_bytes"]
    assert variants["prune"]["details"]["sparsity_after_recovery"] == pytest.approx(0.5, abs=0.01)
    assert variants["distill"]["details"]["student_blocks"] == 1
    assert variants["distill"]["details"]["student_params"] < \
        variants["distill"]["details"]["teacher_params"]

    # The rule, recomputed from the figures; the run directory now gives that bundle.
    key = "decode_tokens_per_s_batch1"
    eligible = [v for v in variants.values() if v["within_bound"]]
    fastest = max(v["speed"][key] for v in eligible)
    assert compression["selected"] == min(
        (v for v in eligible if v["speed"][key] >= 0.95 * fastest),
        key=lambda v: v["size_bytes"])["name"]
    run_dir = Path(report["run_dir"])
    assert find_bundle(run_dir).uri == compression["bundle"]
    assert load_bundle(compression["bundle"]).spec.name == "test-gpt"
    assert "compression" in (run_dir / "report.md").read_text().lower()
    assert (run_dir / "plots" / "compression.png").is_file()

    # `orchestrator bench compress` makes its table from such a report.
    bench = bench_compress.result_of(report, 1.0, "test")
    assert [row["variant"] for row in bench.rows] == ["fp32 winner", "int8", "prune", "distill"]
    assert bench.rows[0]["against_fp32"] == 0 and bench.rows[1]["size_ratio"] < 0.5
    assert bench.ratio == pytest.approx(variants["int8"]["speed"][key]
                                        / variants["winner"]["speed"][key])

    # The int8 bundle through batch inference, like any other.
    inputs = tmp_path / "prompts.csv"
    pd.DataFrame({"text": ["The event loop", "Return the"]}).to_csv(inputs, index=False)
    assert predict(variants["int8"]["bundle"], str(inputs), str(tmp_path / "out"),
                   max_tokens=4) == 2


@pytest.mark.parametrize("cache", [True, False], ids=["in an actor", "in ray train"])
def test_a_fine_tune_ends_at_its_last_step_with_a_checkpoint_that_makes_a_bundle(
        prepared_gpt, tmp_path, cache):
    """A prune recovery's or a student's training: one worker with its splits in memory trains
    in an actor of its own, streamed splits (or several workers) in Ray Train; either way the run
    hands back its last step's metrics and a checkpoint in the run directory that becomes a
    bundle. An actor's run keeps that checkpoint only; its CPU is free again as it returns."""
    run_dir, info = prepared_gpt
    spec = parse_spec(tiny_spec("gpt", data={"cache": cache}, resources={"use_gpu": False},
                                train={"max_steps": 10, "eval_interval": 5}))
    free = ray.available_resources().get("CPU", 0)
    run = _fine_tune(worker_config(spec, info, RunDir.at(run_dir)), f"test-{cache}")
    assert run.metrics["step"] == 10 and run.metrics["val_loss"] > 0
    deadline = time.monotonic() + 30  # the raylet reports freed resources to the GCS shortly
    while ray.available_resources().get("CPU", 0) < free:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)
    checkpoint = Path(run.checkpoint)
    assert checkpoint.is_dir() and checkpoint.parent.parent == run_dir / "train"
    if cache:
        assert [kept.name for kept in checkpoint.parent.iterdir()] == [checkpoint.name]
    bundle = save_bundle(tmp_path / "bundle", spec, info, run.checkpoint,
                         RunDir.at(run_dir).tokenizer, {}, "test").uri
    assert load_bundle(bundle).spec.train.max_steps == 10


class Poller:
    """A client of a live keyed classifier service, polling it from a thread throughout:
    every answer's status and every weights version it reports."""

    def __init__(self, url: str, key: str):
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}
        self.statuses: Counter = Counter()
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            try:
                answer = requests.post(f"{self.url}/v1/classify", headers=self.headers,
                                       json={"input": ["The event loop"]}, timeout=60)
                self.statuses[answer.status_code] += 1
                self.versions.add(requests.get(f"{self.url}/healthz", timeout=60).json()["version"])
            except requests.RequestException as error:
                self.statuses[type(error).__name__] += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_a_run_and_its_compression_beside_a_live_keyed_service_leave_it_serving(
        serving, tmp_path, sample_rows, monkeypatch, record_property):
    """A classifier job re-run (keep_running false) and then `orchestrator compress` of it, with
    the latency of each variant through the service, while the job's earlier service (same name,
    API keys) answers a client: the client sees the same version, and no failure, throughout;
    the run's and compress's own apps are gone after; int8 then serves through classify."""
    from orchestrator.serve import deploy, running_apps, shutdown

    monkeypatch.setenv("COMPRESS_TEST_KEYS", "the-only-key")
    raw = tiny_spec("classifier", train=STEPS,
                    serve={"port": serving, "api_keys_env": "COMPRESS_TEST_KEYS"})
    raw["runs_dir"] = str(tmp_path / "runs")
    spec = parse_spec(raw)
    live = deploy(spec, initial_bundle(tmp_path / "live", spec, sample_rows), timeout_s=120)
    live_version = requests.get(f"{live}/healthz", timeout=30).json()["version"]
    lines: list[str] = []
    with Poller(live, "the-only-key") as client:
        report = run_pipeline(spec, say=lambda _: None)
        started = time.monotonic()
        report = compress_finished_run(report["run_dir"], [
            "compress.variants=[int8]", "compress.max_quality_loss=0.5",
            "compress.latency_requests=2"], say=lines.append)
        record_property(TIMING, f"compress: classifier int8 afterwards: "
                                f"{time.monotonic() - started:.1f} s")
        time.sleep(1)
    assert client.versions == {live_version}
    assert set(client.statuses) == {200} and client.statuses[200] > 10, client.statuses
    assert set(running_apps()) == {"test-classifier-service", "orchestrator-front"}
    assert report["endpoint"] is None
    assert [answer["status"] for answer in report["sample_responses"]] == [200]  # with the key

    variants = {v["name"]: v for v in report["compression"]["variants"]}
    assert set(variants) == {"winner", "int8"}
    assert "texts_per_s" in variants["int8"]["speed"]
    assert all(v["p50_latency_s"] > 0 for v in variants.values())  # through the real service
    run_dir = Path(report["run_dir"])
    assert json.loads((run_dir / "report.json").read_text())["compression"]["selected"] in variants
    assert any("serving" in line for line in lines)

    int8 = variants["int8"]["bundle"]
    url = deploy(spec, int8, timeout_s=120)  # the job's own service, updated in place
    headers = {"Authorization": "Bearer the-only-key"}
    try:
        response = requests.post(f"{url}/v1/classify", headers=headers, json={
            "model": spec.name, "input": ["The event loop", 5, "Return the number"]}, timeout=60)
        assert response.status_code == 400  # a bad input in the batch: named, nothing served
        response = requests.post(f"{url}/v1/classify", headers=headers, json={
            "model": spec.name, "input": ["The event loop", "Return the number"]}, timeout=60)
        assert response.status_code == 200, response.text
        assert {row["label"] for row in response.json()["data"]} <= set(report["data"]["labels"])
    finally:
        shutdown(spec)
