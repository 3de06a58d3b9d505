"""Continuing a run whose driver died: which spec it continues with, and which edits it refuses.

A completed stage's outputs were made from some fields of the spec; a stage that has started
(the sweep, whose trials and checkpoints are in the run directory) too. Editing those fields
and continuing would mix two jobs in one run, so it is refused, naming the fields. Fields that
only later stages read (serve.*, for instance) may change.
"""

from __future__ import annotations

import yaml

from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, SpecError, apply_overrides, flat_fields, parse_spec

# The spec fields (dotted prefixes) each stage's outputs depend on.
STAGE_INPUTS = {
    # The run directory, its service and its metrics are named after the job: `name` too.
    "data": ("name", "data", "model.task", "model.pretrained"),
    "sweep": ("data", "model", "train", "sweep", "resources"),
    "compress": ("compress",),
}


def resume_spec(run_dir: RunDir, overrides: list[str] | None = None) -> JobSpec:
    """The spec the run was started with (its spec.yaml), with `overrides` applied."""
    raw = yaml.safe_load(run_dir.spec_file.read_text())
    return parse_spec(apply_overrides(raw, overrides or []))


def frozen_fields(run_dir: RunDir) -> tuple[str, ...]:
    """Prefixes of the fields that completed or started stages were made from."""
    started = run_dir.completed().names()
    if run_dir.tune_experiment.exists():
        started.add("sweep")
    return tuple(p for stage in sorted(started) for p in STAGE_INPUTS.get(stage, ()))


def check_resumable(run_dir: RunDir, spec: JobSpec) -> None:
    """Refuse, before anything runs, a spec whose edits change what completed stages made."""
    if run_dir.completed().report:
        raise SpecError(f"{run_dir.uri} has finished (its report is written); nothing to resume")
    stored = flat_fields(resume_spec(run_dir).model_dump(mode="json"))
    given = flat_fields(spec.model_dump(mode="json"))
    frozen = frozen_fields(run_dir)
    edits = [key for key in sorted({*stored, *given}) if stored.get(key) != given.get(key)
             and any(key == p or key.startswith(f"{p}.") for p in frozen)]
    if edits:
        changes = "; ".join(f"{key} = {given.get(key)!r} (the run has {stored.get(key)!r})"
                            for key in edits)
        raise SpecError(f"cannot resume {run_dir.uri} with this spec: {changes}. Stages that "
                        "already ran were made with the run's values; start a new run to change "
                        "them")
