"""`orchestrator bench adapters`: many LoRA fine-tunes served on one base. One replica (1 CPU,
max_batch_size 32) serves the tiny GPT-2 base (bench/checkpoints.py: 2 layers, 64 wide) with 8
adapters (rank 8 on the attention's qkv, peft's default for GPT-2); closed loop at concurrency
32 of 16-token greedy completions, (a) every request to the base alone (no adapter), (b) the
requests spread evenly over the 8 adapters (client i asks adapter i mod 8), so every batch
mixes them. Also: the memory each added adapter takes in the replica (its slot's tensors in
every adapted layer, allocated once per slot) and its file's size.

The family is made here without training (adapters of random factors, saved by peft): a
run directory laid out as a LoRA fine-tune leaves it (winner/ and the staged base/), which the
service tests reuse (`lora_family`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.bench import BenchResult
from orchestrator.bench.checkpoints import tiny_gpt2

ADAPTERS = 8
CONCURRENCY = 32
REQUEST = {"prompt": "The event loop", "max_tokens": 16, "temperature": 0}


@dataclass
class Family:
    run_dir: Path  # a LoRA run's layout: winner/ (a bundle of the base's weights) and base/
    base: Path  # the GPT-2 checkpoint (model.pretrained)
    adapters: dict[str, Path]  # PEFT adapter directories, by name


def make_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int = 8) -> Path:
    """A LoRA adapter of `base` with random, non-zero factors, saved by peft (safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, fan_in_fan_out=True,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)  # a change of the answers, not noise that swamps them
    model.save_pretrained(out)
    return out


def lora_family(root: Path, adapters: int, name: str = "family", serve: dict | None = None,
                targets: tuple[str, ...] = ("c_attn",), r: int = 8) -> Family:
    """A tiny GPT-2, a run directory of a LoRA fine-tune of it (spec with model.pretrained and
    train.finetune lora; winner/ holding the base's weights; base/ the staged checkpoint) and
    `adapters` PEFT adapters of it named a0, a1, ..."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config

    from orchestrator.bundle import write_bundle
    from orchestrator.models import build_model
    from orchestrator.records import DataInfo
    from orchestrator.spec import Task, parse_spec
    from orchestrator.weights.base import load_base_weights

    base = tiny_gpt2(root / "gpt2")
    spec = parse_spec({"name": name, "data": {"path": str(root / "unused.jsonl")},
                       "model": {"task": "language_model", "pretrained": str(base),
                                 "dropout": 0.0},
                       "train": {"finetune": "lora"}, "serve": serve or {}})
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    architecture = GPT2Config.from_pretrained(base).to_dict()
    info = DataInfo(Task.LANGUAGE_MODEL, tokenizer.get_vocab_size(), eos, eos,
                    architecture["n_positions"],
                    special_tokens={"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
                    architecture=architecture)
    model = build_model(spec, info)
    load_base_weights(model, base, [])
    run_dir = root / "run"
    write_bundle(run_dir / "winner", spec, info, model.state_dict(), base / "tokenizer.json", {},
                 {"trial_id": None, "note": "the base's weights: a LoRA run's layout, untrained"})
    shutil.copytree(base, run_dir / "base")
    made = {f"a{i}": make_adapter(base, root / f"a{i}", i + 1, list(targets), r)
            for i in range(adapters)}
    return Family(run_dir, base, made)


async def _spread(url: str, concurrency: int, seconds: float, bodies: list[dict[str, Any]],
                  warmup_s: float) -> dict[str, float]:
    """bench/load.py's closed loop with client i posting bodies[i mod len(bodies)]."""
    import aiohttp
    import numpy as np

    from orchestrator.bench.load import _client

    latencies: list[float] = []
    errors: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        warm_until = time.perf_counter() + warmup_s
        stop_at = warm_until + seconds
        await asyncio.gather(*(_client(session, url, bodies[i % len(bodies)], warm_until,
                                       stop_at, latencies, errors)
                               for i in range(concurrency)))
    ms = np.array(latencies) * 1000 if latencies else np.array([math.nan])
    return {"requests_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors)}


def measure(url: str, seconds: float, models: list[str], request: dict[str, Any]
            ) -> dict[str, float]:
    """One closed-loop run from a separate process (it must not share the server's CPU time
    with this one's interpreter)."""
    bodies = [{**request, "model": model} for model in models]
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.bench.adapters", f"{url}/v1/completions",
         str(CONCURRENCY), str(seconds), json.dumps(bodies), str(min(2.0, seconds / 2))],
        capture_output=True, text=True, check=True, timeout=seconds + 120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def adapter_bytes(family: Family) -> tuple[int, int]:
    """The replica's memory per added adapter (one slot's tensors in every adapted layer, as
    the pool allocates them) and an adapter file's size."""
    from orchestrator.weights.adapters import AdapterPool, base_bundle

    pool = AdapterPool(base_bundle(family.run_dir / "winner").model,
                       {n: str(p) for n, p in family.adapters.items()}, len(family.adapters))
    file = next(iter(family.adapters.values())) / "adapter_model.safetensors"
    return pool.slot_bytes, file.stat().st_size


def run(quick: bool) -> BenchResult:
    import ray
    from ray import serve

    from orchestrator.bench.serve import free_port
    from orchestrator.bundle import read_spec_and_info
    from orchestrator.serve import deploy
    from orchestrator.spec import ServeSpec

    seconds, request = (1.0, {**REQUEST, "max_tokens": 4}) if quick else (10.0, REQUEST)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", log_to_driver=False, logging_level="WARNING")  # never another's
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        family = lora_family(Path(scratch), ADAPTERS, "bench")
        spec, _ = read_spec_and_info(family.run_dir / "winner")
        limits = ServeSpec.model_validate({
            **spec.serve.model_dump(), "port": free_port(), "replica_cpus": 1,
            "max_batch_size": CONCURRENCY, "max_queued_requests": 128,
            "adapters": {n: str(p) for n, p in family.adapters.items()},
            "max_adapters": ADAPTERS})
        spec = spec.model_copy(update={"serve": limits})
        try:
            url = deploy(spec, family.run_dir / "winner")
            for label, models in (("base alone", [spec.name]),
                                  (f"{ADAPTERS} adapters, spread evenly", list(family.adapters))):
                rows.append({"requests": label, "concurrency": CONCURRENCY,
                             **measure(url, seconds, models, request)})
        finally:
            serve.shutdown()
        slot, file = adapter_bytes(family)
    if started_ray:
        ray.shutdown()
    base, spread = rows[0]["requests_per_s"], rows[1]["requests_per_s"]
    notes = {"memory per added adapter (KiB, its slot in every adapted layer)": slot / 1024,
             "adapter file (KiB)": file / 1024, "adapters": ADAPTERS, "rank": 8,
             "request": json.dumps(request), "seconds per cell": seconds}
    return BenchResult("adapters", rows, spread / base if base else math.nan,
                       f"requests/s with {ADAPTERS} adapters spread evenly over the base alone "
                       f"at concurrency {CONCURRENCY} (target >= 0.7)", notes)


if __name__ == "__main__":
    url, concurrency, seconds, bodies = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
        json.loads(sys.argv[4])
    warmup = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(asyncio.run(_spread(url, concurrency, seconds, bodies, warmup))))
