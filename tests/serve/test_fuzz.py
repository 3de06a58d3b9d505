"""The HTTP API under a fuzzer (hypothesis): generated requests, valid and invalid, sent over real
HTTP to the real app of a real tiny bundle on uvicorn in a thread (no Ray), for a language model
and a classifier, each with and without API keys. Every answer must come within TIMEOUT_S, below
500, with every error in OpenAI's shape (a stream's too), and a keyed route without a valid key
must answer 401 whatever the request holds.

Each run draws new requests; a failure prints the seed to rerun it with (`--hypothesis-seed`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from conftest import SAMPLE, TIMING, served_in_thread, tiny_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve.auth import digest
from orchestrator.serve.routes import OPEN_PATHS, create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import parse_spec

EXAMPLES = 300  # per app (4 apps), each 1 to CONCURRENT requests sent together
CONCURRENT = 6  # below a full batch plus the waiting queue: no 503 is due
TIMEOUT_S = 10  # per request, a stream read whole
KEY = "fuzz-key-5e1d"
LIMITS = {"max_request_bytes": 4096, "max_inputs": 4, "max_prompt_tokens": 26,
          "max_new_tokens": 8, "max_batch_size": 4, "max_queued_requests": 8}

POST_ROUTES = ["/v1/completions", "/v1/classify", "/tokenize", "/detokenize"]
GET_ROUTES = ["/v1/models", "/v1/models/{id}", "/tokenizer_info", "/healthz", "/openapi.json",
              "/docs", "/other"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
AUTHS = {"none": None, "valid": f"Bearer {KEY}", "lowercase scheme": f"bearer {KEY}",
         "wrong": "Bearer wrong", "no scheme": KEY, "empty": "Bearer ", "basic": f"Basic {KEY}"}
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x"]
EXTRA_FIELDS = ["logit_bias", "best_of", "suffix", "messages", "Model", ""]
GOOD = {"gpt": ("/v1/completions", {"prompt": "The event loop", "max_tokens": 4}),
        "classifier": ("/v1/classify", {"input": ["The event loop runs callbacks."]})}


# ---- the apps -----------------------------------------------------------------------------------

@dataclass
class App:
    family: str
    keyed: bool
    url: str
    name: str
    vocab_size: int
    counts: Counter = field(default_factory=Counter)  # requests sent, by route
    statuses: Counter = field(default_factory=Counter)  # answers, by status code


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    root = tmp_path_factory.mktemp("fuzz")
    return {family: initial_bundle(root / family, parse_spec(tiny_spec(family)), rows)
            for family in ("gpt", "classifier")}


@pytest.fixture(scope="module", params=[("gpt", True), ("gpt", False), ("classifier", True),
                                        ("classifier", False)],
                ids=["gpt-keyed", "gpt-open", "classifier-keyed", "classifier-open"])
def app(request: pytest.FixtureRequest, bundles: dict[str, Path]) -> Iterator[App]:
    """The language model batches on its engine; the classifier runs unbatched (Serve's batch
    decorator needs a replica)."""
    family, keyed = request.param
    spec = parse_spec(tiny_spec(family, serve=LIMITS))
    server = ModelServer(str(bundles[family]), spec.serve, [digest(KEY)] if keyed else [],
                         batching=family == "gpt")
    with served_in_thread(create_api(server)) as url:
        yield App(family, keyed, url, spec.name, server.info.vocab_size)


# ---- what is sent -------------------------------------------------------------------------------

# Any character JSON can carry, lone surrogates included ("\ud800" is valid JSON).
plain = st.characters(codec="utf-8")
characters = plain | st.characters(categories=["Cs"])
words = st.integers(1, 900).map(lambda n: "word " * n)  # past the prompt, text and body limits
texts = st.text(plain, max_size=24) | st.sampled_from(
    ["The event loop", "Return the number of", "\ufffd", "😀 漢字", "a\x00b", "é" * 30]) | words
numbers = st.integers() | st.floats() | st.sampled_from(
    [-1, 0, 1, 2, 5, 6, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -0.0, 1e-46, 5e-324, 1e308])
scalars = st.none() | st.booleans() | numbers | st.text(characters, max_size=24) | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    texts | st.text(characters, max_size=8), inner, max_size=3), max_leaves=8)


def token_ids(vocab_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=20)


def fields_of(route: str, app: App) -> dict[str, st.SearchStrategy]:
    """Each route's fields with values in range (the mutations in `bodies` put them out)."""
    ids = token_ids(app.vocab_size)
    if route == "/v1/completions":
        penalty = st.floats(-2.0, 2.0)
        return {
            "model": st.just(app.name),
            "prompt": texts | st.lists(texts, min_size=1, max_size=4) | ids
            | st.lists(ids, min_size=1, max_size=4),
            "max_tokens": st.integers(1, 8) | st.none(), "temperature": st.floats(0.0, 2.0),
            "top_p": st.floats(1e-300, 1.0), "top_k": st.integers(0, 600) | st.just(2**70),
            "stop": st.none() | texts | st.lists(texts, max_size=4), "n": st.integers(1, 2),
            "seed": st.integers(0, 2**63 - 1) | st.none(), "logprobs": st.integers(0, 5) | st.none(),
            "echo": st.booleans(), "presence_penalty": penalty, "frequency_penalty": penalty,
            "stream": st.booleans(), "user": texts, "ignore_eos": st.booleans(),
            "stream_options": st.none() | st.fixed_dictionaries(
                {}, optional={"include_usage": st.booleans()}),
        }
    if route == "/v1/classify":
        return {"model": st.just(app.name) | st.none(),
                "input": texts | st.lists(texts, min_size=1, max_size=4)}
    if route == "/tokenize":
        return {"model": st.just(app.name), "prompt": texts, "add_special_tokens": st.booleans(),
                "return_token_strs": st.booleans()}
    return {"model": st.just(app.name), "tokens": ids}


@st.composite
def bodies(draw: st.DrawFn, route: str, app: App) -> Any:
    """A body of the route's fields (the required ones always), then up to 3 mutations: a field
    dropped, set to any JSON value, or an unknown field added."""
    fields = fields_of(route, app)
    required = [name for name in ("model", "prompt", "input", "tokens") if name in fields]
    body = draw(st.fixed_dictionaries({name: fields[name] for name in required},
                                      optional={k: v for k, v in fields.items()
                                                if k not in required}))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        name = draw(st.sampled_from([*fields, *EXTRA_FIELDS]))
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(numbers | json_values | st.sampled_from(["other-model", ""]))
    return body


@st.composite
def raw_bodies(draw: st.DrawFn, route: str, app: App) -> bytes:
    """What a POST carries: mostly JSON of the route's body; also any JSON value, broken JSON,
    bytes, nesting deeper than a parser recurses, NaN, and bodies over the limit."""
    kind = draw(st.sampled_from(["body"] * 6 + ["json", "cut", "bytes", "deep", "nan", "big"]))
    if kind == "body":
        return json.dumps(draw(bodies(route, app))).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "cut":
        text = json.dumps(draw(bodies(route, app))).encode()
        return text[:draw(st.integers(0, max(0, len(text) - 1)))]
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.integers(10, 2000))
        return b"[" * depth + b"]" * depth
    if kind == "nan":
        return json.dumps({**draw(bodies(route, app)),
                           draw(st.sampled_from(["temperature", "top_p", "seed", "input"])):
                           draw(st.sampled_from([float("nan"), float("inf")]))}).encode()
    return b'{"prompt": "' + b"a" * draw(st.integers(4096, 9000)) + b'"}'


@dataclass
class Call:
    method: str
    path: str
    route: str  # the path's template, for the counts
    body: bytes | None
    headers: dict[str, str]
    authorized: bool
    chunked: bool  # the body sent in pieces, without a Content-Length
    leave_early: bool  # a stream's client leaves after its first event


@st.composite
def calls(draw: st.DrawFn, app: App) -> Call:
    main = "/v1/completions" if app.family == "gpt" else "/v1/classify"
    route = draw(st.sampled_from([main] * 4 + POST_ROUTES * 2 + GET_ROUTES))
    usual = "POST" if route in POST_ROUTES else "GET"
    method = draw(st.sampled_from([usual] * 30 + METHODS))
    path = route
    if route == "/v1/models/{id}":
        path = "/v1/models/" + quote(draw(st.sampled_from([app.name, "other"])
                                          | st.text(plain, min_size=1, max_size=12)), safe="")
    elif route == "/other":
        path = draw(st.sampled_from(["/", "/v1", "/v1/", "/classify", "/generate", "/docs/x",
                                     "/healthz/", "/v1/chat/completions", "/%00", "/..%2f"]))
    auth = draw(st.sampled_from(["valid"] * 12 + sorted(AUTHS)))
    headers = {"Authorization": AUTHS[auth]} if AUTHS[auth] is not None else {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers["Content-Type"] = content_type
    body = draw(raw_bodies(route if route in POST_ROUTES else "/tokenize", app)) \
        if method in ("POST", "PUT", "PATCH") else None
    return Call(method, path, route, body, headers, auth in ("valid", "lowercase scheme"),
                draw(st.booleans()), draw(st.booleans()))


# ---- what must come back ------------------------------------------------------------------------

def assert_openai_error(payload: Any) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def assert_stream(response: requests.Response) -> None:
    """Server-sent events: chunks or one error event, then `data: [DONE]`."""
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert events and events[-1] == "data: [DONE]", events[-3:]
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payload = json.loads(event[len("data: "):])
        if "error" in payload:
            assert_openai_error(payload)
        else:
            assert payload["choices"] or "usage" in payload, payload


class Sender:
    """Sends a group of calls at once, each thread on its own keep-alive session."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(CONCURRENT)
        self.local = threading.local()

    def send(self, app: App, group: list[Call]) -> None:
        app.counts.update(call.route for call in group)
        for future in [self.pool.submit(self.check, app, call) for call in group]:
            app.statuses[future.result()] += 1

    def check(self, app: App, call: Call) -> int:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return check(app, call, self.local.session)


def check(app: App, call: Call, session: requests.Session) -> int:
    """The answer's status, once it is found right."""
    started = time.monotonic()
    body = call.body
    if body is not None and call.chunked:
        body = iter([body[i:i + 1000] for i in range(0, len(body), 1000)] or [b""])
    with session.request(call.method, app.url + call.path, data=body, headers=call.headers,
                         timeout=TIMEOUT_S, stream=True) as response:
        status, kind = response.status_code, response.headers.get("content-type", "")
        assert status < 500, (status, response.text[:500])
        if app.keyed and not call.authorized and call.path not in OPEN_PATHS:
            assert status == 401, (status, response.text[:500])
        if status >= 400:
            assert kind.startswith("application/json"), kind
            assert_openai_error(response.json())
        elif kind.startswith("text/event-stream") and call.leave_early:
            assert next(response.iter_lines()).startswith(b"data: ")
        elif kind.startswith("text/event-stream"):
            assert_stream(response)
        elif kind.startswith("application/json"):
            response.json()
        else:
            assert call.path == "/docs" and kind.startswith("text/html"), (call.path, kind)
    assert time.monotonic() - started < TIMEOUT_S
    return status


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def fuzz(app: App, sender: Sender, data: st.DataObject) -> None:
    sender.send(app, data.draw(st.lists(calls(app), min_size=1, max_size=CONCURRENT),
                               label="calls sent together"))


def test_no_request_gets_a_5xx_a_hang_or_an_error_out_of_shape(
        app: App, record_property: pytest.RecordProperty) -> None:
    started = time.monotonic()
    sender = Sender()
    with sender.pool:
        fuzz(app, sender)
    seconds = time.monotonic() - started
    good = GOOD[app.family]
    assert requests.post(f"{app.url}{good[0]}", json={"model": app.name, **good[1]},
                         headers={"Authorization": AUTHS["valid"]}, timeout=TIMEOUT_S).ok
    by_route = ", ".join(f"{route} {count}" for route, count in sorted(app.counts.items()))
    by_status = ", ".join(f"{status} {count}" for status, count in sorted(app.statuses.items()))
    record_property(TIMING, f"API fuzzer, {app.family} {'with' if app.keyed else 'without'} "
                            f"keys: {sum(app.counts.values())} requests in {seconds:.1f} s; "
                            f"by route: {by_route}; by status: {by_status}")
