"""Connect to Ray (or start it embedded) and run the pipeline."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import ray

from orchestrator.pipeline import run_pipeline
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


def run(spec: JobSpec, address: str | None = None,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole job on the cluster at `address` (default: embedded) and return its report."""
    connect(address)
    return run_pipeline(spec, say)
