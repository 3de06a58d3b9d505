"""The run's report: report.json's JSON-safe form, report.md and the CLI's closing lines."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.cluster import trial_count
from orchestrator.plots import PLOTS_DIR, plots_markdown, write_report_plots
from orchestrator.spec import Task

if TYPE_CHECKING:
    from orchestrator.records import DataInfo, Evaluation
    from orchestrator.rundir import RunDir
    from orchestrator.spec import JobSpec
    from orchestrator.sweep.tuner import SweepResult


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# The figure the winner is judged on against the classical reference, and whether higher is
# better: a classifier's accuracy against TF-IDF + LR, a language model's bits per byte against xz.
VERDICT_METRIC = {Task.CLASSIFIER: ("accuracy", True), Task.LANGUAGE_MODEL: ("bits_per_byte", False)}


SCHEDULERS = {"random": "ASHA", "tpe": "ASHA", "bohb": "HyperBand for BOHB",
              "pbt": "population-based training"}


def sweep_section(spec: JobSpec, sweep: SweepResult) -> dict[str, Any]:
    """How the sweep searched and spent its time: the searcher and its schedule, what early
    stopping compared trials at, the trials run of those asked, and the budget against the wall
    and training time."""
    from orchestrator.sweep.search import comparison  # Ray Tune: only once a sweep has run

    timing, budget_s = sweep.timing, spec.sweep.time_budget_s or None
    return {"search": spec.sweep.search, "seed": spec.sweep.seed,
            "scheduler": SCHEDULERS[spec.sweep.search], "compared_at": comparison(spec).words,
            "trials_asked": trial_count(spec), "trials_run": len(sweep.trials),
            "time_budget_s": budget_s, "wall_s": timing.wall_s, "training_s": timing.training_s,
            "budget_used": timing.wall_s / budget_s if budget_s else None,
            "max_time_s_per_trial": spec.train.max_time_s or None}


def _sweep_line(sweep: dict[str, Any]) -> str:
    line = (f"- sweep: {sweep['search']} search, {sweep['scheduler']}, trials compared at "
            f"{sweep['compared_at']}; {sweep['trials_run']} of {sweep['trials_asked']} trials in "
            f"{sweep['wall_s']:.0f} s ({sweep['training_s']:.0f} s of training steps)")
    if sweep["time_budget_s"]:
        line += f"; budget {sweep['time_budget_s']:g} s, {sweep['budget_used']:.0%} used"
    return line


def reference_verdict(evaluation: Evaluation, task: Task,
                      split: str = "test") -> dict[str, Any] | None:
    """Whether the winner beats the classical reference on `split`, and by how much, in figures
    and in one plain sentence (report.json's `verdict`, the CLI's summary, report.md)."""
    result = evaluation.splits.get(split)
    if result is None or not result.reference:
        return None
    metric, higher_is_better = VERDICT_METRIC[task]
    winner, reference = result.model[metric], result.reference[metric]
    better_by = (winner - reference) if higher_is_better else (reference - winner)
    beats = better_by > 0
    shown = metric.replace("_", " ")
    text = (f"the winner {'beats' if beats else 'does NOT beat'} the reference "
            f"({result.reference['name']}) on {split} {shown}: {_format(winner)} against "
            f"{_format(reference)}, {'better' if beats else 'worse'} by {abs(better_by):.4g}")
    if not higher_is_better and reference > 0:
        text += f" ({winner / reference:.2f} x the reference's {shown})"
    return {"split": split, "metric": metric, "higher_is_better": higher_is_better,
            "winner": winner, "reference": reference, "reference_name": result.reference["name"],
            "beats_reference": beats, "better_by": better_by, "text": text}


def _metrics_table(evaluation: dict[str, Any]) -> list[str]:
    lines = ["| split | metric | winner | baseline | reference |", "|---|---|---|---|---|"]
    for split, result in evaluation.items():
        baseline, reference = result["baseline"], result.get("reference", {})
        for name, value in result["model"].items():
            if name in baseline or name in reference:
                cells = [f"{_format(other[name])} ({other['name']})" if name in other else ""
                         for other in (baseline, reference)]
                lines.append(f"| {split} | {name} | {_format(value)} | {cells[0]} | {cells[1]} |")
    return lines


def _compression_table(compression: dict[str, Any], task: Task) -> list[str]:
    quality = "test perplexity" if task == Task.LANGUAGE_MODEL else "test accuracy"
    speeds = list(compression["variants"][0]["speed"])
    lines = ["## Compressed variants", "",
             (f"Served: **{compression['selected']}** (`{compression['bundle']}`), "
              f"{compression['rule']}."), "",
             f"| variant | {quality} | against the winner | within bound | MB | "
             + " | ".join(s.replace("_", " ") for s in speeds) + " | p50 latency s |",
             "|---|---|---|---|---|" + "---|" * len(speeds) + "---|"]
    for v in compression["variants"]:
        lines.append(f"| {v['name']} | {_format(v['quality'])} | {v['quality_loss']:+.2%} | "
                     f"{'yes' if v['within_bound'] else 'no'} | {v['size_bytes'] / 1e6:.3g} | "
                     + " | ".join(_format(v["speed"].get(s)) for s in speeds)
                     + f" | {_format(v['p50_latency_s'])} |")
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    trials = report["trials"]
    verdict = report.get("verdict")
    columns = [c for c in trials[0] if c != "error"] if trials else []
    lines = [
        f"# Run report: {report['name']}", "",
        f"- run directory: `{report['run_dir']}`",
        f"- model task: {report['task']}; sweep metric: {report['metric']}",
        (f"- data: {report['data']['texts']} texts, {report['data']['rows']} rows, "
         f"vocabulary {report['data']['vocab_size']}"),
        (f"- winner: trial `{report['winner']['trial_id']}`"
         + (f" ({report['winner']['arch']})" if report["winner"].get("arch") else "")
         + f" with {report['winner']['config']}"),
        *_ensemble_line(report["winner"]),
        f"- bundle: `{report['winner']['bundle']}`",
        f"- endpoint: {report['endpoint'] or 'not kept running'}",
        *([_sweep_line(report["sweep"])] if report.get("sweep") else []),
        f"- stage seconds: {report['stage_seconds']}", "",
        "## Winner against the trivial baseline and the classical reference", "",
        f"**Verdict: {verdict['text']}.**" if verdict else "(no reference was computed)", "",
        *_metrics_table(report["evaluation"]), "",
        "## Trials", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
        *("| " + " | ".join(_format(t.get(c)) for c in columns) + " |" for t in trials), "",
    ]
    if report.get("compression"):
        lines += _compression_table(report["compression"], report["task"])
    if report["sample_responses"]:
        lines += ["## Sample requests to the service", ""]
        lines += [f"- `{json.dumps(s['request'])}` -> {s['status']} `{json.dumps(s['response'])}`"
                  for s in report["sample_responses"]]
    return "\n".join(lines) + "\n"


def _ensemble_line(winner: dict[str, Any]) -> list[str]:
    """With sweep.ensemble: the trials that answer together, each with its own metric."""
    members = winner.get("ensemble") or []
    if not members:
        return []
    shown = ", ".join(f"`{m['trial_id']}` ({_format(m['val_metric'])} alone)" for m in members)
    return [(f"- served as an ensemble of {len(members)} trials averaging their class "
            f"probabilities: {shown}")]


def summary(report: dict[str, Any]) -> str:
    """The lines the CLI prints at the end of a run."""
    arch = report["winner"].get("arch")
    lines = [f"winner: trial {report['winner']['trial_id']}" + (f" ({arch})" if arch else "")
             + f" {report['winner']['config']}"]
    if members := report["winner"].get("ensemble"):
        lines.append(f"served as an ensemble of {len(members)} trials: "
                     + ", ".join(m["trial_id"] for m in members))
    for split, result in report["evaluation"].items():
        baseline, reference = result["baseline"], result.get("reference", {})
        shown = ", ".join(
            f"{k} {_format(v)} (" + "; ".join(f"{who} {_format(other[k])}" for who, other in
                                              (("baseline", baseline), ("reference", reference))
                                              if k in other) + ")"
            for k, v in result["model"].items() if k in baseline or k in reference)
        names = [baseline["name"]] + ([reference["name"]] if reference else [])
        lines.append(f"{split}: {shown}  [baseline: {names[0]}"
                     + (f"; reference: {names[1]}]" if reference else "]"))
    if report.get("verdict"):
        lines.append(f"verdict: {report['verdict']['text']}")
    if report.get("compression"):
        compression = report["compression"]
        for v in compression["variants"]:
            lines.append(f"compressed {v['name']}: quality {_format(v['quality'])} "
                         f"({v['quality_loss']:+.1%}), {v['size_bytes'] / 1e6:.2f} MB, "
                         + ", ".join(f"{k} {_format(x)}" for k, x in v["speed"].items()))
        lines.append(f"served: {compression['selected']} ({compression['rule']})")
    for sample in report["sample_responses"]:
        lines.append(f"request {json.dumps(sample['request'])} -> {sample['status']} "
                     f"{json.dumps(sample['response'])[:300]}")
    lines.append(f"endpoint: {report['endpoint'] or '(stopped after the sample requests)'}")
    lines.append(f"run directory: {report['run_dir']} (report.md, report.json)")
    return "\n".join(lines)


def write_report(run_dir: RunDir, report: dict[str, Any], spec: JobSpec, sweep: SweepResult,
                 evaluation: Evaluation, info: DataInfo) -> None:
    """report.json, then the plots (drawn locally, then copied to the run directory) and
    report.md that embeds them."""
    run_dir.report_json.write_text(json.dumps(report, indent=2))
    with tempfile.TemporaryDirectory(prefix="orchestrator-plots-") as scratch:
        plots = write_report_plots(scratch, info.task, spec.metric, spec.metric_mode,
                                   sweep.winner.trial_id, sweep.trials, sweep.history,
                                   evaluation, info.labels, report.get("compression"))
        run_dir.plots.upload(Path(scratch) / PLOTS_DIR)
    run_dir.report_md.write_text(render_markdown(report) + plots_markdown(plots))
