"""orchestrator: one declarative job from text data to a served model, on any Ray cluster.

    spec = orchestrator.load_spec("jobs/quickstart.yaml")
    report = orchestrator.run(spec)                     # embedded local Ray, or RAY_ADDRESS
    job = orchestrator.submit(spec, "http://127.0.0.1:8265")
    job.wait(); job.results()                           # one row per sweep trial

The names are imported on first use: every Ray worker that runs one of our functions imports this
package, and importing the runner eagerly (the pipeline, Serve, torch, matplotlib) cost each
worker process seconds before its first task.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.runner import run
    from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec
    from orchestrator.submit import Job, submit

_HOMES = {"run": "orchestrator.runner", "JobSpec": "orchestrator.spec",
          "SpecError": "orchestrator.spec", "load_spec": "orchestrator.spec",
          "parse_spec": "orchestrator.spec", "Job": "orchestrator.submit",
          "submit": "orchestrator.submit"}

__all__ = ["Job", "JobSpec", "SpecError", "load_spec", "parse_spec", "run", "submit"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
