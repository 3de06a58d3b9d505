"""Shared fixtures: one local Ray per test session, and small prepared data."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "jobs" / "data" / "stdlib_docs.jsonl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every integration test.

    The dashboard gets a free port so that a `ray start --head` elsewhere cannot collide with it
    (Train V2 needs the dashboard: see design.md). RAY_API_SERVER_ADDRESS points Train's
    placement-group cleaner at this instance: with two Rays on one machine its state-API call
    fails ("Found multiple active Ray instances"), its thread dies and stopped trials leak CPUs."""
    import ray

    if not ray.is_initialized():
        port = free_port()
        # Train's controller polls its workers every 2 s by default: every run's end, and the
        # detection of a killed worker, waits for the next poll.
        # Processes hand their metrics to the node's exporter every second (Ray's default: 10 s).
        ray.init(num_cpus=2, log_to_driver=False, logging_level="WARNING", dashboard_port=port,
                 _system_config={"metrics_report_interval_ms": 1000},
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                                           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def tiny_spec(family: str, path: str | Path = SAMPLE, **sections) -> dict:
    """A raw spec small enough to train in seconds on 2 cores."""
    raw = {
        "name": f"test-{family}",
        "data": {"path": str(path), "vocab_size": 512, "block_size": 32, "max_length": 48,
                 **({"label_column": "label"} if family == "classifier" else {})},
        "model": {"family": family, "n_layer": 1, "n_head": 2, "d_model": 32, "dropout": 0.0},
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
    from orchestrator.data import prepare_data
    from orchestrator.spec import parse_spec

    run_dir = tmp_path_factory.mktemp("prepared-gpt")
    return run_dir, prepare_data(parse_spec(tiny_spec("gpt")), run_dir)
