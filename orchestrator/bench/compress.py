"""The quickstart language model against its compressed variants: test perplexity, size, and
decode tokens/s at batch 1 and 8 on one CPU thread (a replica's share), as the compress stage
measures them.

One run of the quickstart with compress.variants int8, prune (50 %, 100 recovery steps) and
distill (half the blocks), serving off. The headline ratio is int8 over the fp32 winner's
decode tokens/s at batch 1 (the target is at least 1.5).
"""

from __future__ import annotations

import tempfile
from typing import Any

from orchestrator.bench import BenchResult
from orchestrator.bench.jobs import QUICK, run_quickstart

COMPRESS = ["compress.variants=[int8, prune, distill]", "compress.latency_requests=0",
            "serve.enabled=false"]
# --quick: the shrunk quickstart with one trial and int8 only. The suite checks `result_of` on the
# compress stage test's own report rather than paying for another whole job.
QUICK_COMPRESS = ["sweep.num_samples=1", "compress.variants=[int8]"]


def run(quick: bool) -> BenchResult:
    with tempfile.TemporaryDirectory() as runs:
        overrides = [f"runs_dir={runs}", *COMPRESS, *((QUICK + QUICK_COMPRESS) if quick else [])]
        wall, report = run_quickstart(overrides)
    return result_of(report, wall, "quick (shrunk quickstart)" if quick
                     else "the quickstart as shipped")


def result_of(report: dict[str, Any], wall: float, mode: str) -> BenchResult:
    """The bench's table and ratio from a compressed run's report (its `compression`)."""
    variants = report["compression"]["variants"]
    rows = [{"variant": "fp32 winner" if v["name"] == "winner" else v["name"],
             "test_perplexity": v["quality"], "against_fp32": v["quality_loss"],
             "MB": v["size_bytes"] / 1e6, "size_ratio": v["size_bytes"] / variants[0]["size_bytes"],
             "decode_tok_s_b1": v["speed"]["decode_tokens_per_s_batch1"],
             "decode_tok_s_b8": v["speed"]["decode_tokens_per_s_batch8"]} for v in variants]
    by_name = {v["name"]: v for v in variants}
    ratio = (by_name["int8"]["speed"]["decode_tokens_per_s_batch1"]
             / by_name["winner"]["speed"]["decode_tokens_per_s_batch1"])
    return BenchResult(
        "compress", rows, ratio=ratio,
        ratio_means="int8 over the fp32 winner's decode tokens/s at batch 1 (target >= 1.5)",
        notes={"served by the rule": f"{report['compression']['selected']} "
                                     f"({report['compression']['rule']})",
               "job wall time s": round(wall, 1),
               "stage seconds": ", ".join(f"{stage} {seconds:.1f}" for stage, seconds
                                          in report.get("stage_seconds", {}).items()),
               "mode": mode})
