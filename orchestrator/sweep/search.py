"""How the sweep searches (sweep.search) and when it ends trials early: the Tune search
algorithm, the scheduler and the attribute trials are compared on.

random and pbt run the trials space.sample_configs drew from sweep.seed (each Tune trial an
index into them), so a resume knows every trial it owes; tpe (Optuna) and bohb (TuneBOHB) propose
each trial from the results so far, seeded too, their state saved by Tune beside its trials.
Trials that draw different architectures or sizes cost different seconds per step, so with
train.max_time_s they are compared at equal training time (the loop's train_time_s), not at equal
steps."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    HyperBandForBOHB,
    PopulationBasedTraining,
    TrialScheduler,
)
from ray.tune.search import SearchAlgorithm, Searcher

from orchestrator.spec import Choice, JobSpec, LogUniform, Uniform
from orchestrator.sweep.space import TRIAL_KEY, search_space

# Settings that change a trial's cost per step: drawing them makes equal steps unequal work.
COST_KEYS = ("model.arch", "model.n_layer", "model.d_model", "model.lstm.n_layer",
             "model.lstm.d_model", "model.bow.d_model", "model.bow.buckets",
             "model.linear.buckets")
TRAIN_TIME = "train_time_s"
SEARCHED = ("tpe", "bohb")  # proposed by a searcher; random and pbt: drawn by sample_configs
EVALUATIONS = "training_iteration"
TIME_EVALUATIONS = 10  # the evaluations a time-bound trial counts as, for its first rung


@dataclass(frozen=True)
class Comparison:
    """What early stopping compares trials at: Tune's time_attr, the point a trial is past
    every rung (max_t) and the first rung (grace), in that attribute's unit."""

    attribute: str
    max_t: float
    grace: float

    @property
    def words(self) -> str:
        return ("equal training time (train_time_s)" if self.attribute == TRAIN_TIME
                else "equal steps (evaluations)")


def comparison(spec: JobSpec) -> Comparison:
    """Equal training time when the sweep draws a setting that changes the cost of a step and
    train.max_time_s bounds a trial's time; equal evaluations otherwise. max_t is past the
    last evaluation: a scheduler stopping a trial at its last report killed its Ray Train driver
    while fit() returned, and Train's placement groups leaked (trials that reach it end by
    returning)."""
    evaluations = math.ceil(spec.train.max_steps / spec.train.eval_interval)
    max_time_s = spec.train.max_time_s
    if max_time_s and any(key in spec.sweep.space for key in COST_KEYS):
        # A trial that trains to its time (max_steps out of reach) counts as at most
        # TIME_EVALUATIONS evaluations: with max_steps 100,000 the first rung fell at 0.4% of
        # max_time_s, after one evaluation, before a slower-per-step architecture had learned.
        share = spec.sweep.grace_period / min(evaluations, TIME_EVALUATIONS)
        return Comparison(TRAIN_TIME, 2 * max_time_s, max_time_s * share)
    return Comparison(EVALUATIONS, evaluations + 1, spec.sweep.grace_period)


def indexed_space(configs: list[dict[str, Any]], trials: list[int]) -> dict[str, Any]:
    """A Tune space of the sampled trials numbered `trials`, each with its drawn values under
    their own keys (what PBT mutates)."""
    space: dict[str, Any] = {TRIAL_KEY: tune.grid_search(trials)}
    for key in configs[0] if configs else ():
        space[key] = tune.sample_from(functools.partial(_drawn, configs, key))
    return space


def _drawn(configs: list[dict[str, Any]], key: str, spec: Any) -> Any:
    return configs[spec.config[TRIAL_KEY]][key]


def searcher(spec: JobSpec, seed: int) -> Searcher | SearchAlgorithm | None:
    """Tune's search algorithm for sweep.search (None: Tune's own, over indexed_space)."""
    if spec.sweep.search not in SEARCHED:
        return None
    from orchestrator.sweep.searchers import BOHB, TPE  # optuna, hpbandster: only when used

    return TPE(seed=seed) if spec.sweep.search == "tpe" else BOHB(seed=seed)


def param_space(spec: JobSpec, configs: list[dict[str, Any]],
                trials: list[int]) -> dict[str, Any]:
    return search_space(spec) if spec.sweep.search in SEARCHED else indexed_space(configs, trials)


def scheduler(spec: JobSpec) -> TrialScheduler:
    """ASHA for random and tpe, HyperBand for BOHB, or population-based training, synchronous:
    every trial reaches the perturbation before the worst quarter exploits the best (the
    asynchronous kind compares a trial only with those that have reported, so a late-starting
    one may never be compared)."""
    compare, sweep = comparison(spec), spec.sweep
    if sweep.search == "bohb":
        return HyperBandForBOHB(time_attr=compare.attribute, max_t=compare.max_t,
                                reduction_factor=sweep.reduction_factor)
    if sweep.search == "pbt":
        return PopulationBasedTraining(time_attr=compare.attribute,
                                       perturbation_interval=compare.grace,
                                       hyperparam_mutations=mutations(spec),
                                       quantile_fraction=0.25, synch=True)
    return ASHAScheduler(time_attr=compare.attribute, max_t=compare.max_t,
                         grace_period=compare.grace, reduction_factor=sweep.reduction_factor)


def mutations(spec: JobSpec) -> dict[str, Any]:
    """Where PBT may move each swept setting: within its range, or among its choices."""
    moves: dict[str, Any] = {}
    for key, dist in spec.sweep.space.items():
        if isinstance(dist, Choice):
            moves[key] = dist.choice
        elif isinstance(dist, Uniform):
            moves[key] = tune.uniform(*dist.uniform)
        elif isinstance(dist, LogUniform):
            moves[key] = tune.loguniform(*dist.loguniform)
    return moves
