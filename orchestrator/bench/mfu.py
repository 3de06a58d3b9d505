"""Training throughput and MFU of GPT-2 small (124M) on one CUDA GPU, nanoGPT's recipe.

bf16 autocast, TF32 matmuls, torch.compile, fused AdamW, gradient clipping, and gradient
accumulation to GPT-2's 0.5M-token step. The token ids are random and made once on the GPU, so
the figures measure the model's training step, not data loading. MFU uses the dense bf16 peak
from orchestrator.train.flops; on a GPU missing from its table the row has FLOP/s but no MFU.
"""

from __future__ import annotations

import time

import torch

from orchestrator.bench import BenchmarkUnavailable, BenchResult
from orchestrator.models import GPT
from orchestrator.train.flops import mfu, model_flops_per_token, non_embedding_params, peak_flops
from orchestrator.train.objectives import lm_loss
from orchestrator.train.optim import split_decay_parameters

# 50304 = GPT-2's 50257 tokens padded to a multiple of 64, as nanoGPT does, for faster matmuls.
GPT2_SMALL = {"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "d_model": 768}
TOKENS_PER_STEP = 524288  # GPT-2's 0.5M-token batch


def run(quick: bool) -> BenchResult:
    if not torch.cuda.is_available():
        raise BenchmarkUnavailable(
            "bench mfu needs a CUDA GPU: it times GPT-2 small training in bf16 with "
            "torch.compile; run it on a machine with an NVIDIA GPU (`orchestrator bench "
            "train-overhead` and `scaling` run on CPU)")
    micro_batch, warmup, timed = (8, 3, 5) if quick else (16, 5, 20)
    seq = GPT2_SMALL["block_size"]
    accum = 1 if quick else TOKENS_PER_STEP // (micro_batch * seq)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    model = GPT(**GPT2_SMALL, dropout=0.0).to(device)
    n_params = non_embedding_params(model)
    per_token = model_flops_per_token(model, seq)  # on the plain model, before compile wraps it
    decay, no_decay = split_decay_parameters(model)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), fused=True)
    model = torch.compile(model)
    ids = torch.randint(0, GPT2_SMALL["vocab_size"], (micro_batch, seq + 1), device=device)

    def step() -> None:
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm_loss(model, ids) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The warm-up steps compile the model (and autotune), so compile time is not in the timing.
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(timed):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / timed

    tokens_per_step = micro_batch * seq * accum
    tokens_per_s = tokens_per_step / step_s
    peak = peak_flops(device, torch.bfloat16)
    utilisation = mfu(tokens_per_s, per_token, peak)
    row = {"config": "gpt2-124M bf16 compile", "params_M": n_params / 1e6,
           "micro_batch": micro_batch, "grad_accum": accum, "tokens_per_step": tokens_per_step,
           "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
           "tflops_per_s": tokens_per_s * per_token / 1e12,
           "mfu_percent": None if utilisation is None else 100 * utilisation,
           "peak_tflops": None if peak is None else peak / 1e12,
           "device": torch.cuda.get_device_name(device),
           "max_memory_GiB": torch.cuda.max_memory_allocated(device) / 2**30}
    return BenchResult(name="mfu", rows=[row], ratio=None,
                       notes={"flops_per_token": per_token,
                              "formula": "6N + 12*L*d*T, N without position embeddings"})
