"""A job whose driver is killed (SIGKILL: no handler runs, nothing is flushed) in the middle of
its sweep continues with `orchestrator resume`: the data stage is not run again, the trials go on
from their latest checkpoints, and the job runs to its end. A sweep whose saved Tune state lacks
trials its searcher handed out (what a kill between Tune's two state files leaves) still runs
every trial the spec asks for, with the values they were drawn with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, tiny_spec
from processes import base_env

from orchestrator.spec import parse_spec
from orchestrator.sweep.tuner import run_sweep

INTERVAL = 20
STEPS = 200
JOB_TIMEOUT_S = 900


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its modification time (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file()}


def _ray_processes_of(pid: int) -> list[int]:
    """Ray's processes started by this driver (their command lines name its session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.e2e
def test_a_run_whose_driver_was_killed_mid_sweep_resumes_to_its_end(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        **tiny_spec("gpt", train={"max_steps": STEPS, "eval_interval": INTERVAL},
                    sweep={"num_samples": 2, "grace_period": STEPS // INTERVAL},
                    serve={"enabled": False}),
        "runs_dir": str(tmp_path / "runs")}))
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(spec)],
                              env=base_env(), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reported = threading.Event()

    def read() -> None:
        assert driver.stdout is not None
        for line in driver.stdout:
            lines.append(line.rstrip("\n"))
            if f"step {2 * INTERVAL}/{STEPS}" in line:  # a trial has checkpointed twice
                reported.set()
        reported.set()  # the driver ended (it should not have): fail below, with its output

    threading.Thread(target=read, daemon=True).start()
    try:
        assert reported.wait(timeout=JOB_TIMEOUT_S) and driver.poll() is None, "\n".join(lines)
        children = _ray_processes_of(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
        # The embedded Ray the driver started ends with it (Ray ties its processes' fate to
        # the driver's); a resumed run must not share the machine with the old trials.
        deadline = time.monotonic() + 120
        while any(Path(f"/proc/{p}").exists() for p in children) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    run_dir = next((tmp_path / "runs").glob("test-gpt-*"))
    data_before = _files(run_dir / "data") | {"tokenizer": (run_dir / "tokenizer" /
                                                            "tokenizer.json").stat().st_mtime_ns}
    assert "sweep" not in json.loads((run_dir / "stages.json").read_text())

    resumed = subprocess.run([sys.executable, "-m", "orchestrator", "resume", str(run_dir)],
                             env=base_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=JOB_TIMEOUT_S, check=False)
    assert resumed.returncode == 0, f"{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}"
    out = resumed.stdout.splitlines()
    assert any(line.startswith("[1/5 data] done before") for line in out), out
    assert not any(line.startswith("[1/5 data] started") for line in out), out
    data_after = _files(run_dir / "data") | {"tokenizer": (run_dir / "tokenizer" /
                                                           "tokenizer.json").stat().st_mtime_ns}
    assert data_after == data_before  # not one file of the data stage was written again

    report = json.loads((run_dir / "report.json").read_text())
    assert report["resumed"] is True
    assert [t["status"] for t in report["trials"]] == ["done", "done"], report["trials"]
    assert report["sweep"]["trials_run"] == report["sweep"]["trials_asked"] == 2
    assert all(t["last_step"] == STEPS for t in report["trials"]), report["trials"]
    history = pd.read_parquet(run_dir / "sweep" / "history.parquet")
    for trial_id, reports in history.groupby("trial_id"):
        steps = reports["step"].tolist()
        redone = len(steps) - len(set(steps))
        # Each trial reports every interval once, but the one it was in when the driver died
        # (and whose checkpoint may not have been persisted) may be trained and reported again.
        assert redone <= 1, (trial_id, steps)
        assert set(steps) == set(range(INTERVAL, STEPS + 1, INTERVAL)), (trial_id, steps)
    assert (run_dir / "winner" / "model.pt").is_file()


def test_trials_missing_from_tunes_saved_state_run_on_resume(prepared_gpt, tmp_path: Path) -> None:
    prepared, info = prepared_gpt
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir, ignore=shutil.ignore_patterns("sweep"))
    spec = parse_spec(tiny_spec("gpt", train={"max_steps": 20, "eval_interval": 10},
                                sweep={"num_samples": 2, "grace_period": 2, "space": {
                                    "train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    first = run_sweep(spec, run_dir, info)
    drawn = first.trials.sort_values("trial_id")["config/train.lr"].tolist()
    # The state a kill between Tune's two state files leaves: the searcher's says it handed out
    # (and finished) both trials, the trial list knows the first one only.
    for state in (run_dir / "sweep" / "tune").glob("experiment_state-*.json"):
        saved = json.loads(state.read_text())
        saved["trial_data"] = [t for t in saved["trial_data"]
                               if not json.loads(t[0])["trial_id"].endswith("_00001")]
        state.write_text(json.dumps(saved))

    resumed = run_sweep(spec, run_dir, info, restore=True)
    assert len(resumed.trials) == 2 and set(resumed.trials["status"]) == {"done"}
    assert sorted(resumed.trials["config/train.lr"]) == sorted(drawn)  # drawn as before: seeded
    assert (resumed.trials["last_step"] == 20).all()
