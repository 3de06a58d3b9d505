"""What a bundle costs to serve: its size on disk, its speed on the serving device (decode
tokens/s at batch 1 and 8 for a language model, texts/s for a classifier), and the p50 latency
of its real service. Plain functions; the stage runs `speed` in a Ray task with a replica's
resources, so it measures on the device the service would use."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import requests
import torch

from orchestrator.evaluate import load_on_device
from orchestrator.inference.predictor import Predictor
from orchestrator.inference.sampling import SamplingParams
from orchestrator.records import MODEL_FILE
from orchestrator.serve.auth import load_keys
from orchestrator.spec import JobSpec, Task
from orchestrator.storage import resolve

DECODE_TOKENS = 32
LATENCY_TOKENS = 16
PROMPT = "The event loop"


def size_bytes(bundle_dir: str | Path) -> int:
    """The bundle's weights on disk."""
    location = resolve(bundle_dir).join(MODEL_FILE)
    return location.fs.get_file_info(location.path).size


def _decode_tokens_per_s(predictor: Predictor, batch: int, rounds: int) -> float:
    prompt = predictor.encode(PROMPT)
    tokens = min(DECODE_TOKENS, predictor.context_length - len(prompt))  # what the context holds
    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * batch
    prompts = [prompt] * batch
    predictor.complete(prompts, params)  # warm-up
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        decoded = sum(c.completion_tokens for c in predictor.complete(prompts, params))
        rates.append(decoded / (time.perf_counter() - started))
    return statistics.median(rates)


def speed(bundle_dir: str, texts: list[str], rounds: int = 7) -> dict[str, float]:
    """Decode tokens/s at batch 1 and 8 (greedy, DECODE_TOKENS each, past EOS: a model that
    ends early would time its prompt, not its decoding), or classified texts/s: the median of
    `rounds` rounds, after a warm-up."""
    torch.set_num_threads(1)  # a replica's share of the machine, as the service runs it
    bundle = load_on_device(bundle_dir)
    predictor = Predictor(bundle)
    if bundle.info.task == Task.LANGUAGE_MODEL:
        return {"decode_tokens_per_s_batch1": _decode_tokens_per_s(predictor, 1, rounds),
                "decode_tokens_per_s_batch8": _decode_tokens_per_s(predictor, 8, rounds)}
    predictor.classify(texts[:8])
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        predictor.classify(texts)
        rates.append(len(texts) / (time.perf_counter() - started))
    return {"texts_per_s": statistics.median(rates)}


def _probe(spec: JobSpec, url: str, task: Task,
           headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The request timed: a completion of PROMPT (cut to half the context when the context is
    small, as token ids) for up to LATENCY_TOKENS tokens, or the spec's sample texts classified."""
    if task == Task.CLASSIFIER:
        return "/v1/classify", {"model": spec.name, "input": spec.serve.sample_requests}
    response = requests.post(f"{url}/tokenize", json={"model": spec.name, "prompt": PROMPT},
                             headers=headers, timeout=60)
    response.raise_for_status()
    tokenized = response.json()
    prompt = tokenized["tokens"][:max(1, tokenized["max_model_len"] // 2)]
    return "/v1/completions", {
        "model": spec.name, "prompt": prompt, "temperature": 0, "ignore_eos": True,
        "max_tokens": min(LATENCY_TOKENS, tokenized["max_model_len"] - len(prompt))}


def service_p50_s(spec: JobSpec, url: str, task: Task, count: int) -> float:
    """p50 latency of `count` requests sent one at a time to a running service at `url`, with
    the service's first API key when it has keys."""
    keys = load_keys(spec.serve)
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    route, body = _probe(spec, url, task, headers)
    latencies: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        response = requests.post(f"{url}{route}", json=body, headers=headers, timeout=60)
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
    return statistics.median(latencies)


def speed_key(task: Task) -> str:
    """The figure selection ranks variants by."""
    return "decode_tokens_per_s_batch1" if task == Task.LANGUAGE_MODEL else "texts_per_s"

