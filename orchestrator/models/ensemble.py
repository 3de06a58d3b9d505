"""Classifiers that answer as one: the sweep's best trials, averaged.

Trials that differ in architecture or regularization make different mistakes on short texts;
the mean of their class probabilities is right more often than the best of them alone (Caruana
et al., 2004, "Ensemble Selection from Libraries of Models"). The members are chosen on the
validation split (`choose_members`): the trials ranked by their own metric, the first n of them
(n up to the size asked) whose mean scores best. Only the cut is chosen, not every subset:
on a validation split of a few thousand texts, a search over combinations fits its noise.
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
    """Indices of the members, best first, from each candidate's class probabilities on the
    validation rows; `score` rates a mean of them (higher is better). The candidates ranked by
    their own score, the members are the first n of them (n up to `size`) whose mean scores best;
    a tie goes to the fewer."""
    scores = [score(p) for p in probabilities]
    ranked = sorted(range(len(probabilities)), key=lambda i: -scores[i])[:size]
    prefix_scores = [score(mean_probabilities([probabilities[i] for i in ranked[:n]]))
                     for n in range(1, len(ranked) + 1)]
    best = max(range(len(prefix_scores)), key=prefix_scores.__getitem__)
    return ranked[:best + 1]
