"""Global magnitude pruning of the transformer blocks' linear weights, and the masks that keep
pruned weights at zero through a recovery fine-tune.

The threshold is global (one over all the blocks' matrices), so layers that matter less lose
more. Embeddings, norms, biases and the output head are kept whole. Pruned weights are stored as
exact zeros in an ordinary bundle: the recovery run finds them again from the weights it starts
from (zero_masks), so no mask travels beside the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.train.config import Beginning, WorkerConfig
from orchestrator.train.masks import prunable_weights
from orchestrator.train.objectives import objective_for
from orchestrator.weights.model import load_bundle, starting_model


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


@dataclass(frozen=True)
class PrunedRecovery:
    """A pruned model's recovery fine-tune starts from its pruned bundle and keeps the pruned
    weights at zero."""

    pruned: str  # the pruned bundle

    def begin(self, config: WorkerConfig, device: torch.device) -> Beginning:
        model = starting_model(config.spec, config.info, config.run_dir.base)
        model.load_state_dict(load_bundle(self.pruned).model.state_dict())
        return Beginning(model, objective_for(config.info, config.spec.train.loss),
                         keep_zeros=True)
