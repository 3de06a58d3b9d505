"""Say when a stage waits for resources, and who holds them.

A stage whose actor or trial cannot be placed waits silently in Ray for as long as nothing frees
what it asks for (a service beside it may hold the CPUs for days). The driver watches its job's
unplaced actors and the cluster's pending placement groups while the stages run; one that stays
unplaced for `after_s` is said on the progress line, with what Ray is asked for (what `ray
status` shows as pending demands), what is free and what holds the rest, and said again every
`every_s` while it lasts. Tasks are not in the GCS's tables, and queue briefly in any busy stage:
a request is said as a waiting task only when it cannot be placed beside what services hold (Ray
Data's file listing asks for a whole CPU; a head whose services leave half of one free held a
job's data stage silently for good)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

WATCHED = ("CPU", "GPU")  # what stages wait for; memory and node labels are noise in a line


@dataclass(frozen=True)
class ClusterLoad:
    """One look at the cluster: what of this job waits to be placed (actors and placement groups:
    a stage's long-lived parts; tasks queue briefly in any busy stage), what is free of what
    there is."""

    waiting: tuple[str, ...]  # e.g. "actor MapWorker(evaluate)", "placement group of 2 CPU"
    asked: tuple[dict[str, float], ...] = ()  # every pending request's resources, e.g. {"CPU": 1}
    free: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)

    def beside(self, held: dict[str, dict[str, float]]) -> ClusterLoad:
        """This look with every request that cannot be placed beside what services hold (a
        task's, when nothing of this job is seen waiting) counted as waiting: it waits until a
        service goes, however long the rest of the cluster takes to free up."""
        if self.waiting:
            return self
        room = {resource: self.total.get(resource, 0)
                - sum(amounts.get(resource, 0) for amounts in held.values())
                for resource in WATCHED}
        blocked = tuple(f"a task of {_resources(request)}" for request in self.asked
                        if any(request.get(resource, 0) > room[resource] + 1e-9
                               for resource in WATCHED))
        return replace(self, waiting=blocked)


def _amount(value: float) -> str:
    return f"{value:g}"


def _resources(bundle: dict[str, float]) -> str:
    """`1 CPU`, `2 CPU + 1 GPU`: the watched resources of a request."""
    return " + ".join(f"{_amount(v)} {k}" for k, v in sorted(bundle.items())
                      if k in WATCHED and v) or "no CPU or GPU"


def _counted(items: tuple[str, ...]) -> list[str]:
    """`2 x 1 CPU` for two equal items, in a stable order."""
    counts = Counter(items)
    return [what if n == 1 else f"{n} x {what}" for what, n in sorted(counts.items())]


def describe_wait(load: ClusterLoad, held: dict[str, dict[str, float]], waited_s: float) -> str:
    """The progress line for a wait: what waits, what is free of what there is, and who holds
    the rest (services by name; the remainder is trials', actors' and other jobs')."""
    waiting = ", ".join(_counted(load.waiting))
    line = f"waiting {waited_s:.0f} s to place {waiting}"
    if load.asked:
        line += f" (Ray is asked for {', '.join(_counted(tuple(map(_resources, load.asked))))})"
    for resource in WATCHED:
        total = load.total.get(resource, 0)
        if not total:
            continue
        free = load.free.get(resource, 0)
        holders = [f"service {name} holds {_amount(res[resource])}"
                   for name, res in sorted(held.items()) if res.get(resource)]
        others = total - free - sum(res.get(resource, 0) for res in held.values())
        if others > 1e-9:
            holders.append(f"trials, actors and other jobs hold {_amount(round(others, 2))}")
        line += f"; {_amount(free)} of {_amount(total)} {resource} free"
        if holders:
            line += " (" + ", ".join(holders) + ")"
    return line


@dataclass
class WaitTracker:
    """Decides from successive looks when a wait is worth a line: something unplaced for
    `after_s`, then again every `every_s` while it lasts. Plain logic; the clock is the caller's."""

    after_s: float = 20.0
    every_s: float = 30.0
    since: float | None = None
    last_said: float | None = None

    def due(self, load: ClusterLoad, now: float) -> float | None:
        """Seconds waited when a line is due now, else None."""
        if not load.waiting:
            self.since = self.last_said = None
            return None
        if self.since is None:
            self.since = now
        waited = now - self.since
        if waited < self.after_s or (self.last_said is not None
                                     and now - self.last_said < self.every_s):
            return None
        self.last_said = now
        return waited


def _short_class_name(qualified: str) -> str:
    """A class's name without its module and enclosing scopes: `Waiter`, `MapWorker(Map(f))`."""
    return re.sub(r"^[\w.<>]*\.", "", qualified)


def cluster_load() -> ClusterLoad:
    """This job's actors pending creation and the cluster's pending placement groups, from the
    GCS (no dashboard needed), with the cluster's free and total resources."""
    import ray
    from ray._private import state
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.util import placement_group_table

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    pending = state.actors(job_id=job, actor_state_name="PENDING_CREATION").values()
    waiting = [f"actor {_short_class_name(actor['ActorClassName'])}" for actor in pending]
    for group in placement_group_table().values():
        if group["state"] == "PENDING":
            total: dict[str, float] = {}
            for bundle in group["bundles"].values():
                for key, value in bundle.items():
                    total[key] = total.get(key, 0) + value
            waiting.append(f"placement group of {_resources(total)}")
    demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    asked = [dict(request.bundle) for demand in demands.ray_task_actor_demand
             for request in demand.bundles_by_count for _ in range(request.count)]
    return ClusterLoad(tuple(waiting), tuple(asked), ray.available_resources(),
                       ray.cluster_resources())


@contextmanager
def watch_waits(say: Callable[[str], None], held: Callable[[], dict[str, dict[str, float]]],
                look: Callable[[], ClusterLoad] = cluster_load, tracker: WaitTracker | None = None,
                interval_s: float = 5.0) -> Iterator[None]:
    """While the body runs, look at the cluster every `interval_s` and say the waits the tracker
    finds due. A look that fails (the cluster is going away) is skipped: watching must never
    fail the job."""
    tracker = tracker or WaitTracker()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            try:
                load = look()
                holders = held() if load.waiting or load.asked else {}
                load = load.beside(holders)
                waited = tracker.due(load, time.monotonic())
                if waited is not None:
                    say(describe_wait(load, holders, waited))
            except Exception:  # noqa: BLE001, S112 - a failed look is no reason to stop a job
                continue

    thread = threading.Thread(target=watch, name="orchestrator-wait-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 5)
