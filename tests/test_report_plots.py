"""The report's plots, from trials/history tables shaped like the sweep stage's, without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from orchestrator.evaluate import confusion_matrix
from orchestrator.plots import (
    PLOTS_DIR,
    Plot,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_sweep_results,
    plot_winner_perplexity,
    plots_markdown,
    trial_labels,
    write_report_plots,
)
from orchestrator.records import Evaluation, SplitEvaluation
from orchestrator.spec import Task

CLASSES = ["asyncio", "collections", "functools", "itertools"]


def sweep_tables(family: str, configs: list[dict], evaluations: list[int],
                 seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """trials.parquet / history.parquet as sweep/tuner.py writes them; 0 evaluations: an errored
    trial with no reports."""
    rng = np.random.default_rng(seed)
    metric = "val_loss" if family == "gpt" else "val_accuracy"
    trials, history = [], []
    for index, (config, count) in enumerate(zip(configs, evaluations, strict=True)):
        trial_id = f"5d977_{index:05d}"
        row = {"trial_id": trial_id, "status": "done" if count else "error",
               "error": None if count else "RuntimeError('worker died')",
               **{f"config/{k}": v for k, v in config.items()}}
        steps = np.arange(1, count + 1) * 50
        train_loss = 7.0 - np.log1p(steps / 50) * rng.uniform(0.5, 1.0)
        reports = pd.DataFrame({"trial_id": trial_id, "step": steps, "train_loss": train_loss,
                                "val_loss": train_loss + 0.1, "tokens_per_s": 5e4})
        if family == "gpt":
            reports["val_perplexity"] = np.exp(reports["val_loss"])
        else:
            reports["val_accuracy"] = np.clip(steps / 400 * rng.uniform(0.5, 1.0), 0, 1)
            reports["val_f1"] = reports["val_accuracy"] - 0.05
        if count:
            best = reports.loc[reports[metric].idxmin() if family == "gpt"
                               else reports[metric].idxmax()]
            row.update({"evaluations": count, "last_step": int(steps[-1]),
                        f"best_{metric}": best[metric], "best_step": int(best["step"])})
            history.append(reports)
        trials.append(row)
    return pd.DataFrame(trials), pd.concat(history, ignore_index=True)


def lm_sweep() -> tuple[pd.DataFrame, pd.DataFrame]:
    configs = [{"train.optimizer": "adamw", "train.lr": 2.3e-3, "train.weight_decay": 0.0},
               {"train.optimizer": "adamw", "train.lr": 2.1e-4, "train.weight_decay": 0.01},
               {"train.optimizer": "adam", "train.lr": 3.2e-3, "train.weight_decay": 0.0},
               {"train.optimizer": "adamw", "train.lr": 3.5e-2, "train.weight_decay": 0.1}]
    return sweep_tables("gpt", configs, [4, 1, 4, 2])


def classifier_sweep() -> tuple[pd.DataFrame, pd.DataFrame]:
    configs = [{"train.lr": 3e-3, "model.dropout": 0.0, "train.batch_size": 16},
               {"train.lr": 1e-4, "model.dropout": 0.1, "train.batch_size": 32},
               {"train.lr": 1e-3, "model.dropout": 0.1, "train.batch_size": 32}]
    return sweep_tables("classifier", configs, [6, 2, 6])


def winner(trials: pd.DataFrame, metric: str, mode: str) -> str:
    return str(trials.sort_values(f"best_{metric}", ascending=mode == "min").iloc[0]["trial_id"])


def assert_png(path: Path, min_width: int = 500, min_height: int = 300) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert min_width <= width <= 2000 and min_height <= height <= 2000, image.size
        assert len(set(image.convert("L").getdata())) > 10  # not a blank canvas


def assert_report(run_dir: Path, plots: list[Plot], files: list[str]) -> None:
    assert [p.file for p in plots] == files
    markdown = plots_markdown(plots)
    for plot in plots:
        assert_png(run_dir / PLOTS_DIR / plot.file)
        assert f"]({PLOTS_DIR}/{plot.file})" in markdown and plot.caption in markdown


def test_lm_report_plots(tmp_path):
    trials, history = lm_sweep()
    best = winner(trials, "val_loss", "min")
    evaluation = Evaluation({"val": SplitEvaluation(
        model={"perplexity": 280.0}, baseline={"name": "unigram", "perplexity": 655.6},
        reference={}, text={}, rows=100)})
    plots = write_report_plots(tmp_path, Task.LANGUAGE_MODEL, "val_loss", "min", best, trials, history, evaluation)
    assert_report(tmp_path, plots,
                  ["learning_curves.png", "sweep_results.png", "winner_perplexity.png"])
    with Image.open(tmp_path / PLOTS_DIR / "learning_curves.png") as image:
        assert image.size[0] == 1000  # 10 in at 100 dpi


def test_classifier_report_plots(tmp_path):
    trials, history = classifier_sweep()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, len(CLASSES), 200)
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, len(CLASSES), 200))
    evaluation = Evaluation({"test": SplitEvaluation(
        model={}, baseline={}, reference={}, text={}, rows=200,
        confusion_matrix=confusion_matrix(predictions, labels, len(CLASSES)).tolist())})
    best = winner(trials, "val_accuracy", "max")
    plots = write_report_plots(tmp_path, Task.CLASSIFIER, "val_accuracy", "max", best, trials,
                               history, evaluation, CLASSES)
    assert_report(tmp_path, plots,
                  ["learning_curves.png", "sweep_results.png", "confusion_matrix.png"])


def test_one_trial_with_one_setting_value(tmp_path):
    trials, history = sweep_tables("classifier", [{"model.dropout": 0.1}], [1])
    trial_id = trials["trial_id"][0]
    plots = [plot_learning_curves(tmp_path, trials, history, Task.CLASSIFIER, "val_accuracy", "max",
                                  trial_id),
             plot_sweep_results(tmp_path, trials, Task.CLASSIFIER, "val_accuracy", "max", trial_id)]
    assert all(plot is not None for plot in plots)
    for plot in plots:
        assert_png(tmp_path / plot.file)
    assert trial_labels(trials) == {trial_id: trial_id}  # nothing differs between trials


def test_errored_trial_without_history_and_nan_metrics(tmp_path):
    configs = [{"train.optimizer": o, "train.lr": lr} for o, lr in
               [("adamw", 1e-3), ("sgd", 1e-1), ("adam", 3e-4)]]
    trials, history = sweep_tables("gpt", configs, [4, 0, 3])
    history.loc[history.index[[1, 5]], ["train_loss", "val_loss", "val_perplexity"]] = np.nan
    best = winner(trials, "val_loss", "min")
    plots = write_report_plots(tmp_path, Task.LANGUAGE_MODEL, "val_loss", "min", best, trials, history, Evaluation({}))
    assert_report(tmp_path, plots,
                  ["learning_curves.png", "sweep_results.png", "winner_perplexity.png"])


def test_plots_without_data_are_left_out(tmp_path):
    trials = pd.DataFrame({"trial_id": ["a_00000"], "status": ["error"], "error": ["boom"]})
    history = pd.DataFrame()
    assert plot_learning_curves(tmp_path, trials, history, Task.LANGUAGE_MODEL, "val_loss", "min", "a") is None
    assert plot_sweep_results(tmp_path, trials, Task.LANGUAGE_MODEL, "val_loss", "min", "a") is None
    assert plot_winner_perplexity(tmp_path, history, "a") is None
    assert write_report_plots(tmp_path, Task.LANGUAGE_MODEL, "val_loss", "min", "a", trials, history, Evaluation({})) == []
    assert plots_markdown([]) == ""


def test_trial_labels_name_only_the_settings_that_differ():
    trials, _ = lm_sweep()
    labels = trial_labels(trials)
    assert labels["5d977_00002"] == "5d977_00002  adam lr=0.0032 wd=0"
    single, _ = sweep_tables("gpt", [{"train.lr": 1e-3, "model.dropout": 0.1},
                                     {"train.lr": 1e-2, "model.dropout": 0.1}], [1, 1])
    assert trial_labels(single)["5d977_00001"] == "5d977_00001  lr=0.01"


def test_confusion_matrix_plot_with_many_long_class_names(tmp_path):
    names = [f"a rather long class name number {i}" for i in range(12)]
    counts = np.full((12, 12), 2) + np.diag(np.arange(12) * 5)
    plot = plot_confusion_matrix(tmp_path, counts, names, "5d977_00000")
    assert_png(tmp_path / plot.file)


def test_confusion_matrix_counts():
    labels = np.array([0, 0, 1, 1, 1, 2, -1])
    predictions = np.array([0, 1, 1, 1, 0, 0, 2])
    matrix = confusion_matrix(predictions, labels, num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert matrix.sum() == 6  # the row with an unseen label (-1) is left out
    assert np.trace(matrix) / matrix.sum() == pytest.approx(0.5)
    assert confusion_matrix(np.array([], int), np.array([], int), 2).tolist() == [[0, 0], [0, 0]]
