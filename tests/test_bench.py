"""The benchmarks run end to end in their short mode and report well-formed figures.

No test asserts a speed: figures are printed by `orchestrator bench NAME` and recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from orchestrator.bench import render, run_benchmark


def test_decode_bench_cli_prints_json_with_a_ratio() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "decode", "--quick",
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["name"] == "decode" and math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert {row["batch"] for row in result["rows"]} == {1, 8}


@pytest.mark.bench
@pytest.mark.ray
def test_serve_bench_measures_every_server_at_every_concurrency_under_both_ingresses() -> None:
    result = run_benchmark("serve", quick=True)  # each ingress in a Ray of its own
    cells = {(row["server"], row["concurrency"]) for row in result.rows}
    servers = [f"{server} ({ingress})" for ingress in ("proxy", "haproxy") for server in (
        "serve batched", "serve batched, through the front", "serve unbatched")]
    assert cells == {(server, c) for server in [*servers, "plain uvicorn"] for c in (1, 8, 32)}
    for row in result.rows:
        assert row["errors"] == 0, row
        assert row["requests_per_s"] > 0 and row["p50_ms"] <= row["p99_ms"]
    assert result.ratio > 0
    assert json.loads(render(result, as_json=True))["ratio"] == result.ratio
    assert "concurrency" in render(result, as_json=False)


@pytest.mark.bench
def test_train_overhead_bench_compares_both_training_paths_with_a_plain_loop(ray_local) -> None:
    result = run_benchmark("train-overhead", quick=True)
    (row,) = result.rows
    assert row["plain_tok_s"] > 0 and row["in_trial_tok_s"] > 0 and row["ray_train_tok_s"] > 0
    assert result.ratio == pytest.approx(row["in_trial_tok_s"] / row["plain_tok_s"])
    for path in ("in_trial", "ray_train"):
        assert 0 < row[f"{path}_not_training_s"] < row[f"{path}_wall_s"]
    assert set(result.notes["spread (min / median / max)"]) == {"in_trial", "ray_train"}


@pytest.mark.bench
def test_ingest_bench_measures_every_source_with_and_without_work(ray_local) -> None:
    result = run_benchmark("ingest", quick=True)
    cells = {(row["consumer"], row["source"]) for row in result.rows}
    assert cells == {(consumer, source) for consumer in ("none", "forward+backward")
                     for source in ("ray data (ours, Ray Train)", "in memory (ours, 1-worker trials)",
                                    "torch DataLoader", "in-memory batches")}
    assert all(row["rows_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1 for row in result.rows)


@pytest.mark.bench
def test_scaling_bench_reports_speedup_and_communication(ray_local) -> None:
    result = run_benchmark("scaling", quick=True)
    one, two = result.rows
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["speedup"] == 1.0 and one["allreduce_MB_per_step"] == 0
    assert two["grad_accum"] * 2 == one["grad_accum"]  # the same global batch
    assert two["allreduce_MB_per_step"] > 0 and two["efficiency"] == pytest.approx(
        two["speedup"] / 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path runs the benchmark itself")
def test_mfu_bench_without_a_gpu_says_so() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "mfu", "--quick"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr


def test_metrics_bench_compares_the_loop_with_and_without_recording(ray_local) -> None:
    result = run_benchmark("metrics", quick=True)
    (row,) = result.rows
    assert row["without_tok_s"] > 0 and row["with_tok_s"] > 0
    assert result.ratio == pytest.approx(row["with_tok_s"] / row["without_tok_s"])
    assert result.notes["step_counter_us"] > 0 and result.notes["interval_report_us"] > 0
    assert result.notes["recording_share_of_step"].endswith("(target < 1%)")


@pytest.mark.bench
def test_data_bench_measures_each_size_in_a_driver_of_its_own(ray_local) -> None:
    result = run_benchmark("data", quick=True, sizes_mb=(0.1, 0.5))
    small, large = result.rows
    assert small["mb"] < large["mb"] and all(row["rows_written"] > 0 for row in result.rows)
    assert all(row["mb_per_s"] > 0 and row["encode_alone_mb_per_s"] > 0
               and row["driver_peak_uss_mb"] >= row["driver_start_uss_mb"] > 0
               for row in result.rows)
    phases = result.notes[f"phases at {large['mb']} MB"]
    assert sum(row["seconds"] for row in phases) == pytest.approx(large["stage_s"], rel=0.01)
    assert any("tokenizer" in row["phase"] for row in phases)
    assert result.ratio == large["stage_over_encode"] > 0


def test_storage_bench_starts_its_own_s3_server_with_a_bucket_and_stops_it(monkeypatch) -> None:
    """The bench's store when none is configured. Its two whole quickstart runs (about two
    minutes even shrunk) are left to `orchestrator bench storage`: the suite runs jobs in a
    bucket in tests/storage."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import EndpointConnectionError

    from orchestrator.bench.storage import object_store

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with object_store() as (env, bucket):
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2))
        client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
        assert client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"
    with pytest.raises(EndpointConnectionError):
        client.list_buckets()  # the server is gone with the block


def test_finetune_bench_counts_what_lora_trains_and_keeps() -> None:
    result = run_benchmark("finetune", quick=True)
    full, lora, small = result.rows
    assert (full["finetune"], lora["finetune"]) == ("full", "lora")
    assert full["trained_share"] == 1 and 0 < lora["trained_share"] < 0.05
    assert 0 < small["trained_share"] < lora["trained_share"]  # the wider the model, the less
    assert result.ratio == full["checkpoint_bytes"] / lora["checkpoint_bytes"] > 1
    assert "finetune" in render(result, as_json=False)


def test_int8_bench_times_both_precisions_and_bounds_the_speedup_by_the_linear_share() -> None:
    result = run_benchmark("int8", quick=True)
    assert [(row["model"], row["batch"]) for row in result.rows] == [
        ("quickstart", 1), ("quickstart", 8), ("d_model 256", 1), ("d_model 256", 8)]
    for row in result.rows:
        assert row["fp32_tok_s"] > 0 and row["int8_tok_s"] > 0
        assert 0 < row["linear_share"] < 1 and row["bound"] == pytest.approx(1 / (1 - row["linear_share"]))
    assert result.ratio == result.rows[2]["int8_speedup"]


def test_linear_seconds_counts_only_the_linear_layers_and_unhooks_them() -> None:
    from orchestrator.bench.int8 import linear_seconds

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    x = torch.randn(4, 64)
    with linear_seconds(model) as inside:
        model(x)
        once = inside[0]
        model(x)
    assert 0 < once < inside[0]  # both layers, both calls
    model(x)  # after the block: no hook left to count it
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.bench
@pytest.mark.ray
def test_models_bench_measures_both_models_alone_beside_and_through_a_rolling_update() -> None:
    result = run_benchmark("models", quick=True)
    cells = [(row["model"], row["beside"]) for row in result.rows]
    assert cells == [("writer", "nothing"), ("writer", "other, idle"), ("other", "writer, idle"),
                     ("writer", "writer rolled to new weights"),
                     ("other", "writer rolled to new weights"), ("other", "nothing")]
    assert all(row["requests_per_s"] > 0 for row in result.rows)
    assert set(result.notes["failed requests during writer's rolling update, by model"]) == \
        {"writer", "other"}
    assert 0 < result.ratio
