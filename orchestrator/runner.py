"""Connect to Ray (or start it embedded) and run the pipeline."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import ray

from orchestrator.pipeline import Progress, run_pipeline
from orchestrator.resume import resume_spec
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec


def connect(address: str | None = None) -> bool:
    """Join the cluster at `address` (or Ray's own RAY_ADDRESS, which `ray job submit` sets),
    else start an embedded local Ray. Returns True when Ray is embedded in this process."""
    if ray.is_initialized():
        return False
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    for name in ("ray.data", "ray.serve", "ray.tune", "ray.train"):  # our progress lines suffice
        logging.getLogger(name).setLevel(logging.WARNING)
    return embedded


def run(spec: JobSpec, address: str | None = None, say: Callable[[str], None] | Progress = print,
        resume: bool = False) -> dict[str, Any]:
    """Run the whole job on the cluster at `address` (default: embedded) and return its report.

    With `resume`, the job's latest run directory (under spec.runs_dir) continues when it has not
    finished; otherwise a new run starts."""
    latest = RunDir.latest(spec.runs_dir, spec.name) if resume else None
    unfinished = latest if latest and not latest.completed().report else None
    connect(address)
    return run_pipeline(spec, say, resume=unfinished)


def resume(run_dir: str | RunDir, address: str | None = None, overrides: list[str] | None = None,
           say: Callable[[str], None] | Progress = print) -> dict[str, Any]:
    """Continue a run whose driver died, with the spec it was started with (and `overrides`):
    completed stages are not run again; an interrupted sweep keeps its finished trials and
    resumes the others from their latest checkpoints."""
    run_dir = RunDir.open(run_dir)
    spec = resume_spec(run_dir, overrides)
    connect(address)
    return run_pipeline(spec, say, resume=run_dir)
