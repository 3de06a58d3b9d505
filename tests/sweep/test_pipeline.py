"""What a job gets from the cluster (cluster.plan_for) and what the pipeline refuses before any
stage. (A whole tiny sweep runs end to end in tests/test_autoscaling.py, on an autoscaling
cluster, and in tests/storage/.)"""

from __future__ import annotations

import pytest
import yaml
from conftest import tiny_spec

from orchestrator.cluster import cluster_capacity, plan_for
from orchestrator.pipeline import run_pipeline
from orchestrator.spec import SpecError, parse_spec

TWO_CPUS = {"CPU": 2.0}


def test_more_workers_than_the_cluster_fails_fast(ray_local, tmp_path):
    spec = parse_spec(tiny_spec("gpt", resources={"num_workers": 3}))
    with pytest.raises(SpecError, match=r"needs 3 CPU .*num_workers = 3.*cluster has 2"):
        run_pipeline(spec.model_copy(update={"runs_dir": str(tmp_path)}), say=lambda _: None)
    gpu = parse_spec(tiny_spec("gpt", resources={"use_gpu": True}))
    with pytest.raises(SpecError, match=r"needs 1 GPU .*cluster has 0"):
        run_pipeline(gpu.model_copy(update={"runs_dir": str(tmp_path)}), say=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # refused before a run directory was made


def test_concurrency_is_sized_to_the_cluster():
    assert plan_for(parse_spec(tiny_spec("gpt", sweep={"num_samples": 4})),
                    TWO_CPUS).concurrent_trials == 2  # 2 CPUs, 1 per trial, cached data
    streaming = parse_spec(tiny_spec("gpt", data={"cache": False}, sweep={"num_samples": 4}))
    plan = plan_for(streaming, TWO_CPUS)
    assert plan.concurrent_trials == 1 and plan.data_cpus == 1  # one CPU stays free for Ray Data
    # Never more at once than the sweep has trials.
    assert plan_for(parse_spec(tiny_spec("gpt")), {"CPU": 16.0}).concurrent_trials == 1


def test_what_deployed_services_hold_is_not_there_for_a_job():
    """On a cluster that cannot grow, a job that does not fit beside the deployed services is
    refused up front naming them (it waited forever for a CPU they held), and the sweep runs
    fewer trials at once beside them."""
    spec = parse_spec(tiny_spec("gpt", sweep={"num_samples": 4}))
    held = {"quickstart-service": {"CPU": 1.5}}
    with pytest.raises(SpecError) as refused:
        plan_for(spec, TWO_CPUS, held)
    assert "needs 1 CPU" in str(refused.value)
    assert "0.5 of them free" in str(refused.value)
    assert "quickstart-service holds 1.5" in str(refused.value)
    assert "orchestrator undeploy" in str(refused.value)
    assert plan_for(spec, {"CPU": 4.0}, held).concurrent_trials == 2  # 2.5 free: 2 at once
    assert plan_for(spec, {"CPU": 4.0}).concurrent_trials == 4


def test_an_autoscaling_cluster_is_sized_by_what_it_can_grow_to(ray_local, tmp_path, monkeypatch):
    """On a `ray up` head (~/ray_bootstrap_config.yaml), a job that does not fit the nodes that
    are up but fits the node types' max_workers goes ahead, and use_gpu 'auto' picks the GPU."""
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({
        "head_node_type": "head", "available_node_types": {
            "head": {"resources": {"CPU": 0}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 4}, "min_workers": 0, "max_workers": 3},
            "gpu_worker": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0,
                           "max_workers": 3}}}))
    monkeypatch.setenv("HOME", str(tmp_path))
    capacity = cluster_capacity()
    spec = parse_spec(tiny_spec("gpt", resources={"num_workers": 3}, sweep={"num_samples": 30}))
    plan = plan_for(spec, capacity)  # 3 workers, 3 GPUs: the 2 CPUs that are up would refuse it
    assert plan.use_gpu and plan.concurrent_trials == 1 and plan.inference_gpus == 1
    cpu_only = parse_spec(tiny_spec("gpt", resources={"use_gpu": False},
                                    sweep={"num_samples": 30}))
    assert plan_for(cpu_only, capacity).concurrent_trials == 24  # 3 x 4 + 3 x 4 CPUs
