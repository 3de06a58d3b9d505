"""What each sweep.search runs, without Ray: the trials random search draws (the same for a
seed, every grid point times num_samples), what early stopping compares trials at, and a
restored optimizer that takes the spec's lr and regularization (PBT's mutations)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_spec

from orchestrator.spec import parse_spec
from orchestrator.sweep.search import TRAIN_TIME, comparison
from orchestrator.sweep.space import TRIAL_KEY, sample_configs, trial_values
from orchestrator.train.optim import build_optimizer, build_scheduler, set_hyperparameters

SPACE = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.arch": {"grid": ["transformer", "lstm"]},
         "train.optimizer": {"choice": ["adamw", "sgd"]}}


def test_random_search_draws_the_same_trials_for_a_seed_and_others_for_another():
    spec = parse_spec(tiny_spec("gpt", sweep={"num_samples": 3, "space": SPACE}))
    trials = sample_configs(spec)
    assert len(trials) == 6 and trials == sample_configs(spec)
    assert [t["model.arch"] for t in trials] == ["transformer", "lstm"] * 3
    assert all(1e-4 <= t["train.lr"] <= 1e-2 for t in trials)
    other = parse_spec(tiny_spec("gpt", sweep={"num_samples": 3, "space": SPACE, "seed": 1}))
    assert sample_configs(other) != trials


def test_a_trials_values_are_its_draw_with_what_tune_set_and_none_without_a_config():
    spec = parse_spec(tiny_spec("gpt", sweep={"num_samples": 2, "space": SPACE}))
    trials = sample_configs(spec)
    assert trial_values({TRIAL_KEY: 1, "train.lr": 0.5}, trials) == {**trials[1], "train.lr": 0.5}
    # A trial restored after a driver kill that Tune never gave a config to (the report's
    # table of a resumed sweep read it, and raised TypeError).
    assert trial_values(None, trials) == {}


@pytest.mark.parametrize("space, max_time_s, attribute", [
    (SPACE, 60, TRAIN_TIME),                     # architectures under a time budget: seconds
    (SPACE, 0, "training_iteration"),            # no per-trial time: evaluations
    ({"train.lr": SPACE["train.lr"]}, 60, "training_iteration"),  # the same cost per step
])
def test_trials_of_different_cost_per_step_are_compared_at_equal_training_time(
        space, max_time_s, attribute):
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 100, "eval_interval": 10,
                                              "max_time_s": max_time_s},
                                sweep={"space": space, "grace_period": 2}))
    compare = comparison(spec)
    assert compare.attribute == attribute
    if attribute == TRAIN_TIME:  # the first rung at the same share of the trial as in steps
        assert compare.grace == pytest.approx(60 * 2 / 10) and compare.max_t > 60


def test_a_trial_that_trains_to_its_time_is_first_compared_after_a_share_of_it():
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 100_000, "eval_interval": 250,
                                              "max_time_s": 300},
                                sweep={"space": SPACE, "grace_period": 2}))
    assert comparison(spec).grace == pytest.approx(300 * 2 / 10)  # not 300 * 2 / 400


def test_a_restored_optimizer_takes_the_specs_lr_and_regularization():
    spec = parse_spec(tiny_spec("gpt", train={"lr": 1e-3, "weight_decay": 0.1}))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, spec.train)
    scheduler = build_scheduler(optimizer, spec.train)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    mutated = parse_spec(tiny_spec("gpt", train={"lr": 2e-3, "weight_decay": 0.2})).train
    restored = build_optimizer(model, mutated)
    restored_schedule = build_scheduler(restored, mutated)
    restored.load_state_dict(saved[0])
    restored_schedule.load_state_dict(saved[1])
    set_hyperparameters(restored, restored_schedule, mutated)
    # Twice the lr at the same point of the schedule, and the new weight decay.
    assert restored_schedule.get_last_lr()[0] == pytest.approx(2 * scheduler.get_last_lr()[0])
    assert [g["weight_decay"] for g in restored.param_groups] == [0.2, 0.0]
