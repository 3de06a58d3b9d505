"""orchestrator: one declarative job from text data to a served model, on any Ray cluster.

    spec = orchestrator.load_spec("jobs/quickstart.yaml")
    report = orchestrator.run(spec)                     # embedded local Ray, or RAY_ADDRESS
    job = orchestrator.submit(spec, "http://127.0.0.1:8265")
    job.wait(); job.results()                           # one row per sweep trial
"""

from orchestrator.runner import run
from orchestrator.spec import JobSpec, SpecError, load_spec, parse_spec
from orchestrator.submit import Job, submit

__all__ = ["Job", "JobSpec", "SpecError", "load_spec", "parse_spec", "run", "submit"]
