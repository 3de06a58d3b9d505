"""Data-parallel scaling: 1 against N workers on the same global batch and the same total CPUs
(or one GPU each): speedup T1/Tn, efficiency speedup/n, and the bytes all-reduced per step."""

from __future__ import annotations

import os

import torch

from orchestrator.bench import BenchResult
from orchestrator.bench.training import bench_spec, prepare, ray_train_reports, steady
from orchestrator.models import build_model


def gradient_bytes(spec, info) -> int:
    """Bytes of one full fp32 gradient: what DDP all-reduces once per optimizer step."""
    model = build_model(spec, info)
    return sum(p.numel() for p in model.parameters()) * torch.finfo(torch.float32).bits // 8


def run(quick: bool) -> BenchResult:
    cores = os.cpu_count() or 2
    counts = (1, 2) if quick or cores < 4 else (1, 2, 4)
    global_batch = 16 * max(counts)
    prepared = prepare(bench_spec(quick))
    rows, base = [], None
    for workers in counts:
        spec = bench_spec(quick, global_batch_size=global_batch)
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={
            "num_workers": workers, "cpus_per_worker": max(1, cores // workers)})})
        reports = ray_train_reports(spec, prepared, f"scaling-{workers}")
        tokens_per_s = steady(reports, "tokens_per_s")
        base = base or tokens_per_s
        grad = gradient_bytes(spec, prepared.info)
        rows.append({"workers": workers, "threads_each": int(spec.resources.cpus_per_worker),
                     "grad_accum": spec.grad_accum_steps(workers), "tokens_per_s": tokens_per_s,
                     "speedup": tokens_per_s / base, "efficiency": tokens_per_s / base / workers,
                     "allreduce_MB_per_step": grad / 1e6 if workers > 1 else 0.0,
                     "sent_MB_per_worker_step": 2 * (workers - 1) / workers * grad / 1e6,
                     "step_time_s": steady(reports, "step_time_s")})
    return BenchResult(
        name="scaling", rows=rows, ratio=rows[-1]["efficiency"],
        ratio_means=f"scaling efficiency at {counts[-1]} workers (speedup / workers)",
        notes={"setup": f"global batch {global_batch} rows for every worker count (gradient "
                        f"accumulation makes up the rest), DDP, the machine's {cores} cores "
                        f"divided among the workers",
               "communication": "DDP all-reduces one fp32 gradient per optimizer step (no_sync "
                                "on accumulation steps); a ring all-reduce sends 2(n-1)/n of it "
                                "per worker. FSDP sends about 1.5x that (all-gather in forward "
                                "and backward, reduce-scatter of gradients)."})
