"""The HTTP app in-process, without Ray (Starlette's TestClient): what the middleware and the
routes guarantee whatever the hosting, checked on a real ModelServer around a real bundle.
The same behaviours are checked over real HTTP against a Serve app in test_service.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
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


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    return initial_bundle(tmp_path_factory.mktemp("routes") / "clf",
                          parse_spec(tiny_spec("classifier")), rows)


def app_client(bundle_dir: Path, digests: list[str], family: str = "gpt", **serve) -> TestClient:
    limits = parse_spec(tiny_spec(family, serve={"max_request_bytes": 4096, **serve})).serve
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


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_keys_guard_every_route_but_healthz_and_docs_and_fail_closed(bundle_dir: Path) -> None:
    keyed = app_client(bundle_dir, [digest(KEY)])
    auth = AUTH
    for route in ("/openapi.json", "/v1/models", "/tokenizer_info"):
        assert keyed.get(route).status_code == 401
        assert keyed.get(route, headers=auth).status_code == 200
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/docs").status_code == 200  # a page that asks for the key
    assert keyed.get("/no-such-route").status_code == 401  # keyed unless opened on purpose
    assert keyed.get("/no-such-route", headers=auth).status_code == 404
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


def test_an_input_that_fails_the_model_fails_its_own_request_alone(classifier_dir: Path) -> None:
    """Serve raises a batch's error on every request in it; the server retries a failed batch
    request by request. The failure here is real: a lone surrogate reaching the tokenizer (the
    protocol refuses it first over HTTP; any input the model cannot take fails the same way)."""
    spec = parse_spec(tiny_spec("classifier"))
    server = ModelServer(str(classifier_dir), spec.serve, [], batching=False)
    good = [["The event loop runs callbacks."], ["Log a message.", "Parse XML."]]
    alone = [asyncio.run(server.classify(texts)) for texts in good]
    results = asyncio.run(server.classify_lists([good[0], ["abc \ud800 def"], good[1]]))
    assert results[0] == alone[0] and results[2] == alone[1]
    assert isinstance(results[1], Exception)
    with pytest.raises(TypeError):  # the tokenizer's, for a string it cannot encode
        asyncio.run(server.classify(["abc \ud800 def"]))


@pytest.mark.parametrize("route", ["/v1/completions", "/tokenize", "/detokenize", "/v1/classify"])
@pytest.mark.parametrize("body", [b"{prompt: 1", b"", b"[1, 2", b"x" * 5000],
                         ids=["malformed", "empty", "truncated", "over-the-limit"])
def test_the_key_is_checked_before_the_body_is_read(bundle_dir: Path, route: str,
                                                    body: bytes) -> None:
    """A request without a valid key gets 401 whatever its body (a malformed one got 400)."""
    keyed = app_client(bundle_dir, [digest(KEY)])
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = keyed.post(route, content=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.post(route, content=body, headers=AUTH).status_code in (400, 404, 413)


def test_the_schema_declares_the_key_for_swagger_authorize(bundle_dir: Path) -> None:
    keyed = app_client(bundle_dir, [digest(KEY)])
    schema = keyed.get("/openapi.json", headers=AUTH).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API key"}
    assert schema["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "/v1/completions" in schema["paths"]
    open_schema = app_client(bundle_dir, []).get("/openapi.json").json()
    assert "securitySchemes" not in open_schema.get("components", {})


def swagger_requests(page: str, key: str | None) -> list[dict]:
    """Runs the docs page's script in node with a stand-in Swagger UI and form: the headers
    of the requests it lets Swagger make (the schema's and a "Try it out" call)."""
    script = page.split("<script>")[1].split("</script>")[0]
    stubs = """
const keyForm = {hidden: true, elements: {key: {value: KEY}}, submit: null,
                 addEventListener(kind, handler) { this.submit = handler; }};
const document = {getElementById: () => keyForm};
const seen = [];
function SwaggerUIBundle(config) {
  seen.push(config.requestInterceptor({url: config.url, headers: {}}).headers);
  seen.push(config.requestInterceptor({url: "/v1/models",
                                       headers: {Authorization: "Bearer other"}}).headers);
}
SwaggerUIBundle.presets = {apis: null};
"""
    run = "if (keyForm.submit) keyForm.submit({preventDefault() {}});\n" \
          "console.log(JSON.stringify(seen));"
    source = stubs.replace("KEY", json.dumps(key or "")) + script + run
    result = subprocess.run(["node", "-e", source], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_docs_load_the_schema_with_the_key_they_are_given(bundle_dir: Path) -> None:
    """A browser opening /docs sends no key: the page asks for it and adds it to every request
    Swagger makes that has none (a key given to Swagger's Authorize wins)."""
    keyed = app_client(bundle_dir, [digest(KEY)])
    page = keyed.get("/docs")
    assert page.status_code == 200 and 'type="password"' in page.text
    assert '"/openapi.json"' in page.text and KEY not in page.text
    if shutil.which("node") is None:
        pytest.skip("node runs the page's script")
    assert swagger_requests(page.text, f" {KEY} ") == [
        {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer other"}]
    assert swagger_requests(app_client(bundle_dir, []).get("/docs").text, None) == [
        {}, {"Authorization": "Bearer other"}]


def test_a_long_classify_text_is_read_as_far_as_the_model_reads_it(classifier_dir: Path) -> None:
    """The classifier reads a text's first max_length tokens: a long text is classified as batch
    inference classifies it (tokenized whole, then truncated), but only what can reach those
    tokens is tokenized (it was tokenized whole, up to the body limit, in a batch others share)."""
    client = app_client(classifier_dir, [], "classifier", max_request_bytes=1_000_000)
    server = client.app.state.server
    words = SAMPLE.read_text().split()
    long = " ".join(words[:3000])
    assert len(long) > 10 * server.max_text_chars
    (cut,) = server.readable([long])
    assert len(cut) < 2 * server.max_text_chars
    response = client.post("/v1/classify", json={"input": ["ok", long]})
    assert response.status_code == 200, response.text
    online = response.json()["data"][1]
    (offline,) = server.predictor.classify([long])
    assert online["label"] == offline["label"]
    assert online["score"] == pytest.approx(offline["score"], abs=1e-6)


def test_a_token_id_prompt_is_measured_before_it_is_checked_or_decoded(bundle_dir: Path) -> None:
    """A long list of ids is refused for its length, before any id is looked at (it was
    checked id by id, and decoded for echo, on the event loop first)."""
    client = app_client(bundle_dir, [], max_request_bytes=1_000_000)
    limit = client.app.state.server.limits.max_prompt_tokens
    body = {"model": "test-gpt", "prompt": [10**6] * (limit + 1), "echo": True}
    error = client.post("/v1/completions", json=body).json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "prompt_too_long")


def test_token_id_prompts_echo_their_text_decoded_off_the_event_loop(bundle_dir: Path) -> None:
    """16 prompts of 20 ids (past INLINE_DECODE_TOKENS: decoded on a thread) echo their texts."""
    client = app_client(bundle_dir, [], max_request_bytes=1_000_000)
    tokenizer = client.app.state.server.tokenizer
    texts = [f"Return the number {i} of items in the list of events" for i in range(16)]
    prompts = [tokenizer.encode(text).ids[:20] for text in texts]
    assert sum(map(len, prompts)) > 256
    response = client.post("/v1/completions", json={"model": "test-gpt", "prompt": prompts,
                                                    "max_tokens": 0, "echo": True, "logprobs": 0})
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    assert [choice["text"] for choice in choices] == tokenizer.decode_batch(prompts)


def test_a_megabyte_of_wrong_items_is_refused_at_once(bundle_dir: Path) -> None:
    """A list fails at its first bad item: 250,000 floats tried against every prompt type
    collected 750,000 errors and held the event loop for 4.6 s."""
    client = app_client(bundle_dir, [], max_request_bytes=2_000_000)
    started = time.perf_counter()
    response = client.post("/v1/completions", json={"model": "test-gpt", "prompt": [1.5] * 250_000})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert time.perf_counter() - started < 1.5


def test_the_classifier_reports_its_max_length_as_its_context(classifier_dir: Path) -> None:
    """Found by the fuzzer: /v1/models, /tokenize and /tokenizer_info asked the classifier for
    the language model's block_size (a 500)."""
    client = app_client(classifier_dir, [], "classifier")
    max_length = parse_spec(tiny_spec("classifier")).data.max_length
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == max_length
    assert client.post("/tokenize", json={"prompt": "a b"}).json()["max_model_len"] == max_length
    assert client.get("/tokenizer_info").json()["model_max_length"] == max_length
