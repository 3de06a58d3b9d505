"""The compress stage end to end on a real local Ray and the tiny models: every variant built
(the pruned one and the student by Ray Train runs), evaluated on the test split, measured, the
served one chosen by the rule and answering through the OpenAI-compatible API; a finished
classifier run compressed afterwards by `orchestrator compress` and answering /v1/classify."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
from conftest import TIMING, stage_times, tiny_spec

from orchestrator.bench import compress as bench_compress
from orchestrator.compress.stage import compress_finished_run
from orchestrator.evaluate import predict
from orchestrator.pipeline import run_pipeline
from orchestrator.rundir import find_bundle
from orchestrator.spec import parse_spec
from orchestrator.weights.model import load_bundle

STEPS = {"max_steps": 20, "eval_interval": 10, "warmup_steps": 2, "eval_batches": 2}


def test_every_variant_of_a_language_model_built_measured_and_the_chosen_one_served(
        serving, tmp_path, record_property):
    raw = tiny_spec("gpt", train=STEPS, model={"n_layer": 2},
                    serve={"port": serving, "keep_running": True,
                           "sample_requests": ["The event loop"]},
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

    # The rule, recomputed from the figures; the run directory now serves that bundle.
    key = "decode_tokens_per_s_batch1"
    eligible = [v for v in variants.values() if v["within_bound"]]
    fastest = max(v["speed"][key] for v in eligible)
    assert compression["selected"] == min(
        (v for v in eligible if v["speed"][key] >= 0.95 * fastest),
        key=lambda v: v["size_bytes"])["name"]
    run_dir = Path(report["run_dir"])
    assert find_bundle(run_dir).uri == compression["bundle"]
    served = load_bundle(compression["bundle"])
    health = requests.get(f"{report['endpoint']}/healthz", timeout=30).json()
    assert health["version"] == served.version  # the chosen variant's weights answer
    response = requests.post(f"{report['endpoint']}/v1/completions", json={
        "model": "test-gpt", "prompt": "The event loop", "max_tokens": 5, "temperature": 0},
        timeout=60)
    assert response.status_code == 200, response.text
    assert "compression" in (run_dir / "report.md").read_text().lower()
    assert (run_dir / "plots" / "compression.png").is_file()

    # `orchestrator bench compress` makes its table from such a report.
    bench = bench_compress.result_of(report, 1.0, "test")
    assert [row["variant"] for row in bench.rows] == ["fp32 winner", "int8", "prune", "distill"]
    assert bench.rows[0]["against_fp32"] == 0 and bench.rows[1]["size_ratio"] < 0.5
    assert bench.ratio == pytest.approx(variants["int8"]["speed"][key]
                                        / variants["winner"]["speed"][key])

    # The int8 bundle through batch inference, like any other.
    from ray import serve

    serve.shutdown()  # 2 CPUs: predict's actor needs the replica's share
    inputs = tmp_path / "prompts.csv"
    pd.DataFrame({"text": ["The event loop", "Return the"]}).to_csv(inputs, index=False)
    assert predict(variants["int8"]["bundle"], str(inputs), str(tmp_path / "out"),
                   max_tokens=4) == 2


def test_a_finished_classifier_run_compressed_afterwards_serves_int8_through_classify(
        serving, tmp_path, record_property):
    from orchestrator.serve import deploy, shutdown

    raw = tiny_spec("classifier", train=STEPS, serve={"port": serving, "enabled": False})
    raw["runs_dir"] = str(tmp_path / "runs")
    report = run_pipeline(parse_spec(raw), say=lambda _: None)
    lines: list[str] = []
    started = time.monotonic()
    report = compress_finished_run(report["run_dir"], [
        "compress.variants=[int8]", "compress.max_quality_loss=0.5", "serve.enabled=true",
        "compress.latency_requests=2"], say=lines.append)
    record_property(TIMING, f"compress: classifier int8 afterwards: "
                            f"{time.monotonic() - started:.1f} s")
    variants = {v["name"]: v for v in report["compression"]["variants"]}
    assert set(variants) == {"winner", "int8"}
    assert "texts_per_s" in variants["int8"]["speed"]
    assert all(v["p50_latency_s"] > 0 for v in variants.values())  # through the real service
    run_dir = Path(report["run_dir"])
    assert json.loads((run_dir / "report.json").read_text())["compression"]["selected"] in variants
    assert any("serving" in line for line in lines)

    int8 = variants["int8"]["bundle"]
    spec = parse_spec(tiny_spec("classifier", serve={"port": serving}))
    url = deploy(spec, int8, timeout_s=120)
    try:
        response = requests.post(f"{url}/v1/classify", json={
            "model": spec.name, "input": ["The event loop", 5, "Return the number"]}, timeout=60)
        assert response.status_code == 400  # a bad input in the batch: named, nothing served
        response = requests.post(f"{url}/v1/classify", json={
            "model": spec.name, "input": ["The event loop", "Return the number"]}, timeout=60)
        assert response.status_code == 200, response.text
        assert {row["label"] for row in response.json()["data"]} <= set(report["data"]["labels"])
    finally:
        shutdown(spec)
