"""Turn the spec's sweep.space into a Ray Tune search space, and a trial's config back into a spec."""

from __future__ import annotations

from typing import Any

from ray import tune

from orchestrator.spec import Choice, Grid, JobSpec, LogUniform, Uniform, parse_spec


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
