"""The job in MLflow (spec: tracking.mlflow), read from what the run directory records, so that
trials never talk to MLflow from inside Ray workers and a run directory can be tracked again.

- the job: a parent run named after the run directory (tag `orchestrator.run_dir`), the spec as
  parameters, the data and tokenizer digests as tags, the evaluation's metrics, and report.json,
  report.md, spec.yaml and plots/ as artifacts;
- each trial: a child run (tag `orchestrator.trial_id`) with its sweep values as parameters and
  every report of sweep/history.parquet as metrics by training step;
- the winner: a logged model (MLflow 3's home for a model: the bundle as its artifacts, its
  metrics) registered as a new version of the model named after the job, its metrics also as
  the version's tags (MLflow's REST API returns no metrics with a version).

Tracking never fails the job: the first failure prints one warning line and tracking stops for
the rest of the run. The trials are logged in a thread of their own while the next stages run;
mlflow is imported only when tracking is on, with its telemetry off unless
MLFLOW_DISABLE_TELEMETRY=false says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests

from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, SpecError, flat_fields

RUN_DIR_TAG, TRIAL_TAG = "orchestrator.run_dir", "orchestrator.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a child under its parent
# Columns of a report that are not figures of the training: Tune's bookkeeping (its
# AUTO_RESULT_KEYS), the step itself and where the trial resumed from.
NOT_FIGURES = frozenset({"step", "resumed_from_step", "training_iteration", "time_total_s",
                         "time_this_iter_s", "timestamp", "time_since_restore",
                         "iterations_since_restore", "timesteps_total", "timesteps_since_restore",
                         "episodes_total", "pid", "trial_id"})
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000  # MLflow's limits for one log_batch
PROBE_TIMEOUT_S = 10.0
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"  # MLflow's error code


def tracking_uri(spec: JobSpec, run_dir: RunDir) -> str:
    """tracking.mlflow.uri, or the sqlite database mlflow.db beside the run directories."""
    mlflow = spec.tracking.mlflow
    if mlflow is not None and mlflow.uri:
        return mlflow.uri
    if not run_dir.root.is_local:
        raise SpecError(f"tracking.mlflow.uri is unset and the run directory {run_dir.uri} is "
                        "object storage, where MLflow's default sqlite database cannot live; "
                        "set tracking.mlflow.uri to http(s)://HOST[:PORT] or sqlite:///PATH")
    return f"sqlite:///{Path(run_dir.root.path).parent / 'mlflow.db'}"


@dataclass
class Tracker:
    """Logs one run directory to MLflow in two steps: `log_sweep` once the sweep's tables are
    written, `log_result` once the report is; both are no-ops when tracking is off or has
    failed. Build it with `Tracker.for_job`, which refuses a spec that cannot be tracked."""

    spec: JobSpec
    run_dir: RunDir
    say: Callable[[str], None]
    uri: str = ""
    failed: bool = False
    _client: Any = None
    _experiment_id: str = ""
    _parent_id: str = ""
    _sweep_thread: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def for_job(cls, spec: JobSpec, run_dir: RunDir, say: Callable[[str], None]) -> Tracker:
        uri = tracking_uri(spec, run_dir) if spec.tracking.mlflow is not None else ""
        return cls(spec, run_dir, say, uri)

    @property
    def on(self) -> bool:
        return self.spec.tracking.mlflow is not None and not self.failed

    def log_sweep(self) -> None:
        """The parent run and a child run per trial not logged yet, in a thread of its own:
        the next stages need not wait (`log_result` does)."""
        if not self.on:
            return
        self._sweep_thread = threading.Thread(target=self._guarded, args=(self._log_sweep,),
                                              name="mlflow-tracking", daemon=True)
        self._sweep_thread.start()

    def log_result(self) -> None:
        """The report, the digests, the winner's bundle and its registered version; the parent
        run ends."""
        if self._sweep_thread is not None:
            self._sweep_thread.join()
        if self.on:
            self._guarded(self._log_result)

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as error:  # noqa: BLE001 - whatever MLflow or the network raise
            if not self.failed:
                self.failed = True
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                self.say(f"warning: tracking in MLflow at {self.uri} failed, the job goes on "
                         f"without it: {reason}")

    # Step 1: the parent run and the trials
    def _log_sweep(self) -> None:
        self._connect()
        parent = self._parent_run()
        trials = _read_table(self.run_dir.trials)
        history = _read_table(self.run_dir.history)
        logged = {run.data.tags.get(TRIAL_TAG) for run in self._search(
            f"tags.`{PARENT_TAG}` = '{parent}'")}
        for _, trial in trials.iterrows():
            if trial["trial_id"] not in logged:
                self._log_trial(trial, _reports_of(history, trial["trial_id"]))

    def _connect(self) -> None:
        """The client and the experiment (created when missing). A server that does not answer
        fails here at once, not after MLflow's minutes of retries."""
        if self._client is not None:
            return
        if self.uri.startswith(("http://", "https://")):
            try:
                requests.get(self.uri, timeout=PROBE_TIMEOUT_S)
            except requests.RequestException as error:
                raise ConnectionError(f"no MLflow server answers at {self.uri} "
                                      f"({type(error).__name__})") from None
        # MLflow's telemetry would send usage records from the job's driver to MLflow's own
        # servers, which the spec does not name: off unless MLFLOW_DISABLE_TELEMETRY says.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        name = self.spec.tracking.mlflow.experiment or self.spec.name
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                self._experiment_id = client.create_experiment(
                    name, artifact_location=self._artifact_location())
            except MlflowException as error:
                if error.error_code != ALREADY_EXISTS:
                    raise
                # another job created it meanwhile
                self._experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            self._experiment_id = experiment.experiment_id
        self._client = client

    def _artifact_location(self) -> str | None:
        """A local database's artifacts go in mlartifacts/ beside it (as `mlflow server` does);
        a server decides where its own go."""
        if not self.uri.startswith("sqlite:"):
            return None
        return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()

    def _search(self, filter_string: str) -> Iterator[Any]:
        token = None
        while True:
            page = self._client.search_runs([self._experiment_id], filter_string,
                                            max_results=1000, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _parent_run(self) -> str:
        """This run directory's parent run: the one an earlier driver made (resume), or new."""
        if self._parent_id:
            return self._parent_id
        found = next(self._search(f"tags.`{RUN_DIR_TAG}` = '{self.run_dir.uri}'"), None)
        if found is not None:
            self._parent_id = found.info.run_id
            return self._parent_id
        from mlflow.entities import Param

        run = self._client.create_run(
            self._experiment_id, run_name=self.run_dir.root.name,
            tags={RUN_DIR_TAG: self.run_dir.uri, "orchestrator.job": self.spec.name,
                  "orchestrator.task": self.spec.model.task.value})
        self._parent_id = run.info.run_id
        params = [Param(k, _text(v))  # every leaf as text (lists and empty dicts as JSON)
                  for k, v in flat_fields(self.spec.model_dump(mode="json")).items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self._client.log_batch(self._parent_id, params=params[start:start + PARAMS_PER_BATCH])
        return self._parent_id

    def _log_trial(self, trial: pd.Series, reports: pd.DataFrame) -> None:
        """One trial as a child run: its sweep values, every report by step, its best value."""
        from mlflow.entities import Metric, Param

        trial_id = str(trial["trial_id"])
        times = [int(t * 1000) for t in reports["timestamp"]] if "timestamp" in reports \
            else [int(time.time() * 1000)] * len(reports)
        run = self._client.create_run(
            self._experiment_id, run_name=f"trial {trial_id}", start_time=min(times, default=None),
            tags={PARENT_TAG: self._parent_id, TRIAL_TAG: trial_id,
                  "orchestrator.status": str(trial["status"])})
        params = [Param(k.removeprefix("config/"), _text(v)) for k, v in trial.items()
                  if k.startswith("config/")]
        figures = [c for c in reports.columns if c not in NOT_FIGURES
                   and pd.api.types.is_numeric_dtype(reports[c])
                   and not pd.api.types.is_bool_dtype(reports[c])]
        metrics = [Metric(name, float(report[name]), at, int(report["step"]))
                   for (_, report), at in zip(reports.iterrows(), times)
                   for name in figures if _finite(report[name])]
        best = f"best_{self.spec.metric}"
        if _finite(trial.get(best)):
            metrics.append(Metric(best, float(trial[best]), max(times, default=0),
                                  int(trial["best_step"])))
        self._client.log_batch(run.info.run_id, params=params[:PARAMS_PER_BATCH])
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self._client.log_batch(run.info.run_id,
                                   metrics=metrics[start:start + METRICS_PER_BATCH])
        if isinstance(trial.get("error"), str):
            self._client.set_tag(run.info.run_id, "orchestrator.error", trial["error"][:5000])
        self._client.set_terminated(run.info.run_id,
                                    "FAILED" if trial["status"] == "error" else "FINISHED",
                                    end_time=max(times, default=None))

    # Step 2: the result
    def _log_result(self) -> None:
        self._connect()
        parent = self._parent_run()
        client = self._client
        if client.get_run(parent).info.status == "FINISHED":
            return  # tracked to the end by an earlier driver
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, RunTag
        from mlflow.exceptions import MlflowException

        report = json.loads(self.run_dir.report_json.read_text())
        now = int(time.time() * 1000)
        model_metrics = _evaluation_metrics(report, "model")
        figures = {**model_metrics, **_evaluation_metrics(report, "reference"),
                   **_evaluation_metrics(report, "baseline"),
                   **{f"seconds_{stage}": s for stage, s in report["stage_seconds"].items()}}
        client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in figures.items()
                                          if _finite(v)],
                         tags=[RunTag(k, v) for k, v in self._digests(report).items()])
        with tempfile.TemporaryDirectory(prefix="orchestrator-mlflow-") as scratch:
            for source in (self.run_dir.report_json, self.run_dir.report_md,
                           self.run_dir.spec_file):
                if source.exists():
                    (Path(scratch) / source.name).write_bytes(source.read_bytes())
            client.log_artifacts(parent, scratch)
        if self.run_dir.plots.exists():
            with self.run_dir.plots.local_copy() as plots:
                client.log_artifacts(parent, str(plots), "plots")

        winner, name = report["winner"], self.spec.name
        model = client.create_logged_model(
            self._experiment_id, name=name, source_run_id=parent,
            params={k: _text(v) for k, v in winner["config"].items()},
            tags={TRIAL_TAG: str(winner["trial_id"]), RUN_DIR_TAG: self.run_dir.uri})
        with self.run_dir.winner.local_copy() as bundle:
            client.log_model_artifacts(model.model_id, str(bundle))
        client.log_batch(parent, metrics=[Metric(k, v, now, 0, model_id=model.model_id)
                                          for k, v in model_metrics.items() if _finite(v)])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(parent, [LoggedModelOutput(model.model_id, step=0)])  # the run's model
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != ALREADY_EXISTS:
                raise
        client.create_model_version(
            name, source=model.artifact_location, run_id=parent, model_id=model.model_id,
            tags={k: _text(v) for k, v in model_metrics.items()},
            description=f"the winner (trial {winner['trial_id']}) of {self.run_dir.uri}")
        client.set_terminated(parent, "FINISHED")

    def _digests(self, report: dict[str, Any]) -> dict[str, str]:
        """What identifies the data and the tokenizer: the evaluated splits' text digests (the
        report's), the source, and the tokenizer file's SHA-256."""
        tags = {f"data.{split}_digest": result["text"]["digest"]
                for split, result in report["evaluation"].items() if "text" in result}
        tags["data.path"] = self.spec.data.path
        tokenizer = self.run_dir.tokenizer.join("tokenizer.json")
        if tokenizer.exists():
            tags["tokenizer.sha256"] = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16]
        return tags


def _read_table(location) -> pd.DataFrame:
    return pd.read_parquet(location.path, filesystem=location.fs) if location.exists() \
        else pd.DataFrame()


def _reports_of(history: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    """A trial's reports in step order (none for a trial that never reported)."""
    if history.empty:
        return pd.DataFrame(columns=["step"])
    return history[history["trial_id"] == trial_id].sort_values("step")


def _evaluation_metrics(report: dict[str, Any], which: str) -> dict[str, float]:
    """The evaluation's numbers of the model, reference or baseline per split, as
    `<split>_<metric>` (the model's) or `<split>_<which>_<metric>`."""
    prefix = "" if which == "model" else f"{which}_"
    return {f"{split}_{prefix}{name}": value
            for split, result in report["evaluation"].items()
            for name, value in result.get(which, {}).items()
            if _finite(value)}


def _text(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return value if isinstance(value, str) else json.dumps(value)


def _finite(value: Any) -> bool:
    """A number MLflow can plot (numpy's too; not a bool, NaN or infinity)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)
