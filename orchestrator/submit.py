"""The job-submission client: send a job to a Ray cluster's Jobs API and follow it."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from ray.job_submission import JobStatus, JobSubmissionClient

from orchestrator.pipeline import RESULT_MARKER
from orchestrator.spec import JobSpec, spec_to_yaml

# Never uploaded: version control, virtual environments, caches and run outputs.
EXCLUDES = [".git", ".venv", "venv", "env", "__pycache__", "*.pyc", ".pytest_cache", "runs",
            ".orchestrator/runs", "*.egg-info", ".mypy_cache", ".ruff_cache"]
STAGED_SPECS = ".orchestrator/jobs"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


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
        while (status := self.client.get_job_status(self.job_id)) not in TERMINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status.value} after {timeout_s} s")
            time.sleep(poll_s)
        return str(status.value)

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
        return pd.DataFrame(self.report()["trials"])


def _stage_spec(spec: JobSpec, working_dir: Path) -> str:
    """Write an in-memory spec into the uploaded tree; return its path relative to it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    relative = Path(STAGED_SPECS) / f"{spec.name}-{stamp}.yaml"
    (working_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    (working_dir / relative).write_text(spec_to_yaml(spec))
    return relative.as_posix()


def submit(spec: JobSpec | str | Path, address: str, working_dir: str | Path = ".",
           overrides: list[str] | None = None, token: str | None = None) -> Job:
    """Submit `python -m orchestrator run SPEC` with the working directory uploaded.

    `spec` is a YAML path inside working_dir or a JobSpec (staged under .orchestrator/jobs/).
    `token` is the cluster's auth token when it runs with RAY_AUTH_MODE=token.
    """
    working_dir = Path(working_dir).resolve()
    spec_path = _stage_spec(spec, working_dir) if isinstance(spec, JobSpec) else str(spec)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = JobSubmissionClient(address, headers=headers)
    command = ["python", "-m", "orchestrator", "run", spec_path]
    for override in overrides or []:
        command += ["--set", override]
    job_id = client.submit_job(
        entrypoint=shlex.join(command),
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES},
    )
    return Job(client, job_id)
