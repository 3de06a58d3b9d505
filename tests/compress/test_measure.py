"""The compress stage's latency probe against the service's real routes over HTTP (uvicorn in
this process, no Ray): it sends the service's API key and fits its request to a small context."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, served_in_thread, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.compress.measure import service_p50_s
from orchestrator.serve.auth import load_key_digests
from orchestrator.serve.routes import create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import Task, parse_spec


@pytest.mark.parametrize("task", [Task.LANGUAGE_MODEL, Task.CLASSIFIER])
def test_the_latency_probe_answers_through_a_keyed_service_with_a_small_context(
        task: Task, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROBE_KEYS", "first-key,second-key")
    family = "gpt" if task == Task.LANGUAGE_MODEL else "classifier"
    spec = parse_spec(tiny_spec(family, data={"block_size": 8, "max_length": 8},
                                serve={"api_keys_env": "PROBE_KEYS"}))
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:200]]
    bundle = initial_bundle(tmp_path / "bundle", spec, rows)
    server = ModelServer(str(bundle), spec.serve, load_key_digests(spec.serve), batching=False)
    with served_in_thread(create_api(server)) as url:
        assert service_p50_s(spec, url, task, count=3) > 0
