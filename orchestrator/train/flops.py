"""Model FLOPs and model FLOPs utilisation (MFU), as in nanoGPT's estimate_mfu.

MFU is the achieved model FLOP/s over the device's peak: it counts only the FLOPs the model needs
(6N + 12*L*d*T per token, PaLM appendix B), not recomputation or other overhead, so it compares
runs across hardware and implementations.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets: (bf16/fp16, tf32, fp32). Matched as
# substrings of torch.cuda.get_device_name in this order, so that the more specific name wins
# ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
_PEAK_FLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756e12, 378e12, 51.2e12)),
    ("H200", (989e12, 494.5e12, 66.9e12)),
    ("H100", (989e12, 494.5e12, 66.9e12)),  # SXM ("H100 80GB HBM3")
    ("A100", (312e12, 156e12, 19.5e12)),
    ("L40S", (362e12, 183e12, 91.6e12)),
    ("L4", (121e12, 60e12, 30.3e12)),
    ("A10G", (125e12, 62.5e12, 31.2e12)),
    ("A10", (125e12, 62.5e12, 31.2e12)),
)


def non_embedding_params(model: nn.Module) -> int:
    """N in the FLOPs estimate: every parameter once (tied weights once), less the learned
    position embedding, which is a lookup and costs no matmul (as nanoGPT counts). The token
    embedding stays in because, tied to the output head, its matmul is real work."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    wpe = getattr(model, "wpe", None)
    if isinstance(wpe, nn.Embedding):
        total -= wpe.weight.numel()
    return total


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the forward and backward of the weight matmuls (2 + 4
    FLOPs per weight) plus 12*L*d*T for the attention scores and their weighted sum."""
    return 6.0 * n_params + 12.0 * n_layer * d_model * seq_len


def model_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """flops_per_token for our GPT (pass the plain model, before compile or DDP wrap it);
    None for models the formula does not describe, such as the classifier."""
    if not (hasattr(model, "blocks") and isinstance(getattr(model, "wte", None), nn.Embedding)):
        return None
    return flops_per_token(non_embedding_params(model), len(model.blocks),
                           model.wte.embedding_dim, seq_len)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of a known NVIDIA GPU for matmuls in dtype (fp32 counts as tf32 when
    torch allows tf32 matmuls); None on CPU, for unknown GPUs or other dtypes, so that the
    caller reports FLOP/s without an MFU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32, fp32) in _PEAK_FLOPS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            if dtype == torch.float32:
                return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
            return None
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of peak (0.4 is 40%); None without a known peak."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / peak
