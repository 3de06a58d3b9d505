"""orchestrator: one declarative job from text data to a served model, on any Ray cluster.

    spec = orchestrator.load_spec("jobs/quickstart.yaml")
    report = orchestrator.run(spec)                     # embedded local Ray, or RAY_ADDRESS
    report = orchestrator.resume("runs/quickstart-...")  # continue a run whose driver died
    job = orchestrator.submit(spec, "http://127.0.0.1:8265")
    job.wait(); job.results()                           # one row per sweep trial

The names are imported on first use (PEP 562): `run` and `submit` pull in Ray and torch, seconds
of imports that `orchestrator validate` and `orchestrator --help` do not need.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.runner import resume, run
    from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec
    from orchestrator.submit import Job, submit

_SOURCES = {"Job": "submit", "JobSpec": "spec", "SpecError": "spec", "load_spec": "spec",
            "parse_spec": "spec", "resume": "runner", "run": "runner", "submit": "submit"}

__all__ = ["Job", "JobSpec", "SpecError", "load_spec", "parse_spec", "resume", "run", "submit"]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    return getattr(importlib.import_module(f"orchestrator.{_SOURCES[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        """Importing the submodule orchestrator.submit binds it to the package's `submit`, which
        would hide the SDK function of that name from __getattr__: keep the function."""
        if name in _SOURCES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
