"""Finding and stopping exactly the processes of one test cluster (a `ray start --head` and what
it started). `ray stop` cannot target one cluster: it stops every Ray on the machine. Ray passes
its environment down from the head's daemons to workers and drivers, so a marker variable in the
head's environment, or the cluster's temp directory in a command line, names them all."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


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
