"""The quickstart job as a benchmark runs it: a whole `python -m orchestrator run` (its own
embedded Ray), with overrides, returning its wall time and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.bench.repository import repository_file
from orchestrator.submit import RESULT_MARKER

# A shrunk quickstart for `--quick` (what CI runs to prove a benchmark works).
QUICK = ["train.max_steps=20", "train.eval_interval=10", "train.warmup_steps=2",
         "train.eval_batches=2", "sweep.num_samples=2", "data.vocab_size=512",
         "serve.enabled=false"]


def run_quickstart(overrides: list[str], env: dict[str, str] | None = None
                   ) -> tuple[float, dict[str, Any]]:
    """(wall seconds, report) of the quickstart with these `--set` overrides."""
    command = [sys.executable, "-m", "orchestrator", "run", str(repository_file("jobs/quickstart.yaml")), "--json"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=Path.cwd(), env={**os.environ, **(env or {})},
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the quickstart failed with {overrides}:\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    report = json.loads(next(line for line in done.stdout.splitlines()[::-1]
                             if line.startswith(RESULT_MARKER)).removeprefix(RESULT_MARKER))
    return wall, report
