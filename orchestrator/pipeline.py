"""Run the stages in order and own the run directory and the final report.

Run directory layout (each stage writes its part; later stages only read earlier parts):
  spec.yaml                  the validated spec with every default filled in
  tokenizer/, data/          the data stage
  train/, sweep/             the sweep stage (Ray Train runs, Tune trials and their checkpoints,
                             trials.parquet, history.parquet)
  winner/                    the select stage's bundle, with test metrics after evaluate
  report.json, report.md     the summary
  plots/                     the report's figures (learning curves, sweep, winner on test)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray

from orchestrator import serve as service
from orchestrator.bundle import WINNER_DIR, save_bundle, write_metrics
from orchestrator.data import prepare_data
from orchestrator.evaluate import evaluate_bundle
from orchestrator.plots import plots_markdown, write_report_plots
from orchestrator.report import json_safe, reference_verdict, render_markdown
from orchestrator.serve.samples import send_sample_requests
from orchestrator.spec import JobSpec, spec_to_yaml
from orchestrator.sweep import run_sweep
from orchestrator.sweep.space import apply_trial_config
from orchestrator.train.trainer import check_cluster_fits, check_training_options, wants_gpu

STAGES = ("data", "sweep", "select", "evaluate", "deploy")
RESULT_MARKER = "orchestrator-result: "


@dataclass
class Progress:
    """Prints which stage runs and how far it is, and remembers the run directory and the stage,
    so that whoever started the run can say where it stopped when it is interrupted."""

    say: Callable[[str], None] = print
    on_run_dir: Callable[[Path], None] = lambda _: None  # the CLI moves its log file there
    run_dir: Path | None = None
    current: str = ""
    started: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def begin(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.on_run_dir(run_dir)
        self.say(f"run directory: {run_dir}")

    def stage(self, name: str) -> None:
        self._close()
        self.current = name
        self.started[name] = time.monotonic()
        self.say(f"[{STAGES.index(name) + 1}/{len(STAGES)} {name}] started")

    def note(self, message: str) -> None:
        self.say(f"[{STAGES.index(self.current) + 1}/{len(STAGES)} {self.current}] {message}")

    def _close(self) -> None:
        if self.current:
            self.seconds[self.current] = round(time.monotonic() - self.started[self.current], 1)

    def finish(self) -> dict[str, float]:
        self._close()
        self.current = ""
        return self.seconds


def new_run_dir(spec: JobSpec) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(spec.run_dir) / f"{spec.name}-{stamp}"
    path.mkdir(parents=True, exist_ok=False)
    return path.resolve()


def run_pipeline(spec: JobSpec, say: Callable[[str], None] | Progress = print) -> dict[str, Any]:
    """Run every stage on the connected Ray cluster; return the report (also in report.json).

    `say` receives the progress lines; pass a Progress to follow the stage and the run directory
    from outside (the CLI does, to report an interrupted run)."""
    # use_gpu 'auto' is decided here, once: trial drivers on other nodes may see other nodes.
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"use_gpu": wants_gpu(spec)})})
    check_cluster_fits(spec)  # a job that cannot train fails at once, before any stage runs
    check_training_options(spec, spec.resources.use_gpu)
    progress = say if isinstance(say, Progress) else Progress(say)
    run_dir = new_run_dir(spec)
    (run_dir / "spec.yaml").write_text(spec_to_yaml(spec))
    progress.begin(run_dir)
    started = datetime.now(timezone.utc)

    progress.stage("data")
    info = prepare_data(spec, run_dir, progress.note)
    progress.note(f"{info.texts} texts -> {info.rows} rows, vocabulary {info.vocab_size}"
                  + (f", {info.num_classes} classes" if info.labels else ""))

    progress.stage("sweep")
    sweep = run_sweep(spec, run_dir, info, progress.note)
    timing = sweep.timing
    progress.note(f"{len(sweep.trials)} trials in {timing.wall_s:.0f} s: {timing.training_s:.0f} s "
                  f"of training steps, {timing.concurrent_trials} at a time "
                  f"({timing.overhead:.2f} x the training time per slot)")
    winner = sweep.winner
    config = {k.removeprefix("config/"): v for k, v in winner.items() if k.startswith("config/")}

    progress.stage("select")
    winner_spec = apply_trial_config(spec, config)
    val_metrics = {k.removeprefix("best/"): v for k, v in winner.items() if k.startswith("best/")}
    bundle_dir = save_bundle(run_dir / WINNER_DIR, winner_spec, info, winner["checkpoint_path"],
                             run_dir / "tokenizer", {"val": val_metrics}, winner["trial_id"])
    progress.note(f"winner {winner['trial_id']} {config} {spec.metric} "
                  f"{winner[f'best_{spec.metric}']:.4f}")

    progress.stage("evaluate")
    evaluation = evaluate_bundle(run_dir, bundle_dir, info)
    write_metrics(bundle_dir, {split: e["model"] for split, e in evaluation.items()})

    endpoint, samples = None, []
    if spec.serve.enabled:
        progress.stage("deploy")
        endpoint = service.deploy(winner_spec, bundle_dir)
        progress.note(f"serving at {endpoint}")
        samples = send_sample_requests(spec, endpoint, info.family)
        if not spec.serve.keep_running:
            service.shutdown(winner_spec)
    report = json_safe({
        "name": spec.name, "run_dir": str(run_dir), "family": info.family,
        "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
        "stage_seconds": progress.finish(), "metric": spec.metric,
        "sweep_timing": {**asdict(timing), "overhead": timing.overhead},
        "data": {"texts": info.texts, "rows": info.rows, "vocab_size": info.vocab_size,
                 "labels": info.labels},
        "winner": {"trial_id": winner["trial_id"], "arch": winner_spec.model.arch, "config": config,
                   "bundle": str(bundle_dir),
                   "best_step": winner["best_step"]},
        "evaluation": evaluation,
        "verdict": reference_verdict(evaluation, info.family),
        "endpoint": endpoint if spec.serve.keep_running else None,
        "sample_responses": samples,
        "trials": sweep.trials.drop(columns=["checkpoint_path"], errors="ignore")
                               .to_dict(orient="records"),
        "ray_version": ray.__version__,
    })
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plots = write_report_plots(run_dir, info.family, spec.metric, spec.metric_mode,
                               sweep.winner["trial_id"], sweep.trials, sweep.history, evaluation,
                               info.labels)
    (run_dir / "report.md").write_text(render_markdown(report) + plots_markdown(plots))
    return report
