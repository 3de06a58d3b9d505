"""The run report's plots: learning curves, sweep results and the winner's test behaviour.

Each function writes one PNG into `<run_dir>/plots/` and returns a `Plot` naming it; `plots_markdown`
embeds them in report.md with paths relative to the run directory, so the report renders wherever
the directory is copied. Figures are built on `Figure` + `FigureCanvasAgg`, never pyplot: no GUI
backend is selected and no global figure state is touched, which matters inside a Ray driver.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, StrMethodFormatter

from orchestrator.records import Evaluation
from orchestrator.spec import Task

PLOTS_DIR = "plots"
DPI = 100
WIDTH = 10.0  # inches: fits a report page at 100 dpi
MAX_NAMED_TRIALS = 8  # more trials than this: the rest are drawn grey, without legend entries
STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
    "ytick.labelsize": 10, "legend.fontsize": 9.5, "figure.titlesize": 13,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
}
WINNER_STAR = {"marker": "*", "s": 280, "color": "#f2b701", "edgecolor": "black", "linewidth": 0.8,
               "zorder": 5}
SETTING_LABELS = {
    "train.optimizer": "optimizer", "train.lr": "learning rate", "train.momentum": "SGD momentum",
    "train.weight_decay": "weight decay (coefficient)", "train.l1": "L1 penalty (coefficient)",
    "train.batch_size": "batch size (examples per worker)", "train.warmup_steps": "warmup (steps)",
    "model.dropout": "dropout (probability)",
}
SHORT_SETTINGS = {"weight_decay": "wd", "dropout": "drop", "batch_size": "bs",
                  "warmup_steps": "warmup", "momentum": "mom"}
STEP_LABEL = "step (optimizer updates)"


@dataclass(frozen=True)
class Plot:
    file: str      # name inside plots/
    title: str     # the image's alt text
    caption: str


def plots_markdown(plots: Sequence[Plot]) -> str:
    """The report section embedding the plots, or nothing when there are none."""
    if not plots:
        return ""
    lines = ["", "## Plots", ""]
    for plot in plots:
        lines += [f"![{plot.title}]({PLOTS_DIR}/{plot.file})", "", f"*{plot.caption}*", ""]
    return "\n".join(lines)


def write_report_plots(run_dir: str | Path, task: Task, metric: str, mode: str, winner_id: str,
                       trials: pd.DataFrame, history: pd.DataFrame, evaluation: Evaluation,
                       class_names: Sequence[str] = (),
                       compression: dict[str, Any] | None = None) -> list[Plot]:
    """Every plot the data allows, in report order; a plot without data is left out."""
    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_learning_curves(out, trials, history, task, metric, mode, winner_id),
             plot_sweep_results(out, trials, task, metric, mode, winner_id)]
    test, val = evaluation.splits.get("test"), evaluation.splits.get("val")
    if task == Task.CLASSIFIER and test is not None and test.confusion_matrix is not None:
        plots.append(plot_confusion_matrix(out, test.confusion_matrix, class_names, winner_id))
    elif task == Task.LANGUAGE_MODEL:
        baseline = val.baseline.get("perplexity") if val is not None else None
        plots.append(plot_winner_perplexity(out, history, winner_id, baseline))
    if compression:
        plots.append(plot_compression(out, compression, task))
    return [plot for plot in plots if plot is not None]


def plot_learning_curves(out_dir: Path, trials: pd.DataFrame, history: pd.DataFrame, task: Task,
                         metric: str, mode: str, winner_id: str) -> Plot | None:
    """Training loss and the sweep metric against step, one line per trial, the winner thick."""
    reported = set(history["trial_id"]) if "trial_id" in history else set()
    ranked = [t for t in _ranked_ids(trials, metric, mode, winner_id) if t in reported]
    if not ranked:
        return None
    labels = trial_labels(trials)
    named = ranked[:MAX_NAMED_TRIALS]
    colors = dict(zip(named, matplotlib.colormaps["tab10"].colors, strict=False))
    legend_rows = math.ceil((len(named) + (len(ranked) > len(named))) / 2)
    file = "learning_curves.png"
    with _figure(out_dir / file, WIDTH, 4.0 + 0.28 * legend_rows) as fig:
        loss_ax, metric_ax = fig.subplots(1, 2, sharex=True)
        for trial_id in reversed(ranked):  # the winner last: drawn on top
            rows = history[history["trial_id"] == trial_id].sort_values("step")
            winner = trial_id == winner_id
            style = _curve_style(labels.get(trial_id, trial_id), colors.get(trial_id), winner)
            for ax, column in ((loss_ax, "train_loss"), (metric_ax, metric)):
                points = rows[["step", column]].dropna() if column in rows else rows.iloc[0:0]
                ax.plot(points["step"], points[column], **style)
            if winner and metric in rows and rows[metric].notna().any():
                best = rows.loc[_best_index(rows[metric], mode)]
                metric_ax.scatter([best["step"]], [best[metric]], **WINNER_STAR)
        loss_ax.set(title="Training loss", xlabel=STEP_LABEL, ylabel=_metric_label("train_loss", task))
        metric_ax.set(title=f"Validation: {metric} ({_direction(mode)})", xlabel=STEP_LABEL,
                      ylabel=_metric_label(metric, task))
        handles, texts = metric_ax.get_legend_handles_labels()
        handles, texts = handles[::-1], texts[::-1]  # drawn worst first; listed winner first
        if len(ranked) > len(named):
            handles.append(Line2D([], [], color="0.6", linewidth=1.0))
            texts.append(f"{len(ranked) - len(named)} other trials")
        fig.legend(handles, texts, loc="outside lower center", ncols=2, frameon=False)
        fig.suptitle(_curves_title(trials, reported))
    return Plot(file, "Learning curves",
                f"Training loss (left) and {metric} (right) at each evaluation, one line per trial "
                f"(legend: trial id and the settings that differ); the winner {winner_id} is the "
                "thick line, its best evaluation starred. Lines that end early are trials ASHA "
                "stopped.")


def _curve_style(label: str, color: Any, winner: bool) -> dict[str, Any]:
    """The winner thick and on top; trials beyond the named ones (no colour) thin grey, unlabelled."""
    if color is None:
        return {"color": "0.6", "linewidth": 1.0, "alpha": 0.6, "zorder": 1}
    return {"color": color, "linewidth": 3.0 if winner else 1.5, "alpha": 1.0 if winner else 0.8,
            "marker": "o", "markersize": 4, "zorder": 4 if winner else 2,
            "label": label + ("  (winner)" if winner else "")}


def plot_sweep_results(out_dir: Path, trials: pd.DataFrame, task: Task, metric: str, mode: str,
                       winner_id: str) -> Plot | None:
    """Each trial's best metric against each swept setting: which settings mattered."""
    settings = _setting_columns(trials)
    best_column = f"best_{metric}"
    scored = trials.dropna(subset=[best_column]) if best_column in trials else trials.iloc[0:0]
    if not settings or scored.empty:
        return None
    columns = min(len(settings), 3)
    grid_rows = math.ceil(len(settings) / columns)
    file = "sweep_results.png"
    width = max(8.0, min(WIDTH, 3.6 * columns + 1.5))  # one setting: no stretched panel
    with _figure(out_dir / file, width, 3.6 * grid_rows + 0.9) as fig:
        axes = fig.subplots(grid_rows, columns, sharey=True, squeeze=False).ravel()
        for ax, column in zip(axes, settings, strict=False):  # the grid may have spare axes
            _sweep_panel(ax, scored, column, best_column, winner_id)
        for ax in axes[len(settings):]:
            ax.set_visible(False)
        for ax in axes[::columns]:
            ax.set_ylabel(f"best {_metric_label(metric, task)}")
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2,
                   frameon=False)
        missing = len(trials) - len(scored)
        fig.suptitle(f"Sweep: best {metric} per trial against each setting ({_direction(mode)})"
                     + (f"\n{_plural(missing, 'trial')} without a result not shown" if missing else ""))
    return Plot(file, "Sweep results",
                f"Each trial's best {metric} against each swept setting, one panel per setting "
                f"(shared y axis); the star is the winner {winner_id}.")


def plot_confusion_matrix(out_dir: Path, matrix: Sequence[Sequence[int]] | np.ndarray,
                          class_names: Sequence[str], winner_id: str, split: str = "test") -> Plot:
    """Which classes the winner confuses: counts annotated, colour the share of the true class."""
    counts = np.asarray(matrix, dtype=np.int64)
    classes = len(counts)
    names = ([_shorten(str(n), 20) for n in class_names] if len(class_names) == classes
             else [str(i) for i in range(classes)])
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(4.0 + 0.45 * classes, 14.0)
    file = "confusion_matrix.png"
    with _figure(out_dir / file, side + 1.5, side) as fig:
        ax = fig.subplots()
        ax.grid(False)
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, shrink=0.85, label="share of the true class's examples")
        if classes <= 20:
            size = 11 if classes <= 8 else 8
            for (true, predicted), count in np.ndenumerate(counts):
                ax.text(predicted, true, str(count), ha="center", va="center", fontsize=size,
                        color="white" if share[true, predicted] > 0.6 else "black")
        rotate = max(len(n) for n in names) > 4
        ax.set_xticks(range(classes), names, rotation=40 if rotate else 0,
                      ha="right" if rotate else "center", rotation_mode="anchor")
        ax.set_yticks(range(classes), names)
        ax.set(xlabel="predicted class", ylabel="true class")
        total = int(counts.sum())
        accuracy = np.trace(counts) / total if total else float("nan")
        ax.set_title(f"Winner {winner_id} on the {split} split\n"
                     f"{total} examples, accuracy {accuracy:.1%}")
    return Plot(file, "Confusion matrix",
                f"The winner's predictions on the {split} split: rows are true classes, columns "
                "predicted ones; cells show counts, colour the share of the row.")


def plot_winner_perplexity(out_dir: Path, history: pd.DataFrame, winner_id: str,
                           baseline: float | None = None) -> Plot | None:
    """The winner's validation perplexity at each evaluation, against the unigram baseline."""
    if "val_perplexity" not in history or "trial_id" not in history:
        return None
    rows = (history[history["trial_id"] == winner_id].dropna(subset=["val_perplexity"])
            .sort_values("step"))
    if rows.empty:
        return None
    file = "winner_perplexity.png"
    with _figure(out_dir / file, WIDTH, 4.0) as fig:
        ax = fig.subplots()
        ax.plot(rows["step"], rows["val_perplexity"], marker="o", linewidth=2.2, color="C0",
                label=f"winner {winner_id}")
        best = rows.loc[rows["val_perplexity"].idxmin()]
        ax.scatter([best["step"]], [best["val_perplexity"]], **WINNER_STAR,
                   label=f"best: {best['val_perplexity']:.4g} at step {int(best['step'])}")
        values = rows["val_perplexity"].tolist()
        if baseline is not None and math.isfinite(baseline):
            ax.axhline(baseline, linestyle="--", color="0.4",
                       label=f"unigram baseline: {baseline:.4g}")
            values.append(baseline)
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
        ax.set(title=f"Winner {winner_id}: validation perplexity (lower is better)",
               xlabel=STEP_LABEL, ylabel="validation perplexity (per token)")
        ax.legend(loc="best")
    return Plot(file, "Winner's validation perplexity",
                "The winner's validation perplexity at each evaluation (log scale when it spans "
                "more than a decade), against the unigram baseline on the same split.")


def plot_compression(out_dir: Path, compression: dict[str, Any], task: Task) -> Plot:
    """Each variant's test quality against its speed on the serving device, the served one
    starred; the quality bound as a band."""
    variants = compression["variants"]
    key = "decode_tokens_per_s_batch1" if task == Task.LANGUAGE_MODEL else "texts_per_s"
    quality = "test perplexity (lower is better)" if task == Task.LANGUAGE_MODEL else \
        "test accuracy (higher is better)"
    file = "compression.png"
    with _figure(out_dir / file, WIDTH, 4.5) as fig:
        ax = fig.subplots()
        for index, variant in enumerate(variants):
            x, y = variant["speed"][key], variant["quality"]
            ax.scatter([x], [y], s=80, color=f"C{index}", zorder=3,
                       label=f"{variant['name']}: {variant['size_bytes'] / 1e6:.2f} MB")
            ax.annotate(variant["name"], (x, y), textcoords="offset points", xytext=(6, 6))
            if variant["name"] == compression["selected"]:
                ax.scatter([x], [y], **WINNER_STAR)
        ax.set(title=f"Compressed variants: served {compression['selected']}",
               xlabel=key.replace("_", " "), ylabel=quality)
        ax.legend(loc="best")
    return Plot(file, "Compressed variants",
                f"Test quality against speed on the serving device for the winner and each "
                f"compressed variant (legend: size of the weights); starred: the one served, "
                f"{compression['rule']}.")


def trial_labels(trials: pd.DataFrame) -> dict[str, str]:
    """'<trial id>  adam lr=0.0032' per trial: only the settings that differ between trials."""
    varied = [c for c in _setting_columns(trials) if trials[c].nunique(dropna=False) > 1]
    labels = {}
    for _, row in trials.iterrows():
        settings = " ".join(_setting_text(c, row[c]) for c in varied)
        labels[str(row["trial_id"])] = f"{row['trial_id']}  {settings}".strip()
    return labels


def _sweep_panel(ax: Axes, scored: pd.DataFrame, column: str, best_column: str,
                 winner_id: str) -> None:
    values = scored[column]
    single = values.nunique(dropna=False) == 1
    categorical = not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
    if categorical:
        categories = sorted(values.astype(str).unique())
        x = values.astype(str).map(categories.index).astype(float)
        x = x + _jitter(x)
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.6, len(categories) - 0.4)
    else:
        x = values.astype(float)
        _numeric_scale(ax, x)
        if single:  # no made-up tick values around the one that was used
            ax.set_xticks([x.iloc[0]], [f"{x.iloc[0]:g}"])
    winner = (scored["trial_id"] == winner_id).to_numpy()
    if not winner.all():
        ax.scatter(x[~winner], scored[best_column][~winner], s=55, color="C0", alpha=0.8,
                   edgecolor="white", linewidth=0.8, label="trial", zorder=3)
    ax.scatter(x[winner], scored[best_column][winner], **WINNER_STAR, label=f"winner {winner_id}")
    key = column.removeprefix("config/")
    ax.set_title(key + (" (one value)" if single else ""))
    ax.set_xlabel(SETTING_LABELS.get(key, key))
    ax.margins(x=0.08, y=0.1)  # room for the winner's star at the edges


def _numeric_scale(ax: Axes, x: pd.Series) -> None:
    """Log scale for positive settings spanning more than a decade (learning rates), symlog when a
    zero sits among them (weight decay 0 vs 1e-4..1e-1), else linear with few, short tick labels
    (learning rates 0.0021..0.0035 otherwise print as overlapping 0.00225-style labels)."""
    positive = x[x > 0]
    decades = not positive.empty and positive.max() / positive.min() > 10
    if decades and (x > 0).all():
        ax.set_xscale("log")
    elif decades and (x >= 0).all():
        linthresh = float(positive.min())
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(-0.5 * linthresh, 2.5 * float(positive.max()))  # zero inside, no negative ticks
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))


def _jitter(x: pd.Series) -> np.ndarray:
    """Spread trials that share a category across ±0.15 so that each stays visible."""
    order = x.groupby(x).cumcount().to_numpy()
    size = x.groupby(x).transform("size").to_numpy()
    return np.where(size > 1, -0.15 + 0.3 * order / np.maximum(size - 1, 1), 0.0)


def _setting_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("config/")]


def _setting_text(column: str, value: Any) -> str:
    key = column.removeprefix("config/").split(".")[-1]
    if isinstance(value, str):
        return _shorten(value, 10)
    shown = f"{value:.2g}" if isinstance(value, float) else str(value)
    return f"{SHORT_SETTINGS.get(key, key)}={shown}"


def _ranked_ids(trials: pd.DataFrame, metric: str, mode: str, winner_id: str) -> list[str]:
    """Trial ids best first (winner first, no result last)."""
    column = f"best_{metric}"
    ranked = (trials.sort_values(column, ascending=mode == "min", na_position="last")
              if column in trials else trials)
    ids = [str(t) for t in ranked["trial_id"]]
    return sorted(ids, key=lambda t: t != winner_id)


def _best_index(values: pd.Series, mode: str) -> Any:
    return values.idxmin() if mode == "min" else values.idxmax()


def _curves_title(trials: pd.DataFrame, reported: set[str]) -> str:
    missing = [str(t) for t in trials["trial_id"] if t not in reported]
    if not missing:
        return f"Learning curves of {_plural(len(trials), 'trial')}"
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (f"Learning curves of {len(trials) - len(missing)} of {len(trials)} trials "
            f"(no reports from {shown})")


def _metric_label(metric: str, task: Task) -> str:
    unit = "token" if task == Task.LANGUAGE_MODEL else "example"
    labels = {"train_loss": f"training loss (nats/{unit})", "val_loss": f"val loss (nats/{unit})",
              "val_accuracy": "val accuracy (fraction)", "val_f1": "val macro F1 (0-1)"}
    return labels.get(metric, metric)


def _direction(mode: str) -> str:
    return "lower is better" if mode == "min" else "higher is better"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _shorten(text: str, limit: int) -> str:
    """Cut in the middle: names often differ only at the end ('..._v1', '..._v2')."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


@contextmanager
def _figure(path: Path, width: float, height: float) -> Iterator[Figure]:
    """A figure in the report style, written to `path` as PNG when the block ends."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        fig.savefig(path, dpi=DPI)
