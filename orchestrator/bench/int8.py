"""Where int8 pays: decode tokens/s of fp32 against dynamic int8 (the compress stage's
`quantize_int8`) by model width, from the quickstart's shape to GPT-2 small's.

Beside each speed-up it prints the share of an fp32 decode step spent in the Linear layers, the
only layers dynamic int8 speeds up. Quantizing them cannot make a step faster than
1 / (1 - share) (Amdahl), whatever the kernel: that bound says why int8 does not pay on a small
model, where a step is mostly attention, layer norms and per-op overhead.

Random GPTs (speed does not depend on the weights), decoded greedily with the model's KV cache in
a bare argmax loop (bench decode's `cached_greedy`), on one torch thread, a replica's share. The
headline ratio is int8 over fp32 at batch 1 on the widest shape.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from orchestrator.bench import BenchResult
from orchestrator.bench.decode import best_seconds, cached_greedy
from orchestrator.models import GPT
from orchestrator.weights.int8 import quantize_int8

PROMPT_TOKENS = 8
BATCHES = (1, 8)
SHAPES = {
    "quickstart": {"vocab_size": 2048, "n_layer": 2, "n_head": 4, "d_model": 128},
    "d_model 384": {"vocab_size": 8192, "n_layer": 6, "n_head": 6, "d_model": 384},
    "GPT-2 small": {"vocab_size": 50257, "n_layer": 12, "n_head": 12, "d_model": 768},
}
QUICK_SHAPES = {
    "quickstart": SHAPES["quickstart"],
    "d_model 256": {"vocab_size": 4096, "n_layer": 2, "n_head": 4, "d_model": 256},
}


@contextmanager
def linear_seconds(model: nn.Module) -> Iterator[list[float]]:
    """Time spent inside the model's nn.Linear layers while the block runs (one growing total)."""
    total, started = [0.0], [0.0]

    def start(*_: object) -> None:
        started[0] = time.perf_counter()

    def stop(*_: object) -> None:
        total[0] += time.perf_counter() - started[0]

    linears = [m for m in model.modules() if type(m) is nn.Linear]
    handles = [h for m in linears for h in (m.register_forward_pre_hook(start),
                                            m.register_forward_hook(stop))]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def linear_share(model: GPT, prompt: torch.Tensor, new_tokens: int) -> float:
    """The share of a greedy decode's time spent in nn.Linear layers (after a warm-up)."""
    cached_greedy(model, prompt, new_tokens)
    with linear_seconds(model) as inside:
        started = time.perf_counter()
        cached_greedy(model, prompt, new_tokens)
        whole = time.perf_counter() - started
    return inside[0] / whole


def measure(name: str, config: dict[str, int], new_tokens: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    fp32 = GPT(**config, block_size=PROMPT_TOKENS + new_tokens, dropout=0.0).eval()
    int8 = quantize_int8(fp32)
    params = sum(p.numel() for p in fp32.parameters())
    rows = []
    with torch.inference_mode():
        for batch in BATCHES:
            prompt = torch.randint(0, config["vocab_size"], (batch, PROMPT_TOKENS))
            (fp32_s, _), (int8_s, _) = best_seconds(
                [partial(cached_greedy, fp32, prompt, new_tokens),
                 partial(cached_greedy, int8, prompt, new_tokens)], repeats)
            share = linear_share(fp32, prompt, new_tokens)
            tokens = batch * new_tokens
            rows.append({"model": name, "params_M": params / 1e6, "batch": batch,
                         "fp32_tok_s": tokens / fp32_s, "int8_tok_s": tokens / int8_s,
                         "int8_speedup": fp32_s / int8_s, "linear_share": share,
                         "bound": 1 / (1 - share)})
    return rows


def run(quick: bool) -> BenchResult:
    shapes, new_tokens, repeats = (QUICK_SHAPES, 8, 1) if quick else (SHAPES, 32, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [row for name, config in shapes.items()
                for row in measure(name, config, new_tokens, repeats)]
    finally:
        torch.set_num_threads(threads)
    widest = rows[-len(BATCHES)]
    return BenchResult(
        name="int8", rows=rows, ratio=widest["int8_speedup"],
        ratio_means=f"int8 over fp32 decode tokens/s at batch 1 on the {widest['model']} shape",
        notes={"models": dict(shapes),
               "method": f"random GPTs, greedy KV-cache decoding of {new_tokens} tokens after a "
                         f"{PROMPT_TOKENS}-token prompt, one torch thread; best of {repeats} "
                         f"after a warm-up, fp32 and int8 taking turns",
               "bound": "1 / (1 - linear_share): the most that any faster Linear layer can give "
                        "(linear_share timed with forward hooks on the fp32 model)"})
