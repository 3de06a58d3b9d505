"""Run the sweep with Ray Tune. A trial of one worker trains inside its Tune trial actor; a trial
of several is a driver that fits one TorchTrainer (Train V2). See train/session.py for why."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group_table

from orchestrator.cluster import ClusterPlan, plan_cluster, with_device
from orchestrator.records import DataInfo, SweepTiming
from orchestrator.rundir import TUNE_EXPERIMENT, RunDir
from orchestrator.spec import JobSpec
from orchestrator.storage import Location, resolve
from orchestrator.sweep import search
from orchestrator.sweep.budget import BUDGET_FILE, RecordSpend, SweepClock
from orchestrator.sweep.progress import TrialProgress
from orchestrator.sweep.space import TRIAL_KEY, apply_trial_config, sample_configs, trial_values
from orchestrator.train.config import worker_config
from orchestrator.train.hosts import needs_ray_train, train_in_trial
from orchestrator.train.trainer import build_trainer, checkpoint_retention

# The trial driver only waits on its TorchTrainer, so it reserves memory and no CPU. A share of
# 0.01 CPU (our first design) left 0.99 CPU beside integer-CPU workers, which no 1-CPU Ray Data
# task fits: the trial hung. Tune refuses an all-zero bundle, hence the memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}


@dataclass(frozen=True)
class Winner:
    """The trial with the best validation metric, and what the select stage needs of it."""

    trial_id: str
    config: dict[str, Any]        # the swept values, by dotted spec key
    metric: float                 # its best value of the sweep metric
    best_step: int
    val_metrics: dict[str, float]  # every val_* metric at that step
    checkpoint: str               # path or URI of that step's checkpoint


@dataclass
class SweepResult:
    trials: pd.DataFrame      # one row per trial: config/<key>, status, best_<metric>, ...
    history: pd.DataFrame     # every report of every trial (learning curves)
    winner: Winner
    timing: SweepTiming


def sweep_timing(history: pd.DataFrame, eval_interval: int, wall_s: float,
                 concurrent_trials: int) -> SweepTiming:
    """Training seconds from each report's step time × the steps of its interval (the last
    interval of a run may be short)."""
    if history.empty:
        return SweepTiming(wall_s, 0.0, 0.0, concurrent_trials)
    steps = history["step"] - (history["step"] - 1) // eval_interval * eval_interval
    return SweepTiming(wall_s, float((history["step_time_s"] * steps).sum()),
                       float(history["checkpoint_s"].sum()), concurrent_trials)


def run_trial(tune_config: dict[str, Any], spec: JobSpec, run_dir: str, info: DataInfo,
              configs: list[dict[str, Any]]) -> None:
    """One Tune trial (its sweep values: trial_values): training in this actor, or a Ray Train
    run whose reports reach Tune through TuneReportCallback."""
    values = trial_values(tune_config, configs)
    config = worker_config(apply_trial_config(spec, values), info, RunDir.at(run_dir))
    if not needs_ray_train(config.spec):
        train_in_trial(config)
        return
    trial_id = tune.get_context().get_trial_id()
    build_trainer(config, name=f"trial-{trial_id}", callbacks=[TuneReportCallback()]).fit()


def trial_actor_resources(spec: JobSpec) -> dict[str, float]:
    """A trial that trains in its actor holds its worker's resources there; a Ray Train driver
    holds none (Train's placement group does)."""
    if needs_ray_train(spec):
        return DRIVER_RESOURCES
    needs = {"cpu": spec.resources.cpus_per_worker}
    if spec.resources.use_gpu:
        needs["gpu"] = spec.resources.gpus_per_worker
    return needs


def _best_kept(ranked: pd.DataFrame) -> pd.Series:
    """The best report whose checkpoint is still in storage (train.checkpoint_keep 'latest'
    deletes older ones, the best among them too); the best report when none is."""
    for _, row in ranked.iterrows():
        if isinstance(row.get("checkpoint_path"), str) and resolve(row["checkpoint_path"]).exists():
            return row
    return ranked.iloc[0]


def _with_checkpoint_uris(history: pd.DataFrame, trial: Location) -> pd.DataFrame:
    """Each report's checkpoint as a URI (or local path): Ray Train's path (TuneReportCallback
    adds it), or the one Tune persisted under the trial's folder."""
    if "checkpoint_path" in history:
        paths = [trial.of(p).uri if isinstance(p, str) else None
                 for p in history["checkpoint_path"]]
    elif "checkpoint_dir_name" in history:
        paths = [trial.join(name).uri if isinstance(name, str) else None
                 for name in history["checkpoint_dir_name"]]
    else:
        return history
    return history.assign(checkpoint_path=paths)


def _reports(result: tune.Result, trial: Location) -> pd.DataFrame | None:
    """Every report of a trial, from Tune's progress.csv: its result.json (what
    Result.metrics_dataframe reads) loses reports when PBT restarts the trial, whose last
    result (Result.metrics) then also names the trial it was copied from."""
    progress = trial.join("progress.csv")
    if progress.exists():
        return pd.read_csv(io.BytesIO(progress.read_bytes()), dtype={"trial_id": str})
    return result.metrics_dataframe


def group_sizes(workers: Iterable[int]) -> str:
    """A trial's worker counts in the order its intervals trained, repeats collapsed: `2`, or
    `1→2→1` for an elastic group that grew and shrank (the report's trials table shows it)."""
    sizes: list[int] = []
    for count in map(int, workers):
        if not sizes or sizes[-1] != count:
            sizes.append(count)
    return "→".join(map(str, sizes))


def _tables(results: list[tune.Result], spec: JobSpec, run_dir: RunDir,
            configs: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    metric, ascending = spec.metric, spec.metric_mode == "min"
    rows, histories = [], []
    for result in results:
        trial = run_dir.root.of(result.path)
        history = _reports(result, trial)
        trial_id = (history["trial_id"].iloc[0] if history is not None and "trial_id" in history
                    else result.metrics.get("trial_id") if result.metrics else None)
        if history is not None:
            history = _with_checkpoint_uris(history, trial)
        row: dict[str, Any] = {"trial_id": trial_id,
                               "status": "error" if result.error else "done",
                               "error": str(result.error) if result.error else None}
        row.update({f"config/{k}": v for k, v in trial_values(result.config, configs).items()})
        if history is not None and metric in history:
            history = history.dropna(subset=[metric])
            best = _best_kept(history.sort_values(metric, ascending=ascending))
            row.update({"evaluations": len(history), "last_step": int(history["step"].max()),
                        f"best_{metric}": best[metric], "best_step": int(best["step"]),
                        "checkpoint_path": best.get("checkpoint_path")})
            for column in [c for c in best.index if c.startswith("val_")]:
                row[f"best/{column}"] = best[column]
            if "workers" in history and (history["workers"] != 1).any():
                row["workers"] = group_sizes(history.sort_values("step")["workers"])
            history = history.assign(trial_id=trial_id)
            histories.append(history[[c for c in history.columns if not c.startswith("config/")]])
        rows.append(row)
    trials = pd.DataFrame(rows)
    return trials, (pd.concat(histories, ignore_index=True) if histories else pd.DataFrame())


def _wait_for_trial_resources(timeout_s: float = 60.0) -> None:
    """Trials' placement groups are removed asynchronously after Tune returns; the next stages'
    Ray Data actors need those CPUs back, so wait (bounded) until no placement group holds any."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = placement_group_table().values()
        if not any(pg["state"] in ("CREATED", "PENDING", "RESCHEDULING") for pg in table):
            return
        time.sleep(0.5)


def run_sweep(spec: JobSpec, run_dir: RunDir | str, info: DataInfo,
              progress: Callable[[str], None] = lambda _: None, restore: bool = False,
              plan: ClusterPlan | None = None) -> SweepResult:
    """Run every trial, write sweep/trials.parquet and sweep/history.parquet, pick the winner.
    `plan` is what the cluster gives the job (the pipeline decides it once, before the data
    stage); without one it is decided here.

    With `restore`, a sweep whose driver died continues: finished trials are kept, unfinished
    ones resume from their latest checkpoints (Tune's for one-worker trials; Train V2 picks up a
    several-worker trial's latest one from its run's storage), and trials that Tune's restored
    state does not know run in an experiment of their own (_missing_trials says why)."""
    plan = plan or plan_cluster(spec)
    spec = with_device(spec, plan)  # trials on other nodes must not decide again
    run_dir = RunDir.at(run_dir)
    configs = sample_configs(spec)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, run_dir=run_dir.uri, info=info,
                             configs=configs),
        trial_actor_resources(spec),
    )
    clock = SweepClock.start(run_dir.sweep.join(BUDGET_FILE), spec.sweep.time_budget_s, restore)
    callbacks = [TrialProgress(progress, spec.name, spec.metric, spec.metric_mode,
                               spec.train.max_steps, len(configs)), RecordSpend(clock)]
    results: list[tune.Result] = []
    number = 1
    while restore and (experiment := _experiment(run_dir, number)).exists():
        if tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.fs):
            results += _restored_results(experiment, trainable, callbacks, clock.left_s())
        number += 1
    missing = _missing_trials(results, configs, numbered=spec.sweep.search == "random")
    budget_s = clock.left_s()
    if missing and budget_s != 0:
        if results:
            progress(f"{len(missing)} trials of the sweep were not in Tune's saved state; "
                     f"running them now")
        tuner = _new_tuner(spec, run_dir, number, trainable, missing, plan.concurrent_trials,
                           callbacks, configs, budget_s)
        results += tuner.fit()
    clock.record()
    wall_s = clock.spent_s()
    _wait_for_trial_resources()
    trials, history = _tables(results, spec, run_dir, configs)
    trials.to_parquet(run_dir.trials.path, filesystem=run_dir.trials.fs)
    history.to_parquet(run_dir.history.path, filesystem=run_dir.history.fs)
    timing = sweep_timing(history, spec.train.eval_interval, wall_s, plan.concurrent_trials)
    return SweepResult(trials=trials, history=history, winner=pick_winner(trials, spec),
                       timing=timing)


def _experiment(run_dir: RunDir, number: int) -> Location:
    """The sweep's Tune experiments: sweep/tune, then sweep/tune-2... for trials a resume adds."""
    return run_dir.tune_experiment if number == 1 else run_dir.sweep.join(
        f"{TUNE_EXPERIMENT}-{number}")


def _missing_trials(results: list[tune.Result], configs: list[dict[str, Any]],
                    numbered: bool) -> list[int]:
    """The sampled trials no experiment has run. Tune saves its searcher's state and its trial
    list as separate files and copies them to storage in the background, so a driver killed
    mid-copy can leave a searcher that has already handed out trials the trial list lacks: the
    restored sweep then never runs them (it ended with one trial of two). Counted when trials
    are not `numbered` by their config (a searcher's own proposals; PBT copies the source
    trial's config, number included, into the trial it exploits)."""
    ran = [(result.config or {}).get(TRIAL_KEY) if numbered else None for result in results]
    left = [index for index in range(len(configs)) if index not in ran]
    return left[ran.count(None):]  # a sweep begun before trials were numbered: by count


def _restored_results(experiment: Location, trainable: Any, callbacks: list[tune.Callback],
                      budget_s: float | None) -> list[tune.Result]:
    """The trials of a saved experiment, its unfinished ones run on for `budget_s` seconds (the
    sweep's budget left; None: no budget). With none left they stay as they are, each with its
    best checkpoint so far, as when a budget ends a sweep."""
    if budget_s == 0:
        analysis = tune.ExperimentAnalysis(experiment.path, storage_filesystem=experiment.fs)
        return list(tune.ResultGrid(analysis))
    tuner = tune.Tuner.restore(experiment.path, trainable, resume_unfinished=True,
                               resume_errored=True, storage_filesystem=experiment.fs)
    # The run and tune configs are restored from the dead driver's pickle, with its progress
    # callback and its whole time budget: this driver's progress lines go where this driver
    # prints, and the sweep gets what is left of its budget. Tuner has no public setter.
    tuner._local_tuner.get_run_config().callbacks = callbacks
    tuner._local_tuner._tune_config.time_budget_s = budget_s
    return list(tuner.fit())


def pick_winner(trials: pd.DataFrame, spec: JobSpec) -> Winner:
    """The trial with the best value of the sweep metric; an error naming every trial's error
    when none reported it."""
    best_column = f"best_{spec.metric}"
    finished = trials.dropna(subset=[best_column]) if best_column in trials else trials.iloc[0:0]
    if finished.empty:
        errors = "; ".join(str(e) for e in trials.get("error", pd.Series()).dropna().unique())
        raise RuntimeError(f"no sweep trial reported {spec.metric}: {errors or 'no trial ran'}")
    return winner_of_row(
        finished.sort_values(best_column, ascending=spec.metric_mode == "min",
                             kind="stable").iloc[0], spec)


def winner_of_row(row: pd.Series, spec: JobSpec) -> Winner:
    """A trial of the trials table, as the select stage needs it."""
    best_column = f"best_{spec.metric}"
    return Winner(
        trial_id=str(row["trial_id"]),
        config={k.removeprefix("config/"): _plain(v) for k, v in row.items()
                if k.startswith("config/")},
        metric=float(row[best_column]), best_step=int(row["best_step"]),
        val_metrics={k.removeprefix("best/"): float(v) for k, v in row.items()
                     if k.startswith("best/")},
        checkpoint=str(row["checkpoint_path"]))


def _plain(value: Any) -> Any:
    """A Python number or string for a numpy scalar from the trials table."""
    return value.item() if hasattr(value, "item") else value


def _new_tuner(spec: JobSpec, run_dir: RunDir, number: int, trainable: Any, trials: list[int],
               concurrency: int, callbacks: list[tune.Callback], configs: list[dict[str, Any]],
               budget_s: float | None) -> tune.Tuner:
    """Tune experiment `number` (_experiment) of the sampled trials numbered `trials` (as many
    new ones, for a searcher that proposes its own), ended at `budget_s` seconds if given."""
    in_trial = not needs_ray_train(spec)
    proposes = search.searcher(spec, spec.sweep.seed + number - 1)  # a later one draws anew
    return tune.Tuner(
        trainable,
        param_space=search.param_space(spec, configs, trials),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.metric_mode,
            num_samples=len(trials) if proposes else 1,
            search_alg=proposes, max_concurrent_trials=min(concurrency, len(trials)),
            scheduler=search.scheduler(spec), time_budget_s=budget_s,
            # A finished trial's actor (torch imported, threads warm) starts the next trial.
            reuse_actors=in_trial,
        ),
        run_config=tune.RunConfig(
            name=_experiment(run_dir, number).name, storage_path=run_dir.sweep.path,
            storage_filesystem=run_dir.sweep.fs, verbose=0,
            # Trials that train in their actor keep checkpoints and recover from its death
            # through Tune, as Ray Train runs do through Train.
            checkpoint_config=tune.CheckpointConfig(**checkpoint_retention(spec))
            if in_trial else None,
            failure_config=tune.FailureConfig(max_failures=spec.train.max_failures)
            if in_trial else None,
            callbacks=callbacks),
    )
