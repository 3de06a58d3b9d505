"""Test clusters of our own (a `ray start --head` and what it started): their environment, waiting
for their dashboard, and finding and stopping exactly their processes. `ray stop` cannot target
one cluster: it stops every Ray on the machine. Ray passes its environment down from the head's
daemons to workers and drivers, so a marker variable in the head's environment, or the cluster's
temp directory in a command line, names them all."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent
RAY_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH")


def base_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address or auth settings, this venv first on PATH, no
    usage stats, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return {**env, **extra}


def wait_for_dashboard(url: str, headers: dict[str, str] | None = None,
                       timeout_s: float = 120) -> None:
    """The dashboard (and the Jobs API) comes up a little after `ray start` returns (seconds
    here; the limit leaves room for a slower, busier machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/api/version", headers=headers, timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"the dashboard at {url} never answered"
        time.sleep(0.5)


def marked_pids(variable: str, marker: str, root: Path) -> list[int]:
    """Processes with `variable=marker` in their environment or `root` in their argv."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"{variable}={marker}".encode() in environ or str(root).encode() in argv:
            pids.append(int(entry.name))
    return pids


def stop_marked(variable: str, marker: str, root: Path, grace_s: float = 3.0) -> list[int]:
    """SIGTERM the marked processes, SIGKILL what is left after grace_s; return survivors."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(variable, marker, root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while marked_pids(variable, marker, root) and time.monotonic() < deadline:
            time.sleep(0.2)
    return marked_pids(variable, marker, root)
