"""A real `ray start --head` with token auth for end-to-end tests.

Started in a short temporary directory with free ports and its own freshly generated token (the
user's ~/.ray/auth_token is never touched). `ray stop` cannot target one cluster (it stops every
Ray on the machine), so teardown stops exactly the processes that carry this head's marker in
their environment; Ray passes its environment down from the head's daemons to workers, the job
supervisor and the job's driver.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, free_port
from processes import VENV_BIN, base_env, stop_marked, wait_for_dashboard
from ray.job_submission import JobSubmissionClient

RAY = str(VENV_BIN / "ray")
MARKER = "ORCHESTRATOR_E2E_CLUSTER"
USER_TOKEN = Path.home() / ".ray" / "auth_token"
# Small enough for 2 cores, still every stage: data, a 2-trial sweep, select, evaluate, deploy.
SHRINK = ["train.max_steps=20", "train.eval_interval=10", "train.warmup_steps=2",
          "train.eval_batches=2", "sweep.num_samples=2", "data.vocab_size=512"]
CLI_TIMEOUT_S = 240  # a fresh `python -m orchestrator` or `ray` process: imports torch and Ray


@dataclass(frozen=True)
class Head:
    """A running token-auth head and what a client needs to reach it."""

    dashboard: str
    token: str
    token_path: Path
    root: Path
    serve_port: int
    gcs: str  # host:port, what `--address` of run, deploy, services... takes

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self) -> JobSubmissionClient:

        return JobSubmissionClient(self.dashboard, headers=self.auth())

    def shrink(self, name: str) -> list[str]:
        """Overrides: small run, outputs under this head's directory, Serve on its free port."""
        return [*SHRINK, f"name={name}", f"runs_dir={self.root / 'runs'}",
                f"serve.port={self.serve_port}"]


def ray_cli(*args: str, env: dict[str, str], timeout: float = CLI_TIMEOUT_S,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAY, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@contextmanager
def running_head(**extra_env: str) -> Iterator[Head]:
    """`ray start --head` with RAY_AUTH_MODE=token and a fresh token, torn down precisely;
    `extra_env`: more of the head's environment (Ray reads some settings only there)."""
    user_token_before = _digest(USER_TOKEN)
    # Short on purpose: Ray's unix socket paths live under the temp dir (107-byte limit).
    root = Path(tempfile.mkdtemp(prefix="orch-e2e-", dir="/tmp"))
    marker = uuid.uuid4().hex
    # `ray get-auth-token --generate` writes ~/.ray/auth_token: give it a throwaway home.
    home = root / "home"
    home.mkdir()
    generated = ray_cli("get-auth-token", "--generate", env=base_env(HOME=str(home)))
    assert generated.returncode == 0, generated.stderr
    token_path = home / ".ray" / "auth_token"
    token = token_path.read_text().strip()
    assert generated.stdout.strip() == token and len(token) == 64

    dashboard_port, gcs_port = free_port(), free_port()
    # Ray processes that call the state API with no address (Train V2's placement-group cleaner
    # does) look for "the" local Ray by its GCS processes and fail when this machine runs more
    # than one Ray (ray_local, other sessions): the cleaner's thread dies, the sweep's placement
    # groups are never removed and the next stage waits forever. Pin them to this head.
    # Processes hand metrics to the node's exporter every second (Ray's default: 10 s), so that
    # the short trials of this test are seen by Prometheus.
    env = base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
                   RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}",
                   RAY_metrics_report_interval_ms="1000", **{MARKER: marker}, **extra_env)
    started = ray_cli(
        "start", "--head", "--temp-dir", str(root / "ray"), "--num-cpus", "2",
        "--port", str(gcs_port), "--ray-client-server-port", str(free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--object-store-memory", str(300 * 1024**2), "--disable-usage-stats",
        env=env, timeout=300,
    )
    cluster = Head(f"http://127.0.0.1:{dashboard_port}", token, token_path, root, free_port(),
                   f"127.0.0.1:{gcs_port}")
    patch = pytest.MonkeyPatch()
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # they override any client's address
        patch.delenv(name, raising=False)
    try:
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        wait_for_dashboard(cluster.dashboard, cluster.auth())
        yield cluster
    finally:
        patch.undo()
        leftover = stop_marked(MARKER, marker, root)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"processes of the e2e head survived: {leftover}"
        assert _digest(USER_TOKEN) == user_token_before, "the user's ~/.ray/auth_token changed"
