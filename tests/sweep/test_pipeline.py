"""The pipeline on a real local Ray: what it refuses before any stage, and how it sizes a sweep.
(A whole tiny sweep runs end to end in tests/test_autoscaling.py, on an autoscaling cluster.)"""

from __future__ import annotations

import pytest
import yaml
from conftest import tiny_spec

from orchestrator.pipeline import run_pipeline
from orchestrator.spec import SpecError, parse_spec
from orchestrator.sweep.tuner import max_concurrent_trials


def test_more_workers_than_the_cluster_fails_fast(ray_local, tmp_path):
    spec = parse_spec(tiny_spec("gpt", resources={"num_workers": 3}))
    with pytest.raises(SpecError, match=r"needs 3 CPU .*num_workers = 3.*cluster has 2"):
        run_pipeline(spec.model_copy(update={"run_dir": str(tmp_path)}), say=lambda _: None)
    gpu = parse_spec(tiny_spec("gpt", resources={"use_gpu": True}))
    with pytest.raises(SpecError, match=r"needs 1 GPU .*cluster has 0"):
        run_pipeline(gpu.model_copy(update={"run_dir": str(tmp_path)}), say=lambda _: None)


def test_concurrency_is_sized_to_the_cluster(ray_local):
    spec = parse_spec(tiny_spec("gpt"))
    assert max_concurrent_trials(spec) == 2  # 2 CPUs, 1 per trial, cached data
    streaming = parse_spec(tiny_spec("gpt", data={"cache": False}))
    assert max_concurrent_trials(streaming) == 1  # one CPU stays free for Ray Data


def test_an_autoscaling_cluster_is_sized_by_what_it_can_grow_to(ray_local, tmp_path, monkeypatch):
    """On a `ray up` head (~/ray_bootstrap_config.yaml), a job that does not fit the nodes that
    are up but fits the node types' max_workers goes ahead, and use_gpu 'auto' picks the GPU."""
    from orchestrator.train.trainer import check_cluster_fits, wants_gpu

    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({
        "head_node_type": "head", "available_node_types": {
            "head": {"resources": {"CPU": 0}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 4}, "min_workers": 0, "max_workers": 3},
            "gpu_worker": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0,
                           "max_workers": 3}}}))
    spec = parse_spec(tiny_spec("gpt", resources={"num_workers": 3}))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wants_gpu(spec)
    check_cluster_fits(spec)  # 3 workers, 3 GPUs: the 2 CPUs that are up would refuse it
    assert max_concurrent_trials(spec) == 1
    cpu_only = parse_spec(tiny_spec("gpt", resources={"use_gpu": False}))
    assert max_concurrent_trials(cpu_only) == 24  # 3 x 4 + 3 x 4 CPUs, 1 per trial
