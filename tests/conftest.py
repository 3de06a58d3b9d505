"""Shared fixtures: one local Ray per test session, and small prepared data; the `ray` marker
(`scripts/test -m "not ray"`: the fast subset), and the stage times printed after the run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "jobs" / "data" / "stdlib_docs.jsonl"


# Tests that start Ray: those using these fixtures (directly or through another fixture, e.g.
# prepared_gpt, services, serving) and the e2e tests (their own `ray start --head`).
RAY_FIXTURES = frozenset({"ray_local"})
# `record_property(TIMING, line)`: the line is printed in the run's summary, passed or failed.
TIMING = "suite_timing"
# scripts/test names a file here: each test's id as it starts, the shared Ray's session folder and
# "finished" at the end, so that a pytest that dies without its summary (SIGKILL, or a native
# library's exit) can still be told where, and what Ray logged.
TRACE_ENV = "ORCHESTRATOR_TEST_TRACE"


def trace(line: str) -> None:
    if path := os.environ.get(TRACE_ENV):
        with open(path, "a") as file:
            file.write(line + "\n")


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    trace(f"test {nodeid}")


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    trace("finished")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts Ray (a local instance, a head or a fake cluster) `ray`."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.ray)


def stage_times(label: str, wall_s: float, report: dict | None = None) -> str:
    """One summary line: a job's wall time and its report's stage_seconds."""
    stages = (report or {}).get("stage_seconds") or {}
    shown = ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())
    return f"{label}: job {wall_s:.1f} s" + (f" (stages in s: {shown})" if shown else "")


def machine_speed() -> str:
    """A rough, cheap (< 1 s) figure to compare machines by: a plain Python loop and a small
    fp32 matmul, best of 3. Other work on the machine lowers both."""
    def best(work) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return min(times)

    loop_s = best(lambda: sum(i * i for i in range(1_000_000)))
    import torch

    a = torch.randn(256, 256)
    matmul_s = best(lambda: [a @ a for _ in range(20)])
    return (f"machine: Python loop {1 / loop_s:.1f} M iterations/s, fp32 matmul "
            f"{20 * 2 * 256**3 / matmul_s / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Every TIMING line the tests recorded (the e2e quickstart's stage times), also when they
    passed, so that a slowdown shows in CI's output the day it lands."""
    lines = [value for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == TIMING]
    if lines:
        terminalreporter.write_sep("-", "stage times")
        for line in lines:
            terminalreporter.write_line(line)
        terminalreporter.write_line(machine_speed())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every integration test.

    The dashboard gets a free port so that a `ray start --head` elsewhere cannot collide with it
    (Train V2 needs the dashboard: see docs/architecture.md). RAY_API_SERVER_ADDRESS points Train's
    placement-group cleaner at this instance: with two Rays on one machine its state-API call
    fails ("Found multiple active Ray instances"), its thread dies and stopped trials leak CPUs."""
    import ray

    if not ray.is_initialized():
        port = free_port()
        # Train's controller polls its workers every 2 s by default: every run's end, and the
        # detection of a killed worker, waits for the next poll.
        # Processes hand their metrics to the node's exporter every second (Ray's default: 10 s).
        context = ray.init(
            num_cpus=2, log_to_driver=False, logging_level="WARNING", dashboard_port=port,
            _system_config={"metrics_report_interval_ms": 1000},
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}})
        trace(f"ray {context.address_info['session_dir']}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serving(ray_local):
    """A free port for this module's services; Serve is shut down before (one left by an
    earlier module keeps its port and ignores ours) and after."""
    from ray import serve

    serve.shutdown()
    yield free_port()
    serve.shutdown()


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


TASKS = {"gpt": "language_model", "classifier": "classifier"}  # tests name the tasks short


def tiny_spec(family: str, path: str | Path = SAMPLE, **sections) -> dict:
    """A raw spec small enough to train in seconds on 2 cores."""
    raw = {
        "name": f"test-{family}",
        "data": {"path": str(path), "vocab_size": 512, "block_size": 32, "max_length": 48,
                 **({"label_column": "label"} if family == "classifier" else {})},
        "model": {"task": TASKS[family], "n_layer": 1, "n_head": 2, "d_model": 32, "dropout": 0.0},
        "train": {"max_steps": 20, "warmup_steps": 2, "eval_interval": 10, "eval_batches": 2,
                  "batch_size": 16},
        "sweep": {"num_samples": 1},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="session")
def prepared_gpt(ray_local, tmp_path_factory):
    """tiny_spec("gpt")'s data, prepared once: (run directory, DataInfo) for training tests."""
    from orchestrator.data.stage import prepare_data
    from orchestrator.spec import parse_spec

    run_dir = tmp_path_factory.mktemp("prepared-gpt")
    return run_dir, prepare_data(parse_spec(tiny_spec("gpt")), run_dir)


@contextlib.contextmanager
def served_in_thread(app) -> Iterator[str]:
    """An ASGI app on uvicorn at 127.0.0.1 in a thread of this process, over real HTTP: the
    service's routes without Ray. Yields the URL; the server stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
