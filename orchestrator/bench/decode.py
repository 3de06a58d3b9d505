"""Decoding speed: tokens/s of greedy KV-cache decoding against cache-less `GPT.generate`.

The model is randomly initialised: speed does not depend on the weights, and greedy decoding of
the same weights must give the same tokens both ways, which the notes report. The cached path is
the model's cache API in a bare argmax loop, so the figures measure decoding, not the sampling
and detokenisation that `orchestrator.inference.predictor.Decoding` adds per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

import torch

from orchestrator.bench import BenchResult
from orchestrator.models import GPT

PROMPT_TOKENS = 16
BATCHES = (1, 8)
FULL = {"vocab_size": 2048, "block_size": 512, "n_layer": 4, "n_head": 4, "d_model": 256}
QUICK = {"vocab_size": 512, "block_size": 64, "n_layer": 2, "n_head": 2, "d_model": 64}


def cached_greedy(model: GPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prompt and new_tokens greedy tokens: one prefill, then one (batch, 1) forward per token."""
    batch = prompt.shape[0]
    cache = model.new_cache(batch, prompt.shape[1] + new_tokens - 1, torch.zeros(batch, dtype=torch.long))
    logits = model(prompt, cache)[:, -1]
    ids = [prompt]
    for step in range(new_tokens):
        ids.append(logits.argmax(dim=-1, keepdim=True))
        if step < new_tokens - 1:  # the last token is never fed back
            logits = model(ids[-1], cache)[:, -1]
    return torch.cat(ids, dim=1)


def best_seconds(decoders: list[Callable[[], torch.Tensor]], repeats: int) -> list[tuple[float, torch.Tensor]]:
    """Each decoder's fastest of `repeats` timed runs after one warm-up, and its tokens. The
    decoders take turns, so that a change in the machine's load hits them alike."""
    outs = [decode() for decode in decoders]
    best = [math.inf] * len(decoders)
    for _ in range(repeats):
        for i, decode in enumerate(decoders):
            start = time.perf_counter()
            outs[i] = decode()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


def run(quick: bool) -> BenchResult:
    config, new_tokens, repeats = (QUICK, 32, 1) if quick else (FULL, 256, 3)
    torch.manual_seed(0)
    model = GPT(**config, dropout=0.0).eval()
    rows, identical = [], True
    with torch.inference_mode():
        for batch in BATCHES:
            prompt = torch.randint(0, config["vocab_size"], (batch, PROMPT_TOKENS))
            (plain_s, plain), (cached_s, cached) = best_seconds(
                [partial(model.generate, prompt, new_tokens, temperature=0),
                 partial(cached_greedy, model, prompt, new_tokens)], repeats)
            identical &= torch.equal(plain, cached)
            tokens = batch * new_tokens
            rows.append({"batch": batch, "new_tokens": new_tokens,
                         "cacheless_tok_s": tokens / plain_s, "kv_cache_tok_s": tokens / cached_s,
                         "speedup": plain_s / cached_s})
    return BenchResult(
        name="decode", rows=rows, ratio=rows[0]["speedup"],
        ratio_means=f"KV-cache over cache-less tokens/s, batch 1, {new_tokens} new tokens "
                    f"after a {PROMPT_TOKENS}-token prompt (target >= 5x at 256 new tokens)",
        notes={"model": f"random GPT {config}, fp32, CPU",
               "threads": f"{torch.get_num_threads()} torch threads, left as the process set them "
                          f"(OMP_NUM_THREADS or torch's default)",
               "method": "greedy; kv_cache = GPT.new_cache + forward(ids, cache) in an argmax loop "
                         "(no sampling, no detokenisation); cache-less = GPT.generate(temperature=0)",
               "timing": f"best of {repeats} after one warm-up, the two paths taking turns",
               "same_tokens": identical})
