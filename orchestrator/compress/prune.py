"""Global magnitude pruning of the transformer blocks' linear weights, and the masks that keep
pruned weights at zero through a recovery fine-tune.

The threshold is global (one over all the blocks' matrices), so layers that matter less lose
more. Embeddings, norms, biases and the output head are kept whole. Pruned weights are stored as
exact zeros in an ordinary bundle: the recovery run finds them again from the weights it starts
from (zero_masks), so no mask travels beside the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.train.masks import prunable_weights


def prune_globally(model: nn.Module, sparsity: float) -> float:
    """Zero the `sparsity` share of smallest-magnitude prunable weights (in place); return the
    share of prunable weights that is zero afterwards."""
    weights = list(prunable_weights(model).values())
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    count = int(sparsity * magnitudes.numel())
    if count == 0:
        return 0.0
    threshold = torch.kthvalue(magnitudes, count).values
    with torch.no_grad():
        for weight in weights:
            weight.mul_(weight.abs() > threshold)
    return sparsity_of(model)


def sparsity_of(model: nn.Module) -> float:
    weights = list(prunable_weights(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)
