"""Every model family end to end on a real local Ray and the tiny sample: the architectures of
a task swept together in one job, the winner evaluated against the classical reference on the
same splits and served, and every architecture's bundle put through `predict` (and, for the
language models, the service)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch
import yaml
from conftest import SAMPLE, TIMING, stage_times, tiny_spec

from orchestrator.data.datasets import split_of
from orchestrator.data.stage import load_data_info
from orchestrator.evaluate import predict
from orchestrator.models.ensemble import Ensemble, choose_members
from orchestrator.pipeline import run_pipeline
from orchestrator.select import class_probabilities, metric_scorer
from orchestrator.spec import parse_spec
from orchestrator.sweep.space import apply_trial_config
from orchestrator.train.objectives import lm_loss
from orchestrator.train.session import read_split_tensors
from orchestrator.weights.model import load_bundle, save_bundle

STEPS = {"max_steps": 10, "eval_interval": 5, "warmup_steps": 1, "eval_batches": 1}
SIZES = {"lstm": {"d_model": 32}, "bow": {"d_model": 16, "buckets": 1024},
         "linear": {"buckets": 4096}}
PROMPTS = ["The event loop", "Return the number of"]


def _run(family: str, archs: list[str], port: int, tmp_path: Path, record_property,
         **sweep: object) -> dict:
    raw = tiny_spec(family, train=STEPS, model={**SIZES, "arch": archs[0]},
                    sweep={"num_samples": 1, "space": {"model.arch": {"grid": archs}}, **sweep},
                    serve={"port": port, "sample_requests": PROMPTS[:1]})
    raw["runs_dir"] = str(tmp_path)
    started = time.monotonic()
    report = run_pipeline(parse_spec(raw), say=lambda _: None)
    record_property(TIMING, stage_times(f"families: {family} {'+'.join(archs)}",
                                        time.monotonic() - started, report))
    return report


def _trial_bundles(report: dict, tmp_path: Path) -> dict[str, str]:
    """One bundle per architecture, from each trial's best checkpoint, as select builds the
    winner's."""
    run_dir = Path(report["run_dir"])
    spec = parse_spec(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    info = load_data_info(run_dir)
    trials = pd.read_parquet(run_dir / "sweep" / "trials.parquet")
    bundles = {}
    for _, trial in trials.iterrows():
        arch = trial["config/model.arch"]
        bundles[arch] = save_bundle(tmp_path / f"bundle-{arch}",
                                    apply_trial_config(spec, {"model.arch": arch}), info,
                                    trial["checkpoint_path"], run_dir / "tokenizer", {},
                                    trial["trial_id"]).uri
    return bundles


def _split_texts(split: str, seed: int = 0) -> list[str]:
    """The sample's texts the data stage puts in `split`, computed here from the source."""
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]
    return [t for t in texts if t.strip() and split_of(t, seed, 0.1, 0.1) == split]


def _digest(texts: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(texts)).encode("utf-8")).hexdigest()[:16]


def test_classifier_families_swept_together_evaluated_served_and_predicted(
        serving, tmp_path, record_property):
    report = _run("classifier", ["transformer", "lstm", "bow", "linear"], serving, tmp_path,
                  record_property, ensemble=3)
    assert sorted(t["config/model.arch"] for t in report["trials"]) == ["bow", "linear", "lstm",
                                                                        "transformer"]
    assert all(t["status"] == "done" and t["evaluations"] == 2 for t in report["trials"])
    assert report["sample_responses"][0]["status"] == 200  # the winner, whichever, served

    # The reference was fitted and scored on exactly the winner's splits.
    for split in ("val", "test"):
        result = report["evaluation"][split]
        texts = _split_texts(split)
        assert result["text"]["texts"] == result["rows"] == len(texts)
        assert result["text"]["digest"] == _digest(texts)
        assert result["text"]["digest"] != _digest(_split_texts(split, seed=1))
        assert 0 <= result["reference"]["accuracy"] <= 1
    verdict = report["verdict"]
    assert verdict["metric"] == "accuracy" and verdict["split"] == "test"
    assert verdict["winner"] == report["evaluation"]["test"]["model"]["accuracy"]
    assert verdict["beats_reference"] == (verdict["winner"] > verdict["reference"])
    assert verdict["text"] in (Path(report["run_dir"]) / "report.md").read_text()

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                              for i, t in enumerate(_split_texts("test")[:10])))
    labels = set(report["data"]["labels"])
    bundles = _trial_bundles(report, tmp_path)
    for arch, bundle in bundles.items():
        assert predict(bundle, str(inputs), str(tmp_path / f"out-{arch}")) == 10
        predicted = pd.read_parquet(tmp_path / f"out-{arch}").sort_values("id")
        assert predicted["id"].tolist() == list(range(10)) and set(predicted["label"]) <= labels

    # sweep.ensemble 3: the winner is the trials chosen on the validation rows from the trials'
    # own bundles (one trial when no mean of the best beats it alone), and an ensemble bundle
    # answers their mean probabilities.
    run_dir = Path(report["run_dir"])
    spec = parse_spec(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    rows = read_split_tensors(run_dir, "val", first=STEPS["eval_batches"] * spec.train.batch_size)
    probabilities = {arch: class_probabilities(load_bundle(b).model, [rows])
                     for arch, b in bundles.items()}
    ranked = [t["config/model.arch"] for t in sorted(report["trials"],
                                                     key=lambda t: -t["best_val_accuracy"])]
    score = metric_scorer("val_accuracy", rows["label"].numpy(), len(labels))
    chosen = [ranked[i] for i in choose_members([probabilities[a] for a in ranked], score, 3)]
    members = report["winner"]["ensemble"]
    winner = load_bundle(run_dir / "winner").model
    if len(chosen) == 1:
        assert members == [] and not isinstance(winner, Ensemble)
    else:
        assert [m["model"]["arch"] for m in members] == chosen
        mean = torch.stack([probabilities[a] for a in chosen]).mean(0)
        assert torch.allclose(class_probabilities(winner, [rows]), mean, atol=1e-5)


def test_language_model_families_swept_together_evaluated_served_and_predicted(
        serving, tmp_path, record_property):
    from orchestrator.serve import deploy, shutdown

    report = _run("gpt", ["transformer", "lstm"], serving, tmp_path, record_property)
    assert sorted(t["config/model.arch"] for t in report["trials"]) == ["lstm", "transformer"]
    assert report["sample_responses"][0]["status"] == 200

    # Bits per byte: the winner's loss on the test split times that split's tokens per byte,
    # both measured here from the bundle, the split's rows and the source texts.
    run_dir = Path(report["run_dir"])
    bundle = load_bundle(run_dir / "winner")
    rows = read_split_tensors(run_dir, "test")["ids"].long()
    with torch.no_grad():
        loss = float(lm_loss(bundle.model, rows))
    texts = _split_texts("test")
    tokens = sum(len(e.ids) + 1 for e in bundle.tokenizer.encode_batch(texts))
    size = sum(len(t.encode("utf-8")) + 1 for t in texts)
    test = report["evaluation"]["test"]
    assert test["model"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert test["model"]["bits_per_byte"] == pytest.approx(loss * tokens / size / math.log(2),
                                                           rel=1e-4)
    assert test["text"]["digest"] == _digest(texts)
    assert 0 < test["reference"]["bits_per_byte"] < test["baseline"]["bits_per_byte"]
    verdict = report["verdict"]
    assert verdict["metric"] == "bits_per_byte" and verdict["winner"] == test["model"]["bits_per_byte"]

    # Each architecture's bundle: greedy completions from the service equal `predict`'s.
    spec = parse_spec(yaml.safe_load((run_dir / "spec.yaml").read_text()))
    inputs = tmp_path / "prompts.csv"
    pd.DataFrame({"text": PROMPTS}).to_csv(inputs, index=False)
    for arch, bundle_dir in _trial_bundles(report, tmp_path).items():
        arch_spec = apply_trial_config(spec, {"model.arch": arch})
        url = deploy(arch_spec, bundle_dir, timeout_s=120)
        online = []
        for prompt in PROMPTS:
            response = requests.post(f"{url}/v1/completions", json={
                "model": spec.name, "prompt": prompt, "max_tokens": 6, "temperature": 0},
                timeout=60)
            assert response.status_code == 200, response.text
            online.append(response.json()["choices"][0]["text"])
        shutdown(arch_spec)  # 2 CPUs: predict's actor and reads need the replica's share
        assert predict(bundle_dir, str(inputs), str(tmp_path / f"out-{arch}"), max_tokens=6) == 2
        batch = pd.read_parquet(tmp_path / f"out-{arch}").set_index("text").loc[PROMPTS]
        assert batch["completion"].tolist() == online, arch
