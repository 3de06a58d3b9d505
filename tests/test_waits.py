"""A stage that waits for resources says so on its progress line within 30 s, with what waits,
what is free and who holds the rest, and keeps saying it while the wait lasts; and a stage that
fits beside what holds the rest does not wait for good."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from conftest import tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.evaluate import evaluate_bundle
from orchestrator.spec import parse_spec
from orchestrator.waits import ClusterLoad, WaitTracker, cluster_load, describe_wait, watch_waits

STUCK = ClusterLoad(waiting=("actor MapWorker(evaluate)",), asked=({"CPU": 1.0},),
                    free={"CPU": 0.5}, total={"CPU": 2.0})


def test_the_line_names_what_waits_what_is_free_and_who_holds_the_rest() -> None:
    line = describe_wait(STUCK, {"quickstart-service": {"CPU": 1.0}}, waited_s=21.4)
    assert line == ("waiting 21 s to place actor MapWorker(evaluate) (Ray is asked for 1 CPU); "
                    "0.5 of 2 CPU free (service quickstart-service holds 1, trials, actors and "
                    "other jobs hold 0.5)")


def test_equal_waits_are_counted_and_gpus_are_named_when_the_cluster_has_them() -> None:
    load = ClusterLoad(waiting=("placement group of 1 CPU + 1 GPU",) * 2,
                       asked=({"CPU": 1, "GPU": 1, "memory": 2**30},) * 2, free={"CPU": 3, "GPU": 0},
                       total={"CPU": 4, "GPU": 1})
    line = describe_wait(load, {"chat-service": {"GPU": 1.0, "CPU": 1.0}}, waited_s=30)
    assert "2 x placement group of 1 CPU + 1 GPU" in line
    assert "Ray is asked for 2 x 1 CPU + 1 GPU" in line
    assert "3 of 4 CPU free (service chat-service holds 1)" in line
    assert "0 of 1 GPU free (service chat-service holds 1)" in line


def test_a_task_is_said_to_wait_only_when_it_cannot_be_placed_beside_what_services_hold() -> None:
    """Tasks queue in any busy stage: one is a wait worth a line when the services leave no
    room for it, however long the rest takes to free up."""
    queued = ClusterLoad(waiting=(), asked=({"CPU": 1.0},) * 3, free={"CPU": 0}, total={"CPU": 2})
    assert queued.beside({"small-service": {"CPU": 0.5}}).waiting == ()
    blocked = replace(queued, free={"CPU": 0.5}).beside({"big-service": {"CPU": 1.5}})
    assert blocked.waiting == ("a task of 1 CPU",) * 3
    assert describe_wait(blocked, {"big-service": {"CPU": 1.5}}, waited_s=20) == (
        "waiting 20 s to place 3 x a task of 1 CPU (Ray is asked for 3 x 1 CPU); 0.5 of 2 CPU "
        "free (service big-service holds 1.5)")
    assert STUCK.beside({"big-service": {"CPU": 1.5}}) == STUCK  # this job's own waits say more


def test_a_wait_is_said_after_its_threshold_then_every_interval_and_forgotten_when_over() -> None:
    tracker = WaitTracker(after_s=20, every_s=30)
    placed = ClusterLoad(waiting=())
    assert tracker.due(STUCK, now=100) is None  # a wait just begun is routine
    assert tracker.due(STUCK, now=115) is None
    assert tracker.due(STUCK, now=120) == 20
    assert tracker.due(STUCK, now=140) is None  # said 20 s ago
    assert tracker.due(STUCK, now=150) == 50
    assert tracker.due(placed, now=155) is None  # placed: the next wait starts from zero
    assert tracker.due(STUCK, now=160) is None
    assert tracker.due(STUCK, now=180) == 20


@pytest.mark.usefixtures("ray_local")
def test_an_actor_that_cannot_be_placed_beside_what_holds_the_cpus_is_said_while_it_waits() -> None:
    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=1)
    class Waiter:
        pass

    holder = Holder.options(num_cpus=ray.available_resources()["CPU"] - 0.5).remote()
    ray.get(holder.ready.remote())
    waiter = Waiter.remote()
    lines: list[str] = []
    try:
        with watch_waits(lines.append, held=dict, interval_s=0.5,
                         tracker=WaitTracker(after_s=1, every_s=2)):
            deadline = time.monotonic() + 60
            while len(lines) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
        assert len(lines) >= 2, lines  # said, and said again while it lasts
        assert "actor Waiter" in lines[0] and "Ray is asked for 1 CPU" in lines[0], lines
        assert "0.5 of 2 CPU free (trials, actors and other jobs hold 1.5)" in lines[0], lines
    finally:
        ray.kill(waiter)
        ray.kill(holder)
    deadline = time.monotonic() + 30
    while cluster_load().waiting and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not cluster_load().waiting  # nothing of this job waits once the waiter is gone


@ray.remote
class Holder:
    """Stands for what holds CPUs for good beside a job: a service's replicas."""

    def ready(self) -> bool:
        return True


def test_an_evaluation_with_one_cpu_left_to_it_finishes(prepared_gpt, sample_rows,
                                                        tmp_path: Path) -> None:
    """Ray Data's reads ask for a whole CPU: a scoring actor that reserved a quarter of the last
    one left them 0.75 for good (a 2-CPU head serving two 0.5-CPU replicas: the stage never
    ended, and said nothing)."""
    run_dir, info = prepared_gpt
    bundle_dir = initial_bundle(tmp_path / "bundle", parse_spec(tiny_spec("gpt")), sample_rows)
    holder = Holder.options(num_cpus=ray.available_resources()["CPU"] - 1).remote()
    ray.get(holder.ready.remote())
    with ThreadPoolExecutor(1) as pool:
        evaluation = pool.submit(evaluate_bundle, run_dir, str(bundle_dir), info)
        try:
            result = evaluation.result(timeout=300)  # minutes on a busy machine; it waited for good
        finally:
            ray.kill(holder)  # a stuck evaluation ends too, so the pool can close
    assert set(result.splits) == {"val", "test"}
    assert all(split.rows > 0 for split in result.splits.values())
