"""Post-training dynamic int8 quantization for CPU serving (torch.ao's quantize_dynamic).

Linear layers keep int8 weights and quantize their input per call; embeddings keep int8 rows
with a float scale each (weight-only). A tied output head becomes its own int8 Linear beside the
int8 embedding. Optional clipping at a percentile of each matrix's absolute values first, so a
few outliers do not stretch the int8 scale over the many small weights.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def clip_weights(model: nn.Module, percentile: float) -> None:
    """Clamp every Linear and Embedding weight to ± its own `percentile` of |w| (in place)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                bound = torch.quantile(weight.detach().abs().float().flatten()[:2**24],
                                       percentile / 100)
                weight.clamp_(-bound, bound)


def quantize_int8(model: nn.Module, clip_percentile: float | None = None) -> nn.Module:
    """An int8 copy of a float model (eval mode, CPU); the model itself is not changed."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        quantize_dynamic,
    )

    model = copy.deepcopy(model).cpu().eval()
    if clip_percentile is not None:
        clip_weights(model, clip_percentile)
    plan: dict[type[nn.Module], object] = {nn.Linear: default_dynamic_qconfig}
    if all(m.padding_idx is None for m in model.modules() if isinstance(m, nn.Embedding)):
        plan[nn.Embedding] = float_qparams_weight_only_qconfig  # no padding_idx support
    with warnings.catch_warnings():  # torch.ao's deprecation notices, once per layer
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(model, plan, dtype=torch.qint8)
    for layer in quantized.modules():
        if isinstance(layer, nn.TransformerEncoderLayer):
            layer.register_forward_pre_hook(_regular_path)
    return quantized


def _regular_path(module: nn.Module, args: tuple) -> None:
    """Nothing; being there is the point. nn.TransformerEncoderLayer's fused inference path reads
    linear1.weight as a tensor, and an int8 Linear's weight is a method: a layer with a forward
    pre-hook takes its regular path, which runs the int8 layers."""

