"""The job-submission client: send a job to a Ray cluster's Jobs API and follow it.

A thin client: importing it loads neither Ray nor torch (nor pandas), so a laptop that only
submits pays for none of them; `ray.job_submission` is imported when a job is submitted.

The job reports back through its log: `orchestrator run` prints one line, RESULT_MARKER followed
by the run report as JSON, when the Jobs API runs it (`submitted_job_id`) or under `--json`; a
person's terminal gets the summary only (the report is in the run directory's report.json).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.spec import JobSpec, load_spec, spec_to_yaml

if TYPE_CHECKING:
    import pandas as pd
    from ray.job_submission import JobSubmissionClient

RESULT_MARKER = "orchestrator-result: "
# Never uploaded: version control, virtual environments, caches and run outputs.
EXCLUDES = [".git", ".venv", "venv", "env", "__pycache__", "*.pyc", ".pytest_cache", "runs",
            ".orchestrator/runs", "*.egg-info", ".mypy_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}  # ray.job_submission.JobStatus values
# What Ray's job supervisor (ray/dashboard/modules/job/job_supervisor.py) sets in the environment
# of a submitted job's entrypoint: the job's config as JSON, whose metadata holds its id.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job_id() -> str | None:
    """The Jobs API's id of the job this process is the entrypoint of; None outside such a job."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    job_id = metadata.get("job_submission_id") if isinstance(metadata, dict) else None
    return str(job_id) if job_id else None


@dataclass
class Job:
    """A submitted job: wait for it, read its logs and its results."""

    client: JobSubmissionClient
    job_id: str

    def status(self) -> str:
        return str(self.client.get_job_status(self.job_id).value)

    def wait(self, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
        """Block until the job ends; return SUCCEEDED, FAILED or STOPPED."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status()) not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status} after {timeout_s} s")
            time.sleep(poll_s)
        return status

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def report(self) -> dict[str, Any]:
        """The run report the job printed as its last result line."""
        lines = [line for line in self.logs().splitlines() if line.startswith(RESULT_MARKER)]
        if not lines:
            raise RuntimeError(f"job {self.job_id} ({self.status()}) printed no result; "
                               "see job.logs()")
        return json.loads(lines[-1].removeprefix(RESULT_MARKER))

    def results(self) -> pd.DataFrame:
        """One row per sweep trial: its config and its metrics."""
        import pandas as pd

        return pd.DataFrame(self.report()["trials"])


def _entrypoint(spec: JobSpec | str | Path, working_dir: Path, overrides: list[str]) -> str:
    """The job's shell command.

    A spec path is relative to working_dir; a file inside it is named by its relative path, so
    the job reads the uploaded copy. Any other spec (a JobSpec, or a file outside working_dir)
    travels inside the command: a file staged into the tree would not reach the cluster when
    .gitignore covers it, because Ray's upload honours .gitignore. The job writes it to a
    temporary file and removes it after.
    """
    if not isinstance(spec, JobSpec):
        path = (working_dir / spec).resolve()
        if path.is_relative_to(working_dir):
            sets = [arg for override in overrides for arg in ("--set", override)]
            return shlex.join(["python", "-m", "orchestrator", "run",
                               path.relative_to(working_dir).as_posix(), *sets])
        spec = load_spec(path, overrides)
    return (f"spec=$(mktemp -t orchestrator-spec.XXXXXX) && "
            f"printf '%s' {shlex.quote(spec_to_yaml(spec))} > \"$spec\" && "
            f"python -m orchestrator run \"$spec\"; status=$?; rm -f \"$spec\"; exit $status")


def submit(spec: JobSpec | str | Path, address: str, working_dir: str | Path = ".",
           overrides: list[str] | None = None, token: str | None = None) -> Job:
    """Submit `python -m orchestrator run SPEC` with the working directory uploaded.

    `spec` is a YAML path (overrides apply to it) or a JobSpec; see _entrypoint.
    `token` is the cluster's auth token when it runs with RAY_AUTH_MODE=token.
    """
    working_dir = Path(working_dir).resolve()
    entrypoint = _entrypoint(spec, working_dir, overrides or [])
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = JobSubmissionClient(address, headers=headers)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES},
    )
    return Job(client, job_id)
