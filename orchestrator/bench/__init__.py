"""Benchmarks behind `orchestrator bench NAME`: each prints a table, or with --json one JSON
object as the last line, with the headline comparison under `ratio` (ours over the baseline).

A benchmark is a module in this package with `run(quick: bool) -> BenchResult`; `--quick` is the
short mode CI runs to prove it works. No test asserts a speed.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

BENCHMARKS = {
    "decode": "tokens/s of KV-cache decoding against cache-less decoding",
    "serve": "requests/s and latency of the service: batched, unbatched, plain uvicorn; "
             "open-loop TTFT and inter-token latency",
    "quotas": "what serve.quotas costs a request: p50 and requests/s with and without quotas",
    "models": "two models side by side: each one's requests/s alone and beside the other idle; "
              "failed requests on both while one is rolled to new weights",
    "train-overhead": "tokens/s and start-up of our training paths (1 worker) against a plain loop",
    "ingest": "rows/s of our Ray Data stream against a DataLoader and in-memory batches",
    "scaling": "1 against N training workers on one global batch: speedup, efficiency, bytes",
    "metrics": "what recording Prometheus metrics costs a training step (with and without)",
    "data": "MB/s of raw text through the data stage by corpus size (--mb) against encoding "
            "alone, and the driver's peak memory",
    "storage": "the quickstart with run_dir in an S3-compatible store against local disk",
    "mfu": "GPU only: GPT-2 small (124M) in bf16 with compile: tokens/s and MFU",
    "compress": "the quickstart LM against its int8, pruned and distilled variants: test "
                "perplexity, size, decode tokens/s at batch 1 and 8",
    "int8": "where int8 pays: fp32 against int8 decode tokens/s by model width, and the bound "
            "the Linear layers' share of a step puts on any int8 speed-up",
    "finetune": "LoRA against full fine-tuning: share of parameters trained, checkpoint bytes; "
                "export round trip",
    "adapters": "8 LoRA adapters of one base on 1 replica, requests spread evenly at "
                "concurrency 32: requests/s against the base alone; memory per added adapter",
}


class BenchmarkUnavailable(RuntimeError):
    """This machine cannot run the benchmark (for instance, it has no GPU)."""


@dataclass
class BenchResult:
    name: str
    rows: list[dict[str, Any]]
    ratio: float | None = None
    ratio_means: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


def run_benchmark(name: str, quick: bool, **options: Any) -> BenchResult:
    """`options`: a benchmark's own, passed to its `run` (data: sizes_mb)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"orchestrator.bench.{name.replace('-', '_')}")
    return module.run(quick=quick, **options)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as an aligned text table; floats with 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(value.rjust(width) for value, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render(result: BenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(result))
    text = f"{result.name}\n{format_table(result.rows)}"
    if result.ratio is not None:
        text += f"\nratio = {result.ratio:.3g}  ({result.ratio_means})"
    for key, value in result.notes.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = "\n" + format_table(value)  # a table of its own (e.g. the open loop)
        text += f"\n{key}: {value}"
    return text
