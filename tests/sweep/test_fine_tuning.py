"""Fine-tuning jobs end to end on a real local Ray, from tiny Hugging Face checkpoints made here:
a GPT-2 (full and LoRA fine-tuning and LoRA ranks swept in one job) and a BERT classifier
(LoRA), each trained, evaluated, served through our engine and exported back to
transformers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TIMING, stage_times, tiny_spec

from orchestrator.bench.checkpoints import tiny_encoder, tiny_gpt2
from orchestrator.export import export_hf, export_peft
from orchestrator.models import GPT, EncoderClassifier
from orchestrator.pipeline import run_pipeline
from orchestrator.spec import SpecError, parse_spec
from orchestrator.storage import resolve
from orchestrator.weights.model import load_bundle

STEPS = {"max_steps": 10, "eval_interval": 5, "warmup_steps": 1, "eval_batches": 1}


def _job(family: str, pretrained: Path, port: int, tmp_path: Path, record_property,
         label: str, sweep: dict | None = None, serve: bool = True, **train) -> dict:
    raw = tiny_spec(family, train={**STEPS, **train}, sweep={"num_samples": 1, **(sweep or {})},
                    serve={"port": port, "sample_requests": ["The event loop"],
                           "enabled": serve})
    raw["model"] = {"family": family, "pretrained": str(pretrained), "dropout": 0.0}
    raw["runs_dir"] = str(tmp_path / "runs")
    started = time.monotonic()
    report = run_pipeline(parse_spec(raw), say=lambda _: None)
    record_property(TIMING, stage_times(label, time.monotonic() - started, report))
    return report


def _checkpoint_bytes(report: dict) -> dict[str, int]:
    """The shards of one checkpoint of a full and of a LoRA fine-tuning trial."""
    trials = pd.read_parquet(Path(report["run_dir"]) / "sweep" / "trials.parquet")
    sizes = {}
    for _, trial in trials.iterrows():
        checkpoint = Path(resolve(trial["checkpoint_path"]).path)
        sizes[trial["config/train.finetune"]] = sum(
            f.stat().st_size for f in checkpoint.iterdir() if f.suffix == ".distcp")
    return sizes


def test_gpt2_fine_tuned_with_lora_and_in_full_swept_served_and_exported(
        serving, tmp_path, record_property):
    gpt2 = tiny_gpt2(tmp_path / "gpt2")
    report = _job("gpt", gpt2, serving, tmp_path, record_property,
                  "fine-tune: gpt2 full + lora r 4 + 8",
                  sweep={"space": {"train.finetune": {"grid": ["full", "lora"]},
                                   "train.lora.r": {"grid": [4, 8]}}})
    trials = {(t["config/train.finetune"], t["config/train.lora.r"]): t
              for t in report["trials"]}
    assert sorted(trials) == [("full", 4), ("full", 8), ("lora", 4), ("lora", 8)]
    assert all(t["status"] == "done" for t in trials.values())
    served = report["sample_responses"][0]
    assert served["status"] == 200 and served["response"]["object"] == "text_completion"

    # The winner's bundle is merged: a plain GPT of the checkpoint's shape, no adapters.
    winner = load_bundle(Path(report["run_dir"]) / "winner")
    assert isinstance(winner.model, GPT) and winner.model.block_size == 128
    assert not any("lora" in name for name in winner.model.state_dict())

    sizes = _checkpoint_bytes(report)
    assert sizes["full"] >= 10 * sizes["lora"]

    export = export_hf(report["run_dir"], tmp_path / "hf",
                       check_texts=["The event loop", "Return the number of items."])
    assert export.max_logit_difference <= 1e-4


def test_bert_classifier_fine_tuned_with_lora_classifies_through_the_service_and_exports(
        serving, tmp_path, record_property):
    bert = tiny_encoder(tmp_path / "bert", "bert")
    report = _job("classifier", bert, serving, tmp_path, record_property,
                  "fine-tune: bert classifier lora", finetune="lora", lr=0.003)
    served = report["sample_responses"][0]
    assert served["status"] == 200
    labels = set(report["data"]["labels"])
    assert served["response"]["data"][0]["label"] in labels
    assert 0 <= report["evaluation"]["test"]["model"]["accuracy"] <= 1
    assert isinstance(load_bundle(Path(report["run_dir"]) / "winner").model, EncoderClassifier)
    export = export_hf(report["run_dir"], tmp_path / "hf", check_texts=["The event loop"])
    assert export.max_logit_difference <= 1e-4
    with pytest.raises(SpecError, match="a PEFT adapter comes from a GPT fine-tuned with"):
        export_peft(report["run_dir"], tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_gpt2_lora_run_exports_as_a_peft_adapter_that_peft_loads_onto_its_base(
        serving, tmp_path, record_property):
    """`export --format peft`: the adapters alone, in peft's own format, which peft puts on the
    pretrained checkpoint the run started from to give the winner's logits (as a user of peft
    or of a multi-LoRA server would load them)."""
    import torch
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    gpt2 = tiny_gpt2(tmp_path / "gpt2")
    report = _job("gpt", gpt2, serving, tmp_path, record_property, "fine-tune: gpt2 lora",
                  serve=False, finetune="lora", lr=0.01)
    out = tmp_path / "adapter"
    export = export_peft(report["run_dir"], out, check_texts=["The event loop"])
    assert export.max_logit_difference <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                     "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").stat().st_size * 10 < \
        sum(f.stat().st_size for f in gpt2.iterdir() if f.suffix == ".safetensors")
    by_job = tmp_path / "by-job"  # runs/<job name>: that job's latest run, as in the README
    export_peft(Path(report["run_dir"]).parent / report["name"], by_job, check_texts=["a"])
    assert (by_job / "adapter_model.safetensors").read_bytes() == \
        (out / "adapter_model.safetensors").read_bytes()

    winner = load_bundle(Path(report["run_dir"]) / "winner")
    base = GPT2LMHeadModel.from_pretrained(gpt2)
    ids = torch.tensor([winner.tokenizer.encode("Return the number of items.").ids])
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        ours = winner.model(ids)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(gpt2)
    assert (adapted - ours).abs().max() <= 1e-4  # the adapters are the winner's...
    assert (plain - ours).abs().max() > 1e-3  # ...and they change what the base answers
