"""Elastic training on a real multi-node Ray cluster: a head and worker nodes started as separate
`ray start` processes on this machine, a trial of `resources.num_workers: {min: 1, max: 2}`,
a node added mid-run (the group grows) and a node killed mid-run (the group shrinks, resumes from
a checkpoint the two workers wrote, and trains to the end), with the global batch kept and each
restart resuming from the latest checkpoint.

The resized run's final validation loss must be within 2% of an unresized run's: the same spec
(data, seed, steps, global batch) on one worker, trained by the same loop in this process
without Ray (LocalSession: what a one-worker trial runs in its Tune trial actor, with each epoch
a seeded permutation of the split instead of Ray Data's shuffle buffer). 2% leaves room for
the data order: two seeds of that run end 0.44% apart, of Ray Train's fixed 1-worker run 1.2%
(docs/benchmarks.md, *Elastic training*).

Each node is a raylet with its workers; killing a node SIGKILLs every process that carries that
node's marker in its environment (Ray passes the raylet's environment to its workers), as a
lost machine would. The cluster is torn down by its own marker, never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, TIMING, free_port, tiny_spec
from processes import VENV_BIN, base_env, marked_pids, stop_marked, wait_for_dashboard

from orchestrator.cluster import plan_for
from orchestrator.data.stage import load_data_info
from orchestrator.rundir import RunDir
from orchestrator.spec import SpecError, parse_spec
from orchestrator.train.config import worker_config
from orchestrator.train.loop import train_loop
from orchestrator.train.session import LocalSession
from orchestrator.train.trainer import scaling_config

MARKER = "ORCHESTRATOR_ELASTIC_CLUSTER"
NODE_MARKER = "ORCHESTRATOR_ELASTIC_NODE"
# Limits for a machine at half the speed of a busy 2-core one; reaching one fails with the
# driver's output. They bound waits, they assert nothing about speed.
NODE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600
# One worker a node: the head holds one, each worker node one more.
SPEC = tiny_spec(
    "gpt",
    train={"max_steps": 4000, "eval_interval": 200, "warmup_steps": 2, "batch_size": 8,
           "global_batch_size": 16, "max_failures": 3, "checkpoint_keep": "latest",
           "checkpoints_to_keep": 100},
    resources={"num_workers": {"min": 1, "max": 2, "resize_check_s": 1},
               "cpus_per_worker": 1})

# The job's driver: prepare the data, then fit one Ray Train run (what a sweep's trial of several
# workers runs), and print its last reported metrics and the fit's wall time.
DRIVER = """
import json, sys, time
import ray
from orchestrator.cluster import with_device, plan_cluster
from orchestrator.data.stage import prepare_data
from orchestrator.rundir import RunDir
from orchestrator.spec import parse_spec
from orchestrator.train.config import worker_config
from orchestrator.train.trainer import build_trainer

spec = parse_spec(json.loads(sys.argv[1]))
run_dir = RunDir.at(sys.argv[2])
ray.init(address=sys.argv[3], log_to_driver=False, logging_level="WARNING")
spec = with_device(spec, plan_cluster(spec))
info = prepare_data(spec, run_dir)
started = time.monotonic()
result = build_trainer(worker_config(spec, info, run_dir), name="elastic").fit()
print("RESULT " + json.dumps({"metrics": result.metrics, "fit_s": time.monotonic() - started}))
"""


# --- the spec, the plan and Ray Train's scaling config (no Ray) ------------------------------

def _spec(workers, train=None, sweep=None):
    return parse_spec(tiny_spec("gpt", train=train or {}, sweep=sweep or {},
                                resources={"num_workers": workers, "cpus_per_worker": 1}))


def test_a_worker_range_keeps_the_global_batch_at_every_size():
    spec = _spec({"min": 1, "max": 4}, {"batch_size": 8, "global_batch_size": 96})
    assert [spec.grad_accum_steps(n) for n in spec.resources.worker_counts] == [12, 6, 4, 3]
    # Without a global batch it is batch_size × grad_accum_steps × max, which must split too.
    spec = _spec({"min": 1, "max": 2}, {"batch_size": 8})
    assert spec.global_batch_size == 16 and spec.grad_accum_steps(1) == 2
    assert _spec(3, {"batch_size": 8, "grad_accum_steps": 2}).grad_accum_steps(3) == 2


@pytest.mark.parametrize(("workers", "train", "named"), [
    ({"min": 1, "max": 3}, {"batch_size": 16},
     ("the global batch (train.batch_size × train.grad_accum_steps × resources.num_workers.max "
     "= 48) must be a multiple of train.batch_size × every worker count")),
    ({"min": 2, "max": 3}, {"batch_size": 8, "global_batch_size": 32},
     ("train.global_batch_size (32) must be a multiple of train.batch_size × every worker count "
     "of resources.num_workers (2 to 3), and 8 × 3 = 24 does not divide it")),
    ({"min": 3, "max": 2}, {}, ("resources.num_workers = {'min': 3, 'max': 2}: min (3) must be "
     "at most max (2)")),
    ({"min": 0, "max": 2}, {}, "resources.num_workers.min = 0"),
    ({"max": 2}, {}, "resources.num_workers.min = (missing)"),
    ("two", {}, "resources.num_workers = 'two': expected a whole number ≥ 1 or {min: M, max: N}"),
    (0, {}, "resources.num_workers = 0: Input should be greater than or equal to 1"),
])
def test_bad_worker_counts_are_refused_by_name(workers, train, named):
    with pytest.raises(SpecError) as refused:
        _spec(workers, train)
    assert named in str(refused.value)
    if "global batch" in named:  # and it says what fits every count
        assert "set train.global_batch_size to" in str(refused.value)


def test_the_plan_needs_room_for_min_and_counts_max_for_trials_at_once():
    spec = _spec({"min": 2, "max": 4}, {"batch_size": 4, "global_batch_size": 48},
                 sweep={"num_samples": 4})
    plan = plan_for(spec, {"CPU": 9})
    assert plan.trial_resources == {"CPU": 4} and plan.concurrent_trials == 2
    assert plan_for(spec, {"CPU": 3}).concurrent_trials == 1  # starts with 2, grows when it can
    with pytest.raises(SpecError, match=r"needs 2 CPU \(num_workers.min = 2"):
        plan_for(spec, {"CPU": 1})


def test_ray_train_gets_the_range_and_a_number_stays_fixed():
    elastic = scaling_config(_spec({"min": 1, "max": 2, "resize_check_s": 5}), use_gpu=False)
    assert elastic.elasticity_enabled and elastic.num_workers == (1, 2)
    assert elastic.elastic_resize_monitor_interval_s == 5
    fixed = scaling_config(_spec(2, {"batch_size": 8}), use_gpu=False)
    assert not fixed.elasticity_enabled and fixed.num_workers == 2


# --- a real cluster ---------------------------------------------------------------------------

@dataclass
class Cluster:
    address: str
    root: Path
    marker: str
    token: str
    nodes: dict[str, list[int]] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """Token auth on, as Ray now has it by default; Train's health checks every 0.5 s (as in
        conftest.ray_local) and a lost node declared dead after 3 missed checks of 0.5 s
        (Ray's default: 5 of 3 s); a worker group that does not start within 30 s (Ray's
        default: 60 s) is given up, as after a node loss, when Ray Train first tries the old size
        on resources that still count the lost node; the cluster's marker for teardown."""
        return base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", PYTHONPATH=str(REPO),
                        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30",
                        RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="3",
                        **{MARKER: self.marker}, **extra)

    def add_node(self) -> str:
        """`ray start --address` of a 1-CPU worker node; its name kills it."""
        name = uuid.uuid4().hex
        started = subprocess.run(
            [str(VENV_BIN / "ray"), "start", f"--address={self.address}", "--num-cpus=1",
             f"--object-store-memory={100 * 1024**2}", "--min-worker-port=0",
             "--max-worker-port=0", f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats"],
            env=self.env(**{NODE_MARKER: name}), capture_output=True, text=True,
            timeout=NODE_TIMEOUT_S, check=False)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        return name

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet and workers at once, as a lost machine."""
        for pid in marked_pids(NODE_MARKER, name, self.root / "no-such-path"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A 1-CPU head with token auth, torn down (with every node it gained) by its marker."""
    root = Path(tempfile.mkdtemp(prefix="orch-el-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    cluster = Cluster(f"127.0.0.1:{gcs_port}", root, uuid.uuid4().hex, secrets.token_hex(32))
    try:
        started = subprocess.run(
            [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus=1", f"--port={gcs_port}",
             f"--temp-dir={root / 'ray'}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0",
             "--max-worker-port=0", f"--object-store-memory={200 * 1024**2}",
             "--disable-usage-stats"],
            env=cluster.env(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}"),
            capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=False)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        wait_for_dashboard(f"http://127.0.0.1:{dashboard_port}",
                           {"Authorization": f"Bearer {cluster.token}"})
        yield cluster
    finally:
        survivors = stop_marked(MARKER, cluster.marker, root)
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes of the elastic cluster survived: {survivors}"


@dataclass(frozen=True)
class Report:
    step: int
    workers: int
    resumed_from: int
    seen_s: float  # when the test first saw its checkpoint, from the driver's start


class Reports:
    """The run's reports as its checkpoints land (trainer_state.json is written last)."""

    def __init__(self, folder: Path, driver: subprocess.Popen, log: Path):
        self.folder, self.driver, self.log = folder, driver, log
        self.started, self.seen = time.monotonic(), {}

    def poll(self) -> list[Report]:
        for state in self.folder.glob("checkpoint_*/trainer_state.json"):
            if state.parent.name not in self.seen:
                try:  # Ray Train may still be copying it into storage
                    metrics = json.loads(state.read_text())["metrics"]
                except (OSError, ValueError):
                    continue
                self.seen[state.parent.name] = Report(
                    metrics["step"], metrics["workers"], metrics["resumed_from_step"],
                    time.monotonic() - self.started)
        return sorted(self.seen.values(), key=lambda r: r.seen_s)

    def to_the_end(self) -> list[Report]:
        """Follow the run until its driver exits."""
        while self.driver.poll() is None:
            self.poll()
            time.sleep(0.2)
        return self.poll()

    def result(self) -> dict:
        """The driver's RESULT line ({metrics, fit_s}) once it has exited; its output if it failed."""
        returncode = self.driver.wait()
        output = self.log.read_text()
        assert returncode == 0, output[-4000:]
        return json.loads(output.split("RESULT ", 1)[1].splitlines()[0])

    def wait_for(self, what: str, done) -> list[Report]:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not done(reports := self.poll()):
            if self.driver.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what}: not seen (reports {reports}); driver:\n"
                            f"{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        return reports


def start_run(cluster: Cluster, spec: dict) -> Reports:
    """The driver of one Ray Train run of `spec` on the cluster, its data in the cluster's run/."""
    run_dir, log = cluster.root / "run", cluster.root / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [str(VENV_BIN / "python"), "-c", DRIVER, json.dumps(spec), str(run_dir),
             cluster.address], env=cluster.env(), cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT)
    return Reports(run_dir / "train" / "elastic", driver, log)


def unresized_val_loss(spec: dict, run_dir: Path, checkpoints: Path) -> float:
    """The final validation loss of `spec` on one worker, on the run's prepared data, trained in
    this process by the same loop without Ray (see the module's docstring)."""
    raw = {**spec, "resources": {**spec["resources"], "num_workers": 1, "use_gpu": False}}
    config = worker_config(parse_spec(raw), load_data_info(run_dir), RunDir.at(run_dir))
    session = LocalSession(config, checkpoints)
    train_loop(config, session)
    assert session.reports[-1]["step"] == spec["train"]["max_steps"]
    return session.reports[-1]["val_loss"]


@pytest.mark.e2e
def test_elastic_trial_grows_onto_a_new_node_and_rides_a_node_loss(cluster, record_property):
    reports = start_run(cluster, SPEC)
    try:
        # The head fits one worker: the run starts with the minimum.
        first = reports.wait_for("a first report", lambda rs: rs)[0]
        assert first.workers == 1
        # A node joins: the group grows onto it, from the latest checkpoint.
        node = cluster.add_node()
        grown = reports.wait_for("two reports of the group grown to 2 workers",
                                 lambda rs: sum(r.workers == 2 for r in rs) >= 2)
        before_growth = max(r.step for r in grown if r.workers == 1)
        first_grown = next(r for r in grown if r.workers == 2)
        assert first_grown.resumed_from >= first.step
        # The node is lost after the grown group's second report, by when its first checkpoint
        # is registered (right after a report it may not be yet, and the shrunk group would
        # resume from before the growth): the group shrinks to the head's worker, continues
        # from what the two workers trained, and trains to the end.
        last_before_loss = max(r.step for r in grown)
        cluster.kill_node(node)
        killed_at = time.monotonic() - reports.started
        everything = reports.to_the_end()
        result = reports.result()
    finally:
        if reports.driver.poll() is None:
            reports.driver.kill()
    final = result["metrics"]
    assert final["step"] == SPEC["train"]["max_steps"] and final["workers"] == 1
    # The shrunk group: one worker, resumed from a checkpoint at most one interval older than
    # the last one seen before the loss: one the two workers wrote.
    after = [r for r in everything if r.workers == 1 and r.seen_s > first_grown.seen_s]
    assert after, everything
    resumed = min(r.resumed_from for r in after)
    assert resumed >= last_before_loss - SPEC["train"]["eval_interval"], (resumed, after)
    assert resumed >= first_grown.step, (resumed, first_grown)
    # Resizing cost no quality: the final loss is within 2% of an unresized run's.
    started = time.monotonic()
    unresized = unresized_val_loss(SPEC, cluster.root / "run", cluster.root / "unresized")
    unresized_s = time.monotonic() - started
    assert abs(final["val_loss"] - unresized) <= 0.02 * unresized, (final["val_loss"], unresized)
    interval = SPEC["train"]["eval_interval"]
    record_property(TIMING, (
        f"elastic (busy machine): grew 1->2 after step {before_growth}, resumed from "
        f"{first_grown.resumed_from}; node lost at {killed_at:.1f} s after step "
        f"{last_before_loss}: resumed from step {resumed} "
        f"({last_before_loss - resumed} steps repeated, interval {interval}), first report "
        f"on 1 worker {min(r.seen_s for r in after) - killed_at:.1f} s after the loss; fit "
        f"{result['fit_s']:.1f} s; final val loss {final['val_loss']:.4f} against "
        f"{unresized:.4f} unresized (1 worker without Ray, {unresized_s:.1f} s)"))


@pytest.mark.e2e
@pytest.mark.bench
@pytest.mark.parametrize("workers", [1, 2])
def test_a_fixed_size_run_of_the_elastic_spec(cluster, workers, record_property):
    """The fixed-size runs the elastic run's wall time is set against in docs/benchmarks.md: the
    same spec with `num_workers: N` on the same kind of cluster (the 1-CPU head, and one 1-CPU
    worker node for the second worker)."""
    if workers == 2:
        cluster.add_node()
    spec = {**SPEC, "resources": {**SPEC["resources"], "num_workers": workers}}
    reports = start_run(cluster, spec)
    try:
        everything = reports.to_the_end()
        result = reports.result()
    finally:
        if reports.driver.poll() is None:
            reports.driver.kill()
    final = result["metrics"]
    assert final["step"] == SPEC["train"]["max_steps"]
    assert {r.workers for r in everything} == {workers}
    assert all(r.resumed_from == -1 for r in everything)  # never restarted
    record_property(TIMING, (
        f"fixed {workers} worker(s) (busy machine): fit {result['fit_s']:.1f} s, final val loss "
        f"{final['val_loss']:.4f}"))
