"""The run's report: report.json's JSON-safe form, report.md and the CLI's closing lines."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.plots import PLOTS_DIR, plots_markdown, write_report_plots

if TYPE_CHECKING:
    from orchestrator.data import DataInfo
    from orchestrator.rundir import RunDir
    from orchestrator.spec import JobSpec
    from orchestrator.sweep.tuner import SweepResult


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN becomes None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _metrics_table(evaluation: dict[str, Any]) -> list[str]:
    lines = ["| split | metric | winner | baseline |", "|---|---|---|---|"]
    for split, result in evaluation.items():
        baseline = result["baseline"]
        for name, value in result["model"].items():
            if name in baseline:
                lines.append(f"| {split} | {name} | {_format(value)} | "
                             f"{_format(baseline[name])} ({baseline['name']}) |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    trials = report["trials"]
    columns = [c for c in trials[0] if c != "error"] if trials else []
    lines = [
        f"# Run report: {report['name']}", "",
        f"- run directory: `{report['run_dir']}`",
        f"- model family: {report['family']}; sweep metric: {report['metric']}",
        (f"- data: {report['data']['texts']} texts, {report['data']['rows']} rows, "
         f"vocabulary {report['data']['vocab_size']}"),
        f"- winner: trial `{report['winner']['trial_id']}` with {report['winner']['config']}",
        f"- bundle: `{report['winner']['bundle']}`",
        f"- endpoint: {report['endpoint'] or 'not kept running'}",
        f"- stage seconds: {report['stage_seconds']}", "",
        "## Winner against the trivial baseline", "", *_metrics_table(report["evaluation"]), "",
        "## Trials", "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
        *("| " + " | ".join(_format(t.get(c)) for c in columns) + " |" for t in trials), "",
    ]
    if report["sample_responses"]:
        lines += ["## Sample requests to the service", ""]
        lines += [f"- `{json.dumps(s['request'])}` -> {s['status']} `{json.dumps(s['response'])}`"
                  for s in report["sample_responses"]]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> str:
    """The lines the CLI prints at the end of a run."""
    lines = [f"winner: trial {report['winner']['trial_id']} {report['winner']['config']}"]
    for split, result in report["evaluation"].items():
        baseline = result["baseline"]
        shown = ", ".join(f"{k} {_format(v)} (baseline {_format(baseline[k])})"
                          for k, v in result["model"].items() if k in baseline)
        lines.append(f"{split}: {shown}  [{baseline['name']}]")
    for sample in report["sample_responses"]:
        lines.append(f"request {json.dumps(sample['request'])} -> {sample['status']} "
                     f"{json.dumps(sample['response'])[:300]}")
    lines.append(f"endpoint: {report['endpoint'] or '(stopped after the sample requests)'}")
    lines.append(f"run directory: {report['run_dir']} (report.md, report.json)")
    return "\n".join(lines)


def write_report(run_dir: RunDir, report: dict[str, Any], spec: JobSpec, sweep: SweepResult,
                 evaluation: dict[str, Any], info: DataInfo) -> None:
    """report.json, then the plots (drawn locally, then copied to the run directory) and
    report.md that embeds them."""
    run_dir.report_json.write_text(json.dumps(report, indent=2))
    with tempfile.TemporaryDirectory(prefix="orchestrator-plots-") as scratch:
        plots = write_report_plots(scratch, info.family, spec.metric, spec.metric_mode,
                                   sweep.winner.trial_id, sweep.trials, sweep.history,
                                   evaluation, info.labels)
        run_dir.plots.upload(Path(scratch) / PLOTS_DIR)
    run_dir.report_md.write_text(render_markdown(report) + plots_markdown(plots))
