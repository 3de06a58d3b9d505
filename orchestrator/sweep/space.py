"""Turn the spec's sweep.space into a Ray Tune search space or into the list of the random
search's trials, and a trial's config back into a spec."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from ray import tune

from orchestrator.spec import Choice, Grid, JobSpec, LogUniform, Uniform, parse_spec

# A random-search trial's Tune config is its index into sample_configs: what it trains with is
# decided by the spec and its seed alone, so a resumed sweep knows every trial it must run.
TRIAL_KEY = "trial"


def search_space(spec: JobSpec) -> dict[str, Any]:
    """{'train.lr': tune.loguniform(...), ...}, keyed by the dotted spec path."""
    space: dict[str, Any] = {}
    for key, dist in spec.sweep.space.items():
        if isinstance(dist, Choice):
            space[key] = tune.choice(dist.choice)
        elif isinstance(dist, Grid):
            space[key] = tune.grid_search(dist.grid)
        elif isinstance(dist, Uniform):
            space[key] = tune.uniform(*dist.uniform)
        elif isinstance(dist, LogUniform):
            space[key] = tune.loguniform(*dist.loguniform)
    return space


def sample_configs(spec: JobSpec) -> list[dict[str, Any]]:
    """The random search's trials, in order: num_samples times every point of the grid, the
    other settings drawn from a generator seeded by sweep.seed (as Tune's BasicVariantGenerator
    orders them)."""
    rng = np.random.default_rng(spec.sweep.seed)
    space = spec.sweep.space
    grid_keys = [k for k, d in space.items() if isinstance(d, Grid)]
    points = list(itertools.product(*(space[k].grid for k in grid_keys)))
    configs = []
    for _ in range(spec.sweep.num_samples):
        for point in points:
            config: dict[str, Any] = dict(zip(grid_keys, point))
            for key, dist in space.items():
                if isinstance(dist, Choice):
                    config[key] = dist.choice[int(rng.integers(len(dist.choice)))]
                elif isinstance(dist, Uniform):
                    config[key] = float(rng.uniform(*dist.uniform))
                elif isinstance(dist, LogUniform):
                    low, high = (math.log(b) for b in dist.loguniform)
                    config[key] = float(math.exp(rng.uniform(low, high)))
            configs.append({k: config[k] for k in space})
    return configs


def trial_values(config: dict[str, Any] | None, configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep values of a trial whose Tune config is `config`: its sampled configs entry
    when it names one, with any value Tune set itself (a searcher's draw, PBT's mutation).
    A trial Tune restored without ever having drawn one has no config, and no values."""
    config = config or {}
    values = dict(configs[config[TRIAL_KEY]]) if TRIAL_KEY in config else {}
    values.update({k: _plain(v) for k, v in config.items() if k != TRIAL_KEY})
    return values


def _plain(value: Any) -> Any:
    """A Python value for a numpy scalar (BOHB proposes numpy strings)."""
    return value.item() if isinstance(value, np.generic) else value


def apply_trial_config(spec: JobSpec, config: dict[str, Any]) -> JobSpec:
    """The spec a trial trains with: the base spec with the sampled values set and validated."""
    raw = spec.model_dump(mode="json")
    for key, value in config.items():
        *sections, field = key.split(".")  # model.lstm.d_model: a setting of a nested section
        node = raw
        for section in sections:
            node = node[section]
        node[field] = value
    return parse_spec(raw)
