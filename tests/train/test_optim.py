"""Optimizer settings from the spec, the schedule, the L1 penalty and the metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from orchestrator.models import GPT
from orchestrator.spec import TrainSpec
from orchestrator.train.objectives import macro_f1
from orchestrator.train.optim import (
    Horizon,
    add_l1_gradient,
    build_optimizer,
    split_decay_parameters,
    warmup_cosine,
)


def _model() -> GPT:
    return GPT(vocab_size=20, block_size=4, n_layer=1, n_head=2, d_model=8, dropout=0.0)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_optimizer_settings(name, cls):
    train = TrainSpec(optimizer=name, lr=0.05, momentum=0.8, betas=(0.8, 0.9), weight_decay=0.1)
    optimizer = build_optimizer(_model(), train)
    assert isinstance(optimizer, cls)
    decay, no_decay = optimizer.param_groups
    assert decay["lr"] == 0.05 and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
    if name == "sgd":
        assert decay["momentum"] == 0.8
    else:
        assert decay["betas"] == (0.8, 0.9)


def test_decay_only_on_matrices_and_tied_weights_once():
    model = _model()
    decay, no_decay = split_decay_parameters(model)
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() < 2 for p in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # tied head counted once


def test_warmup_then_cosine():
    values = [warmup_cosine(s, 10, 100) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_the_schedule_ends_where_the_time_budget_will_run_out():
    horizon = Horizon(max_steps=2500, max_time_s=90)
    assert horizon.steps == 2500  # nothing timed yet
    horizon.update(step=100, train_time_s=7.5)  # 75 ms a step: 1,200 steps fit in 90 s
    assert horizon.steps == 1200
    horizon.update(step=200, train_time_s=9.0)  # faster now: more fit, but never past max_steps
    assert horizon.steps == 2000
    horizon.update(step=300, train_time_s=9.5)
    assert horizon.steps == 2500
    horizon.update(step=1300, train_time_s=95.0)  # past the budget: the schedule has ended
    assert horizon.steps == 1300 and warmup_cosine(1300, 50, horizon.steps) == pytest.approx(0.1)
    untimed = Horizon(max_steps=2500)  # no max_time_s: max_steps alone
    untimed.update(step=100, train_time_s=1000.0)
    assert untimed.steps == 2500


def test_l1_gradient_matches_autograd_of_the_penalty():
    weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    (0.3 * weight.abs().sum()).backward()
    expected = weight.grad.clone()
    weight.grad = torch.zeros_like(weight)
    add_l1_gradient([weight], 0.3)
    assert torch.allclose(weight.grad, expected)


def test_macro_f1():
    labels = np.array([0, 0, 1, 1])
    assert macro_f1(labels, labels, 2) == 1.0
    assert macro_f1(np.array([0, 0, 0, 0]), labels, 2) == pytest.approx((2 / 3 + 0) / 2)
