"""What LoRA saves against full fine-tuning, and how exactly an export round-trips.

From the tiny GPT-2 of bench/checkpoints.py, staged as a job stages it: full fine-tuning and
LoRA (the spec's defaults: rank 8 on the attention projections) each take one AdamW step and
write a training checkpoint; the rows give the parameters, the share that trains and the
checkpoint's bytes (every file of it). GPT-2 small's share is counted on the meta device (its
shape, no weights). The export row writes a from-scratch GPT bundle as a Hugging Face model and
loads it back with transformers. The headline ratio is full over LoRA checkpoint bytes (the
target is at least 10).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from orchestrator.bench import BenchResult
from orchestrator.bench.bundles import initial_bundle
from orchestrator.bench.checkpoints import tiny_gpt2
from orchestrator.bench.repository import sample_corpus
from orchestrator.export import export_hf
from orchestrator.models import build_model
from orchestrator.pretrained import stage_base
from orchestrator.records import DataInfo
from orchestrator.spec import Task, parse_spec
from orchestrator.storage import resolve
from orchestrator.train.optim import build_optimizer
from orchestrator.weights.checkpoint import save_checkpoint
from orchestrator.weights.lora import prepare_finetune, trainable_share
from orchestrator.weights.model import starting_model

TEXTS = ["Return the number of items in the queue.", "The event loop runs the tasks"]


def _spec(pretrained: str, finetune: str):
    return parse_spec({"data": {"path": str(sample_corpus()), "block_size": 64},
                       "model": {"task": "language_model", "pretrained": pretrained, "dropout": 0.0},
                       "train": {"finetune": finetune}})


def _checkpoint_row(finetune: str, gpt2: Path, scratch: Path) -> dict:
    spec = _spec(str(gpt2), finetune)
    base = stage_base(spec, resolve(scratch / "base"))
    info = DataInfo(Task.LANGUAGE_MODEL, base.config["vocab_size"], base.eos_id, base.pad_id, 64,
                    architecture=base.config)
    model = starting_model(spec, info, scratch / "base")
    optimizer = build_optimizer(model, spec.train)
    ids = torch.randint(0, info.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1]).logsumexp(-1).mean().backward()
    optimizer.step()
    checkpoint = scratch / finetune
    save_checkpoint(checkpoint, model, optimizer, {"step": 1}, rank=0)
    params = sum(p.numel() for p in model.parameters())
    return {"model": "tiny GPT-2", "finetune": finetune, "params": params,
            "trained_share": trainable_share(model),
            "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.iterdir())}


def _gpt2_small_share() -> dict:
    from transformers import GPT2Config

    config = GPT2Config().to_dict()  # gpt2's shape: 12 layers, 768 wide, 50257 tokens
    info = DataInfo(Task.LANGUAGE_MODEL, config["vocab_size"], 0, 0, 1024, architecture=config)
    spec = _spec("gpt2", "lora")
    with torch.device("meta"):
        model = prepare_finetune(build_model(spec, info), spec, config)
    return {"model": "GPT-2 small (shape)", "finetune": "lora",
            "params": sum(p.numel() for p in model.parameters()),
            "trained_share": trainable_share(model), "checkpoint_bytes": None}


def run(quick: bool) -> BenchResult:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        gpt2 = tiny_gpt2(scratch / "gpt2")
        rows = [_checkpoint_row(kind, gpt2, scratch) for kind in ("full", "lora")]
        rows.append(_gpt2_small_share())
        rows_of_text = [json.loads(line) for line in sample_corpus().read_text().splitlines()[:300]]
        spec = parse_spec({"data": {"path": str(sample_corpus()), "vocab_size": 512, "block_size": 64}})
        bundle = initial_bundle(scratch / "bundle", spec, rows_of_text)
        export = export_hf(bundle, scratch / "hf", check_texts=TEXTS)
    full, lora = rows[0]["checkpoint_bytes"], rows[1]["checkpoint_bytes"]
    return BenchResult(
        "finetune", rows, ratio=full / lora,
        ratio_means="full fine-tuning's checkpoint bytes over LoRA's (target >= 10)",
        notes={"export round trip, max |logit difference| (from-scratch GPT, transformers)":
               f"{export.max_logit_difference:.2e} on {export.texts_checked} texts"})
