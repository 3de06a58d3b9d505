"""The benchmarks run end to end in their short mode and report well-formed figures.

No test asserts a speed: figures are printed by `orchestrator bench NAME` and recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO

from orchestrator.bench import render, run_benchmark


def test_decode_bench_cli_prints_json_with_a_ratio() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "decode", "--quick",
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["name"] == "decode" and math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert {row["batch"] for row in result["rows"]} == {1, 8}


def test_serve_bench_measures_every_server_at_every_concurrency(ray_local) -> None:
    from ray import serve

    serve.shutdown()  # a Serve left by an earlier module keeps its port and ignores the bench's
    result = run_benchmark("serve", quick=True)
    cells = {(row["server"], row["concurrency"]) for row in result.rows}
    assert cells == {(server, c) for server in ("serve batched", "serve unbatched",
                                                "plain uvicorn") for c in (1, 8, 32)}
    for row in result.rows:
        assert row["errors"] == 0, row
        assert row["requests_per_s"] > 0 and row["p50_ms"] <= row["p99_ms"]
    assert result.ratio > 0
    assert json.loads(render(result, as_json=True))["ratio"] == result.ratio
    assert "concurrency" in render(result, as_json=False)
