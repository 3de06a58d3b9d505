"""The command line: it answers at once when it needs no Ray, and a run stopped by Ctrl-C or
SIGTERM ends with one line, the right exit code and no Ray process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_spec
from processes import base_env

HEAVY = ("torch", "ray", "matplotlib")


def test_import_loads_neither_ray_nor_torch() -> None:
    """`import orchestrator` is all `validate` and `--help` need; Ray and torch take seconds."""
    probe = ("import sys, orchestrator, orchestrator.cli; "
             "print(sorted({m.split('.')[0] for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", probe], env=base_env(), cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert not set(HEAVY) & set(eval(loaded)), loaded


def _heavy_modules_after(code: str, heavy: tuple[str, ...] = HEAVY) -> set[str]:
    """Those of `heavy` (top-level packages) a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    done = subprocess.run([sys.executable, "-c", probe], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, check=True)
    return set(heavy) & set(eval(done.stdout.strip().splitlines()[-1]))


def test_the_submission_client_loads_neither_ray_nor_torch() -> None:
    """The thin Jobs-API client imports ray.job_submission (and pandas) only when it is used."""
    loaded = _heavy_modules_after("import orchestrator.submit", (*HEAVY, "pandas"))
    assert not loaded, loaded


def test_validate_loads_neither_ray_nor_torch() -> None:
    """`orchestrator validate` of a spec without model.pretrained needs the spec alone."""
    loaded = _heavy_modules_after(
        "from orchestrator.cli import main\n"
        "assert main(['validate', 'jobs/quickstart.yaml', '--quiet']) == 0")
    assert not loaded, loaded


def test_the_result_line_is_for_programs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`orchestrator run` prints RESULT_MARKER + JSON under --json, or when the Jobs API runs it
    (Ray's job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR, with the job's id in its metadata),
    and never in a person's terminal otherwise."""
    from orchestrator.cli import _parser, _wants_result_line
    from orchestrator.submit import JOB_CONFIG_ENV, submitted_job_id

    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    run = _parser().parse_args(["run", "jobs/quickstart.yaml"])
    resume = _parser().parse_args(["resume", "runs/quickstart-20261130-101500"])
    assert not _wants_result_line(run) and not _wants_result_line(resume)
    assert _wants_result_line(_parser().parse_args(["run", "jobs/quickstart.yaml", "--json"]))
    assert _wants_result_line(_parser().parse_args(["resume", "runs/x", "--json"]))
    assert submitted_job_id() is None

    config = {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc",
                                              "job_name": "raysubmit_abc"}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(config))
    assert submitted_job_id() == "raysubmit_abc"
    assert _wants_result_line(run) and _wants_result_line(resume)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"metadata": {}}))  # a driver, not a job
    assert submitted_job_id() is None and not _wants_result_line(run)
    monkeypatch.setenv(JOB_CONFIG_ENV, "not json")
    assert submitted_job_id() is None


def test_the_job_supervisor_still_sets_what_submitted_job_id_reads() -> None:
    """Pins the Ray internals submitted_job_id relies on (Ray 2.60's job supervisor), so a Ray
    upgrade that renames them fails here rather than silently losing Job.report()."""
    import importlib.util

    ray = importlib.util.find_spec("ray")  # found, not imported
    assert ray is not None and ray.submodule_search_locations
    job = Path(ray.submodule_search_locations[0]) / "dashboard" / "modules" / "job"
    supervisor = (job / "job_supervisor.py").read_text()
    assert "RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps(" in supervisor
    assert '"metadata": self._metadata' in supervisor
    assert 'JOB_ID_METADATA_KEY = "job_submission_id"' in (job / "common.py").read_text()


def test_validate_prints_the_spec() -> None:
    done = subprocess.run([sys.executable, "-m", "orchestrator", "validate",
                           "jobs/quickstart.yaml"], env=base_env(), cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "name: quickstart" in done.stdout
    assert done.stdout.rstrip().endswith("jobs/quickstart.yaml: valid")


def test_validate_checks_a_pretrained_checkpoint_before_anything_runs(tmp_path: Path) -> None:
    """The shipped fine-tuning job against a checkpoint that is not there (no run was made):
    exit 2, naming the field; then against the tiny GPT-2 with a block_size past its positions."""
    job = str(REPO / "jobs" / "finetune_gpt2.yaml")
    missing = subprocess.run([sys.executable, "-m", "orchestrator", "validate", job, "--set",
                              f"model.pretrained={tmp_path}/gpt2"], env=base_env(), cwd=REPO,
                             capture_output=True, text=True, check=False)
    assert missing.returncode == 2
    assert f"model.pretrained = '{tmp_path}/gpt2' does not exist" in missing.stderr

    from orchestrator.bench.checkpoints import tiny_gpt2

    tiny_gpt2(tmp_path / "gpt2")
    too_long = subprocess.run([sys.executable, "-m", "orchestrator", "validate", job, "--set",
                               f"model.pretrained={tmp_path}/gpt2", "--set",
                               "data.block_size=512"], env=base_env(), cwd=REPO,
                              capture_output=True, text=True, check=False)
    assert too_long.returncode == 2
    assert "data.block_size = 512 is past the 128 positions" in too_long.stderr


def test_submit_stays_the_function_when_its_module_is_imported_first() -> None:
    """Importing orchestrator.submit binds the submodule to the package's `submit`; the lazy
    package keeps the SDK function under that name."""
    import orchestrator
    from orchestrator.submit import submit

    assert orchestrator.submit is submit


def _descendants(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below `root`: its Ray processes and their workers."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def _alive(processes: set[tuple[int, str]]) -> list[str]:
    """Those still running (the same pid and start time, not a zombie), with their commands."""
    alive = []
    for pid, started in processes:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[19] == started and fields[0] != "Z":
            alive.append(f"{pid} {command[:200]}")
    return alive


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_run_says_where_and_leaves_nothing_running(tmp_path: Path,
                                                              stop_signal: signal.Signals) -> None:
    """A real run, stopped in its sweep: Ctrl-C as a terminal sends it (to the whole process
    group), SIGTERM as a process manager does (to the process)."""
    raw = tiny_spec("gpt", train={"max_steps": 5000}, serve={"enabled": False})
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**raw, "runs_dir": str(tmp_path / "runs")}))
    child = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(spec)],
                             env=base_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    in_sweep = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("[2/5 sweep]"):
                in_sweep.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert in_sweep.wait(timeout=300), "\n".join(lines)
        time.sleep(3)  # into Tune's loop, its trial starting
        ray_processes = _descendants(child.pid)
        if stop_signal == signal.SIGINT:
            os.killpg(child.pid, stop_signal)
        else:
            child.send_signal(stop_signal)
        returncode = child.wait(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    reader.join(timeout=10)
    errors = child.stderr.read() if child.stderr else ""

    assert returncode == 128 + stop_signal, (lines, errors)
    run_dir = next((tmp_path / "runs").glob("test-gpt-*"))
    stopped = [line for line in lines if line.startswith("stopped by")]
    assert len(stopped) == 1 and lines[-1] == stopped[0], lines
    assert "in the sweep stage" in stopped[0], stopped
    assert f"orchestrator resume {run_dir}" in stopped[0], stopped
    assert f"Ray's output: {run_dir / 'logs' / 'ray.log'}" in stopped[0], stopped
    assert lines[0] == "Ray: a local Ray embedded in this command (no --address or RAY_ADDRESS given)"
    assert all(line.startswith(("run directory:", "[1/5 data]", "[2/5 sweep]", "stopped by"))
               for line in lines[1:]), lines
    for output in ("\n".join(lines), errors):
        assert "Traceback" not in output and "core_worker" not in output, output
    assert (run_dir / "logs" / "ray.log").stat().st_size > 0
    # A worker the raylet was still starting notices the raylet's end only when it connects.
    deadline = time.monotonic() + 60
    while (left := _alive(ray_processes)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
