"""The HTTP app in-process, without Ray (Starlette's TestClient): what the middleware and the
routes guarantee whatever the hosting, checked on a real ModelServer around a real bundle.
The same behaviours are checked over real HTTP against a Serve app in test_service.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import SAMPLE, tiny_spec
from fastapi.testclient import TestClient

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve.auth import digest
from orchestrator.serve.routes import create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import parse_spec

KEY = "route-test-key"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    return initial_bundle(tmp_path_factory.mktemp("routes") / "gpt",
                          parse_spec(tiny_spec("gpt")), rows)


def app_client(bundle_dir: Path, digests: list[str], **serve) -> TestClient:
    limits = parse_spec(tiny_spec("gpt", serve={"max_request_bytes": 4096, **serve})).serve
    server = ModelServer(str(bundle_dir), limits, digests, batching=False)
    api = create_api(server)

    @api.get("/boom")
    async def boom() -> None:  # a bug, as an unexpected exception
        raise RuntimeError("a bug")

    return TestClient(api, raise_server_exceptions=False)


def test_an_unexpected_exception_is_a_json_500(bundle_dir: Path) -> None:
    response = app_client(bundle_dir, []).get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["type"] == "server_error"


def test_body_limit_and_json_whatever_the_content_type(bundle_dir: Path) -> None:
    client = app_client(bundle_dir, [])
    body = json.dumps({"model": "test-gpt", "prompt": "Return the", "max_tokens": 2})
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/v1/completions", content=body, headers=form).status_code == 200
    big = json.dumps({"model": "test-gpt", "prompt": "a" * 5000})
    response = client.post("/v1/completions", content=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert client.post("/v1/completions", content=body).status_code == 200


def test_keys_guard_every_route_but_healthz_and_fail_closed(bundle_dir: Path) -> None:
    keyed = app_client(bundle_dir, [digest(KEY)])
    auth = {"Authorization": f"Bearer {KEY}"}
    for route in ("/openapi.json", "/docs", "/v1/models", "/tokenizer_info"):
        assert keyed.get(route).status_code == 401
        assert keyed.get(route, headers=auth).status_code == 200
    assert keyed.get("/healthz").status_code == 200
    closed = app_client(bundle_dir, [], api_keys_env="UNSET_KEYS_VARIABLE")
    for headers in ({}, auth, {"Authorization": "Bearer "}):
        assert closed.get("/v1/models", headers=headers).status_code == 401


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {"model": "test-gpt", "prompt": "abc \ud800 def", "max_tokens": 2},
     "prompt"),
    ("/v1/completions", {"model": "test-gpt", "prompt": ["fine", "\udfff"], "max_tokens": 2},
     "prompt"),
    ("/v1/completions", {"model": "test-gpt", "prompt": "fine", "stop": "\ud800"}, "stop"),
    ("/tokenize", {"prompt": "abc \ud800"}, "prompt"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(bundle_dir: Path, route: str, body: dict,
                                                    param: str) -> None:
    """Valid JSON ("\\ud800"), invalid Unicode: it was a 500 with a logged traceback."""
    client = app_client(bundle_dir, [])
    response = client.post(route, content=json.dumps(body))  # json.dumps escapes it
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if isinstance(body[param], str):  # a list's error names the first alternative it tried
        assert "lone surrogate" in error["message"]
    good = {"model": "test-gpt", "prompt": "Return the", "max_tokens": 2}
    assert client.post("/v1/completions", json=good).status_code == 200


def test_an_input_that_fails_the_model_fails_its_own_request_alone(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Serve raises a batch's error on every request in it; the server retries a failed batch
    request by request. The failure here is real: a lone surrogate reaching the tokenizer (the
    protocol refuses it first over HTTP; any input the model cannot take fails the same way)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    spec = parse_spec(tiny_spec("classifier"))
    server = ModelServer(str(initial_bundle(tmp_path_factory.mktemp("routes") / "clf", spec,
                                            rows)), spec.serve, [], batching=False)
    good = [["The event loop runs callbacks."], ["Log a message.", "Parse XML."]]
    alone = [asyncio.run(server.classify(texts)) for texts in good]
    results = asyncio.run(server.classify_lists([good[0], ["abc \ud800 def"], good[1]]))
    assert results[0] == alone[0] and results[2] == alone[1]
    assert isinstance(results[1], Exception)
    with pytest.raises(Exception):
        asyncio.run(server.classify(["abc \ud800 def"]))
