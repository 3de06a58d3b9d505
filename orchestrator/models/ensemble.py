"""Classifiers that answer as one: the sweep's best trials, averaged.

Trials that differ in architecture or regularization make different mistakes on short texts;
the mean of their class probabilities is right more often than the best of them alone (Caruana
et al., 2004, "Ensemble Selection from Libraries of Models"). The members are chosen on the
validation split (`choose_members`), greedily: start from the best trial, add the trial that
improves the sweep metric of the mean most, stop when none does or at the size asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# log(0) would make a class no member believes in -inf; softmax maps the floor back to ~0.
LOG_FLOOR = 1e-12


class Ensemble(nn.Module):
    """`forward(ids)` returns the log of the members' mean class probabilities: logits whose
    softmax is that mean, so the ensemble evaluates, predicts and serves as any classifier."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return mean_probabilities([m(ids).float().softmax(-1) for m in self.members]) \
            .clamp(min=LOG_FLOOR).log()


def mean_probabilities(probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(probabilities)).mean(0)


def choose_members(probabilities: Sequence[torch.Tensor], score: Callable[[torch.Tensor], float],
                   size: int) -> list[int]:
    """Indices of the members, in the order chosen, from each candidate's class probabilities
    on the validation rows; `score` rates a mean of them (higher is better)."""
    scores = [score(p) for p in probabilities]
    chosen = [max(range(len(probabilities)), key=scores.__getitem__)]
    best = scores[chosen[0]]
    while len(chosen) < size:
        trials = {i: score(mean_probabilities([probabilities[j] for j in (*chosen, i)]))
                  for i in range(len(probabilities)) if i not in chosen}
        if not trials or max(trials.values()) <= best:
            break
        added = max(trials, key=trials.__getitem__)
        chosen.append(added)
        best = trials[added]
    return chosen
