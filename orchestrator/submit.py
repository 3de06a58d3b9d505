"""The job-submission client: send a job to a Ray cluster's Jobs API and follow it.

A thin client: importing it loads neither Ray nor torch (nor pandas), so a laptop that only
submits pays for none of them; `ray.job_submission` is imported when a job is submitted.

The job reports back through its log: `orchestrator run` prints one line, RESULT_MARKER followed
by the run report as JSON, when the Jobs API runs it (`submitted_job_id`) or under `--json`; a
person's terminal gets the summary only (the report is in the run directory's report.json).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.spec import JobSpec, SpecError, load_spec, spec_to_yaml

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
# A durable base for relative runs_dir values, for every job on a cluster (README: "Where results
# go"); without it, a job started by `ray job submit` uses DEFAULT_RUNS_BASE on its head.
RUNS_DIR_ENV = "ORCHESTRATOR_RUNS_DIR"
DEFAULT_RUNS_BASE = "~/orchestrator"


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
    run_dir: str | None = None  # where the job writes its run directory (path on the head, or URI)

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

    def download(self, destination: str | Path, parts: tuple[str, ...] = (
            "report.json", "report.md", "plots", "winner")) -> Path:
        """Copy the run's report and winner (or other `parts` of the run directory) to a local
        folder: from object storage, or from this machine's disk when the head runs here."""
        from orchestrator.storage import resolve

        if self.run_dir is None:
            raise RuntimeError(f"job {self.job_id} was not submitted by orchestrator.submit: "
                               "its run directory is unknown")
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        root = resolve(self.run_dir)
        for part in parts:
            source = root.join(part)
            if source.is_file():
                (destination / part).write_bytes(source.read_bytes())
            elif source.exists():
                (destination / part).mkdir(exist_ok=True)
                source.download(destination / part)
        return destination


def _entrypoint(spec: JobSpec | str | Path, working_dir: Path, overrides: list[str],
                run_dir: str) -> str:
    """The job's shell command.

    A spec path is relative to working_dir; a file inside it is named by its relative path, so
    the job reads the uploaded copy. Any other spec (a JobSpec, or a file outside working_dir)
    travels inside the command: a file staged into the tree would not reach the cluster when
    .gitignore covers it, because Ray's upload honours .gitignore. The job writes it to a
    temporary file and removes it after. `run_dir`: the run directory the job creates.
    """
    at = shlex.join(["--run-dir", run_dir])
    if not isinstance(spec, JobSpec):
        path = (working_dir / spec).resolve()
        if path.is_relative_to(working_dir):
            sets = [arg for override in overrides for arg in ("--set", override)]
            return shlex.join(["python", "-m", "orchestrator", "run",
                               path.relative_to(working_dir).as_posix(), *sets,
                               "--run-dir", run_dir])
        spec = load_spec(path, overrides)
    return (f"spec=$(mktemp -t orchestrator-spec.XXXXXX) && "
            f"printf '%s' {shlex.quote(spec_to_yaml(spec))} > \"$spec\" && "
            f"python -m orchestrator run \"$spec\" {at}; status=$?; rm -f \"$spec\"; "
            "exit $status")


def on_this_machine(address: str) -> bool:
    """Whether the Jobs API at `address` (http://host:port) runs on this machine."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]").split("/")[0]
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
        local = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return any(ipaddress.ip_address(ip).is_loopback for ip in resolved) or bool(resolved & local)


def is_relative_path(runs_dir: str) -> bool:
    return "://" not in runs_dir and not Path(runs_dir).expanduser().is_absolute()


def join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if "://" in base else \
        str(Path(base).expanduser().absolute() / relative)


def submission_runs_dir(runs_dir: str, address: str, working_dir: Path) -> str:
    """Where a submitted job's run directories go, decided before anything is uploaded: a URI
    or absolute path as given; a relative one under ORCHESTRATOR_RUNS_DIR when set, else, for a
    head on this machine, under the submitted folder. Never inside Ray's copy of that folder,
    which Ray evicts and a new head does not have."""
    if not is_relative_path(runs_dir):
        return runs_dir if "://" in runs_dir else str(Path(runs_dir).expanduser())
    if base := os.environ.get(RUNS_DIR_ENV):
        return join(base, runs_dir)
    if on_this_machine(address):
        return str(working_dir / runs_dir)
    raise SpecError(f"runs_dir = {runs_dir!r} is relative and the cluster at {address} is not "
                    "this machine: its results would land in Ray's temporary copy of the "
                    "uploaded folder. Set runs_dir to object storage (s3://bucket/runs) or an "
                    f"absolute path on the cluster, or {RUNS_DIR_ENV} to a base for every job")


def runs_dir_in_submitted_job(runs_dir: str) -> str | None:
    """For `orchestrator run` started by the Jobs API (`ray job submit`) with a relative
    runs_dir: the durable place used instead of Ray's working-directory copy (None: keep
    runs_dir)."""
    if submitted_job_id() is None or not is_relative_path(runs_dir):
        return None
    return join(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_BASE, runs_dir)


def spec_digest(spec: JobSpec) -> str:
    return hashlib.sha256(spec_to_yaml(spec).encode()).hexdigest()[:16]


def submit(spec: JobSpec | str | Path, address: str, working_dir: str | Path = ".",
           overrides: list[str] | None = None, token: str | None = None,
           say: Callable[[str], None] = lambda _: None) -> Job:
    """Submit `python -m orchestrator run SPEC` with the working directory uploaded.

    `spec` is a YAML path (overrides apply to it) or a JobSpec; see _entrypoint. The run
    directory is decided here (submission_runs_dir) and named in the job's metadata and in
    `Job.run_dir`; `say` gets the line that names it, before anything is uploaded.
    `token` is the cluster's auth token when it runs with RAY_AUTH_MODE=token.
    """
    working_dir = Path(working_dir).resolve()
    overrides = list(overrides or [])
    loaded = spec if isinstance(spec, JobSpec) else load_spec(working_dir / spec, overrides)
    base = submission_runs_dir(loaded.runs_dir, address, working_dir)
    run_name = f"{loaded.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    run_dir = join(base, run_name)
    say(f"run directory: {run_dir}")
    entrypoint = _entrypoint(spec, working_dir, overrides, run_dir)
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = JobSubmissionClient(address, headers=headers)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"{run_name}-{uuid.uuid4().hex[:4]}",
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES},
        metadata={"job_name": run_name, "run_dir": run_dir, "spec_name": loaded.name,
                  "spec_sha256": spec_digest(loaded)},
    )
    return Job(client, job_id, run_dir)
