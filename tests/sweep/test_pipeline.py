"""A tiny sweep end to end on a real local Ray: data, Tune over Train, winner, evaluate, serve."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import requests
from conftest import free_port, tiny_spec

from orchestrator.bundle import load_bundle
from orchestrator.pipeline import run_pipeline
from orchestrator.spec import SpecError, parse_spec
from orchestrator.sweep.tuner import max_concurrent_trials


def test_tiny_sweep_end_to_end(ray_local, tmp_path):
    raw = tiny_spec(
        "classifier",
        sweep={"num_samples": 1, "space": {"train.lr": {"grid": [0.003, 0.0001]},
                                           "model.dropout": {"choice": [0.0]}}},
        serve={"port": free_port(), "sample_requests": ["Start the event loop."]},
    )
    raw["run_dir"] = str(tmp_path)
    spec = parse_spec(raw)
    lines: list[str] = []
    report = run_pipeline(spec, say=lines.append)

    run_dir = tmp_path / report["run_dir"].split("/")[-1]
    trials = pd.read_parquet(run_dir / "sweep" / "trials.parquet")
    assert len(trials) == 2 and set(trials["config/train.lr"]) == {0.003, 0.0001}
    assert trials["best_val_accuracy"].notna().all()
    history = pd.read_parquet(run_dir / "sweep" / "history.parquet")
    assert set(history["step"]) <= {10, 20} and len(history) >= 2
    best = trials.sort_values("best_val_accuracy", ascending=False).iloc[0]
    assert report["winner"]["trial_id"] == best["trial_id"]

    bundle = load_bundle(run_dir / "winner")
    assert bundle.spec.train.lr == best["config/train.lr"]
    provenance = json.loads((run_dir / "winner" / "provenance.json").read_text())
    assert provenance["trial_id"] == best["trial_id"] and provenance["ray_version"]
    assert set(bundle.metrics) == {"val", "test"}
    test = report["evaluation"]["test"]
    assert 0 <= test["model"]["accuracy"] <= 1 and test["baseline"]["name"] == "majority class"
    assert report["sample_responses"][0]["status"] == 200
    label = report["sample_responses"][0]["response"]["data"][0]["label"]
    assert label in bundle.info.labels
    # keep_running is off: the application is deleted (Serve's proxy answers 404 for it)
    gone = requests.post(f"http://127.0.0.1:{spec.serve.port}/v1/classify",
                         json={"input": ["x"]}, timeout=5)
    assert gone.status_code == 404
    assert json.loads((run_dir / "report.json").read_text())["winner"] == report["winner"]
    assert "| test | accuracy |" in (run_dir / "report.md").read_text()
    assert any(line.startswith("[2/5 sweep] trial") for line in lines)


def test_more_workers_than_the_cluster_fails_fast(ray_local, tmp_path):
    spec = parse_spec(tiny_spec("gpt", resources={"num_workers": 3}))
    with pytest.raises(SpecError, match=r"needs 3 CPU .*num_workers = 3.*cluster has 2"):
        run_pipeline(spec.model_copy(update={"run_dir": str(tmp_path)}), say=lambda _: None)
    gpu = parse_spec(tiny_spec("gpt", resources={"use_gpu": True}))
    with pytest.raises(SpecError, match=r"needs 1 GPU .*cluster has 0"):
        run_pipeline(gpu.model_copy(update={"run_dir": str(tmp_path)}), say=lambda _: None)


def test_concurrency_is_sized_to_the_cluster(ray_local):
    spec = parse_spec(tiny_spec("gpt"))
    assert max_concurrent_trials(spec) == 2  # 2 CPUs, 1 per trial, cached data
    streaming = parse_spec(tiny_spec("gpt", data={"cache": False}))
    assert max_concurrent_trials(streaming) == 1  # one CPU stays free for Ray Data
