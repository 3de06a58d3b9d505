"""Run the stages in order; each stage's outputs are in the run directory (rundir.py), and a
run whose driver died resumes after its last completed stage (resume.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import ray

from orchestrator import serve as service
from orchestrator.bundle import read_ensemble, write_metrics
from orchestrator.cluster import ClusterPlan, plan_cluster, refuse_untrainable, with_device
from orchestrator.compress.stage import compress_winner, measure_latency
from orchestrator.data.stage import prepare_data
from orchestrator.evaluate import evaluate_bundle
from orchestrator.records import (
    BundleRef,
    Completed,
    Compression,
    DataInfo,
    Evaluation,
    json_safe,
)
from orchestrator.report import reference_verdict, sweep_section, write_report
from orchestrator.resume import check_resumable
from orchestrator.rundir import RunDir
from orchestrator.select import select_winner
from orchestrator.serve.ingress import Ingress, mismatch, running_ingress
from orchestrator.serve.samples import send_sample_requests
from orchestrator.spec import JobSpec, spec_to_yaml
from orchestrator.sweep.space import apply_trial_config
from orchestrator.sweep.tuner import SweepResult, pick_winner, run_sweep
from orchestrator.tracking import Tracker
from orchestrator.waits import watch_waits

STAGES = ("data", "sweep", "select", "evaluate", "compress", "deploy")


def stages_of(spec: JobSpec) -> tuple[str, ...]:
    """The stages this job runs: compress only with compress.variants."""
    return tuple(s for s in STAGES if s != "compress" or spec.compress.variants)


@dataclass
class Progress:
    """Prints which stage runs and how far it is, and remembers the run directory and the stage,
    so that whoever started the run can say where it stopped when it is interrupted."""

    say: Callable[[str], None] = print
    on_run_dir: Callable[[RunDir], None] = lambda _: None  # the CLI moves its log file there
    run_dir: RunDir | None = None
    stages: tuple[str, ...] = tuple(s for s in STAGES if s != "compress")
    current: str = ""
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def begin(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.on_run_dir(run_dir)
        self.say(f"run directory: {run_dir}")

    def stage(self, name: str) -> None:
        self._close()
        self.current = name
        self.started[name] = time.monotonic()
        self.say(f"[{self._number(name)} {name}] started")

    def done_earlier(self, name: str, what: str) -> None:
        self.say(f"[{self._number(name)} {name}] done before: {what}")

    def note(self, message: str) -> None:
        self.say(f"[{self._number(self.current)} {self.current}] {message}")

    def _number(self, name: str) -> str:
        return f"{self.stages.index(name) + 1}/{len(self.stages)}"

    def _close(self) -> None:
        if self.current:
            self.seconds[self.current] = round(time.monotonic() - self.started[self.current], 1)

    def finish(self) -> dict[str, float]:
        self._close()
        self.current = ""
        return self.seconds


def run_pipeline(spec: JobSpec, say: Callable[[str], None] | Progress = print,
                 resume: RunDir | None = None, new_run_dir: str | None = None) -> dict[str, Any]:
    """Run every stage on the connected Ray cluster; return the report (also in report.json).

    `say` receives the progress lines; pass a Progress to follow the stage and the run directory
    from outside (the CLI does, to report an interrupted run). With `resume`, the stages that
    run directory records as completed are not run again, and an interrupted sweep continues.
    `new_run_dir`: where a new run directory goes (default: `<runs_dir>/<name>-<time>`)."""
    # What the cluster gives this job is decided here, once (trial drivers on other nodes see
    # other nodes); a job that cannot train fails at once, before any stage runs.
    plan = plan_cluster(spec, held=service.held_by_services())
    spec = with_device(spec, plan)
    refuse_untrainable(spec, plan.use_gpu)
    deploy_as = _service_name(spec)
    if spec.serve.enabled:  # a deploy that cannot succeed fails now, not after the sweep
        service.check_deployable(spec, deploy_as)
    if new_run_dir is not None:
        run_dir = RunDir.create_at(new_run_dir)
    elif resume is None:
        run_dir = RunDir.create(spec.runs_dir, spec.name)
    else:
        run_dir = resume
        check_resumable(run_dir, spec)
    run_dir.spec_file.write_text(spec_to_yaml(spec))
    progress = say if isinstance(say, Progress) else Progress(say)
    progress.stages = stages_of(spec)
    progress.begin(run_dir)
    tracker = Tracker.for_job(spec, run_dir, progress.say)  # MLflow, with tracking.mlflow
    started = datetime.now(timezone.utc)
    done = run_dir.completed()

    with watch_waits(progress.note, service.held_by_services):
        info = _data_stage(spec, run_dir, done, progress)
        sweep = _sweep_stage(spec, run_dir, info, plan, done, progress)
        tracker.log_sweep()  # the trials, while the next stages run
        winner = sweep.winner
        winner_spec = apply_trial_config(spec, winner.config)
        bundle = _select_stage(spec, run_dir, info, sweep, done, progress)
        evaluation = _evaluate_stage(run_dir, bundle, info, plan, done, progress)
        compression = None
        if spec.compress.variants:
            compression = _compress_stage(winner_spec, run_dir, info, bundle, evaluation, plan,
                                          done, progress)
        endpoint, samples = None, []
        if spec.serve.enabled:
            endpoint, samples = _deploy_stage(winner_spec, deploy_as, compression.bundle
                                              if compression else bundle.uri, info, progress)
    report = json_safe({
        "name": spec.name, "run_dir": run_dir.uri, "task": info.task,
        "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
        "resumed": resume is not None, "stage_seconds": progress.finish(), "metric": spec.metric,
        "sweep_timing": {**asdict(sweep.timing), "overhead": sweep.timing.overhead},
        "sweep": sweep_section(spec, sweep),
        "data": {"texts": info.texts, "rows": info.rows, "vocab_size": info.vocab_size,
                 "labels": info.labels},
        "winner": {"trial_id": winner.trial_id, "arch": winner_spec.model.arch,
                   "config": winner.config, "bundle": bundle.uri, "best_step": winner.best_step,
                   "ensemble": [asdict(m) for m in read_ensemble(bundle.uri) or []]},
        "evaluation": evaluation.to_json(),
        "verdict": reference_verdict(evaluation, info.task),
        "compression": compression.to_json() if compression else None,
        "endpoint": endpoint,
        "sample_responses": samples,
        "trials": sweep.trials.drop(columns=["checkpoint_path"], errors="ignore")
                              .to_dict(orient="records"),
        "ray_version": ray.__version__,
    })
    write_report(run_dir, report, spec, sweep, evaluation, info)
    tracker.log_result()
    run_dir.mark_completed(report=report["finished"])
    return report


def _data_stage(spec: JobSpec, run_dir: RunDir, done: Completed,
                progress: Progress) -> DataInfo:
    if done.data:
        progress.done_earlier("data", f"{done.data.rows} rows")
        return done.data
    progress.stage("data")
    info = prepare_data(spec, run_dir, progress.note)
    progress.note(f"{info.texts} texts -> {info.rows} rows, vocabulary {info.vocab_size}"
                  + (f", {info.num_classes} classes" if info.labels else ""))
    run_dir.mark_completed(data=info)
    return info


def _sweep_stage(spec: JobSpec, run_dir: RunDir, info: DataInfo, plan: ClusterPlan,
                 done: Completed, progress: Progress) -> SweepResult:
    if done.sweep:
        trials = pd.read_parquet(run_dir.trials.path, filesystem=run_dir.trials.fs)
        history = pd.read_parquet(run_dir.history.path, filesystem=run_dir.history.fs)
        progress.done_earlier("sweep", f"{len(trials)} trials")
        return SweepResult(trials, history, pick_winner(trials, spec), done.sweep)
    progress.stage("sweep")
    sweep = run_sweep(spec, run_dir, info, progress.note,
                      restore=run_dir.tune_experiment.exists(), plan=plan)
    timing = sweep.timing
    progress.note(f"{len(sweep.trials)} trials in {timing.wall_s:.0f} s: {timing.training_s:.0f} s "
                  f"of training steps, {timing.concurrent_trials} at a time "
                  f"({timing.overhead:.2f} x the training time per slot)")
    run_dir.mark_completed(sweep=timing)
    return sweep


def _select_stage(spec: JobSpec, run_dir: RunDir, info: DataInfo,
                  sweep: SweepResult, done: Completed, progress: Progress) -> BundleRef:
    winner = sweep.winner
    if done.select:
        progress.done_earlier("select", f"winner {winner.trial_id}")
        return BundleRef(run_dir.winner.uri)  # the layout's, not a path stages.json names
    progress.stage("select")
    progress.note(f"winner {winner.trial_id} {winner.config} {spec.metric} {winner.metric:.4f}")
    bundle = select_winner(spec, run_dir, info, sweep.trials, winner, progress.note)
    run_dir.mark_completed(select=bundle)
    return bundle


def _compress_stage(winner_spec: JobSpec, run_dir: RunDir, info: DataInfo, bundle: BundleRef,
                    evaluation: Evaluation, plan: ClusterPlan, done: Completed,
                    progress: Progress) -> Compression:
    if done.compress:
        progress.done_earlier("compress", f"serving {done.compress.selected}")
        # What is served comes from the layout, not from a path stages.json names.
        return replace(done.compress,
                       bundle=run_dir.served_bundle(done.compress.selected).uri)
    progress.stage("compress")
    compression = compress_winner(winner_spec, run_dir, info, bundle.uri, evaluation.test,
                                  gpus=plan.inference_gpus, note=progress.note)
    if winner_spec.serve.enabled and winner_spec.compress.latency_requests:
        progress.note("p50 latency of each variant, each on an app of its own")
        measure_latency(winner_spec, compression, info.task)
    progress.note(f"serving {compression.selected}: {compression.rule}")
    run_dir.mark_completed(compress=compression)
    return compression


def _evaluate_stage(run_dir: RunDir, bundle: BundleRef, info: DataInfo, plan: ClusterPlan,
                    done: Completed, progress: Progress) -> Evaluation:
    if done.evaluate:
        progress.done_earlier("evaluate", "test metrics in the bundle")
        return done.evaluate
    progress.stage("evaluate")
    evaluation = evaluate_bundle(run_dir, bundle.uri, info, gpus=plan.inference_gpus)
    write_metrics(bundle.uri, {split: e.model for split, e in evaluation.splits.items()})
    run_dir.mark_completed(evaluate=evaluation)
    return evaluation


def _service_name(spec: JobSpec) -> str:
    """With serve.keep_running, the job's own service at `/` (a rolling update of the job's
    earlier one); otherwise an app of its own, so that a live service of the same name is never
    touched."""
    return service.app_name(spec) if spec.serve.keep_running else \
        service.scratch_app_name(spec, "check")


def _deploy_stage(winner_spec: JobSpec, name: str, bundle_uri: str, info: DataInfo,
                  progress: Progress) -> tuple[str | None, list[dict[str, Any]]]:
    """Serve the bundle as `name` and send it the sample requests; the app is left serving only
    with serve.keep_running, and an app this stage created is removed when the stage fails."""
    progress.stage("deploy")
    keep = winner_spec.serve.keep_running
    created = name not in service.running_apps()
    succeeded = False
    try:
        url = service.deploy(winner_spec, bundle_uri, name=name)
        progress.note(f"serving at {url}" if keep else
                      f"answering at {url} until the samples are sent (serve.keep_running false)")
        if (wrong := mismatch(Ingress(winner_spec.serve.ingress), running_ingress())) is not None:
            progress.note(wrong)
        samples = send_sample_requests(winner_spec, url, info.task)
        succeeded = True
    finally:
        if created and not (keep and succeeded):
            service.remove(name)
    return (url if keep else None), samples
