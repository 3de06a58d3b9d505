"""Masks that keep pruned weights at zero while a model trains on (a pruned model's recovery).

Pruned weights are stored as exact zeros in an ordinary bundle: a recovery run finds them again
from the weights it starts from (zero_masks), so no mask travels beside the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.train.parallel import transformer_blocks


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices of every Linear layer inside the transformer blocks, by name."""
    blocks = transformer_blocks(model)
    block_ids = {id(m) for block in blocks for m in block.modules()}
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) in block_ids}


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where the prunable weights are non-zero: what apply_masks keeps."""
    return {name: weight.detach() != 0 for name, weight in prunable_weights(model).items()}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Put the pruned weights back to zero (after an optimizer step moved them)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
