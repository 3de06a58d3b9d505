"""Per-key quotas and usage (serve.quotas): the ledger with a clock of our own and the HTTP app
in-process (no Ray), then one real Serve app of two replicas sharing one ledger."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import SAMPLE, tiny_spec
from fastapi.testclient import TestClient

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve.auth import digest
from orchestrator.serve.quotas import (
    Ledger,
    Limits,
    QuotaKeyError,
    key_id,
    limits_by_key,
    refused,
)
from orchestrator.serve.routes import create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import QuotasSpec, SpecError, parse_spec

ALPHA, BETA, GAMMA = "alpha-key-5d1e", "beta-key-77c0", "gamma-key-0b3a"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the ledger -----------------------------------------------------------------------------

def test_a_key_gets_exactly_its_requests_per_minute_in_any_60_seconds() -> None:
    clock = Clock()
    ledger = Ledger({"a": Limits(requests_per_minute=50)}, clock=clock)
    outcomes = []
    for _ in range(60):  # 60 requests over 5.9 s
        outcomes.append(ledger.admit("a"))
        clock.now += 0.1
    assert sum(o.refusal is None for o in outcomes) == 50
    refusal = outcomes[-1].refusal
    assert refusal.limit == "requests_per_minute" and refusal.allowed == 50
    assert refusal.retry_after_s == pytest.approx(60 - 5.9)  # when the first one leaves
    clock.now = 1000.0 + 60.0 - 0.01
    assert ledger.admit("a").refusal is not None
    clock.now = 1000.0 + 60.0
    assert ledger.admit("a").refusal is None  # the first request left the window
    assert ledger.admit("a").refusal is not None  # the second is still in it


def test_keys_have_their_own_counts_and_limits() -> None:
    ledger = Ledger({"a": Limits(requests_per_minute=2), "b": Limits(requests_per_minute=5)},
                    default=Limits(requests_per_minute=1), clock=Clock())
    assert [ledger.admit("a").refusal is None for _ in range(3)] == [True, True, False]
    assert all(ledger.admit("b").refusal is None for _ in range(5))
    assert [ledger.admit("other").refusal is None for _ in range(2)] == [True, False]


def test_no_limit_counts_nothing() -> None:
    ledger = Ledger({"a": Limits()}, clock=Clock())
    assert all(ledger.admit("a", 10**9).refusal is None for _ in range(1000))
    assert ledger.usage == {} and ledger.open == {}


def test_tokens_are_reserved_then_settled_to_what_was_used() -> None:
    clock = Clock()
    ledger = Ledger({"a": Limits(tokens_per_minute=100)}, clock=clock)
    first = ledger.admit("a", 30)
    clock.now += 1
    assert ledger.admit("a", 30).refusal is None and ledger.admit("a", 30).refusal is None
    refusal = ledger.admit("a", 30).refusal  # 120 > 100
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after_s == pytest.approx(59)
    ledger.settle("a", first.ticket, 10)  # it used 10 of its 30: 100 fit now
    assert ledger.admit("a", 30).refusal is None
    assert ledger.admit("a", 1).refusal is not None
    clock.now += 59  # the first charge (10) leaves
    assert ledger.admit("a", 10).refusal is None
    ledger.settle("a", first.ticket, 99)  # settled already: nothing changes
    assert ledger.usage["a"].tokens == 100


def test_a_refused_request_is_not_counted() -> None:
    clock = Clock()
    ledger = Ledger({"a": Limits(requests_per_minute=10, tokens_per_minute=50)}, clock=clock)
    assert ledger.admit("a", 50).refusal is None
    for _ in range(20):
        assert ledger.admit("a", 1).refusal.limit == "tokens_per_minute"
    assert len(ledger.usage["a"].requests) == 1
    clock.now += 60
    assert all(ledger.admit("a", 5).refusal is None for _ in range(10))


def test_the_token_wait_is_until_enough_charges_leave() -> None:
    clock = Clock()
    ledger = Ledger({"a": Limits(tokens_per_minute=100)}, clock=clock)
    for _ in range(4):
        ledger.admit("a", 25)
        clock.now += 10
    assert ledger.admit("a", 60).refusal.retry_after_s == pytest.approx(60 - 40 + 20)


def test_a_request_over_the_whole_minute_is_a_400_and_over_for_now_a_429() -> None:
    ledger = Ledger({"a": Limits(tokens_per_minute=100)}, clock=Clock())
    never = ledger.admit("a", 101).refusal
    assert never.retry_after_s is None
    error = refused(never)
    assert error.status == 400 and error.code == "request_over_quota"
    assert "limit of 100 tokens per minute" in error.message
    later = refused(ledger.admit("a", 100).refusal or ledger.admit("a", 1).refusal)
    assert later.status == 429 and later.code == "rate_limit_exceeded"
    assert later.headers == {"Retry-After": "60"}


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    from orchestrator.serve.quotas import Refusal

    assert refused(Refusal("requests_per_minute", 5, 1, 0.0001)).headers["Retry-After"] == "1"
    assert refused(Refusal("requests_per_minute", 5, 1, 7.2)).headers["Retry-After"] == "8"


# --- the spec -------------------------------------------------------------------------------

DIGESTS = [digest(key) for key in (ALPHA, BETA, GAMMA)]


def test_overrides_replace_the_fields_they_set() -> None:
    quotas = QuotasSpec.model_validate({
        "default": {"requests_per_minute": 600, "tokens_per_minute": 10_000},
        "keys": {key_id(DIGESTS[0]): {"requests_per_minute": 50},
                 DIGESTS[1][:8]: {"tokens_per_minute": None}}})
    assert limits_by_key(quotas, DIGESTS) == {
        key_id(DIGESTS[0]): Limits(50, 10_000), key_id(DIGESTS[1]): Limits(600, None),
        key_id(DIGESTS[2]): Limits(600, 10_000)}


def test_an_override_must_name_exactly_one_configured_key() -> None:
    unknown = QuotasSpec.model_validate({"keys": {"00000000": {"requests_per_minute": 1}}})
    with pytest.raises(QuotaKeyError, match="serve.quotas.keys.00000000: no configured key"):
        limits_by_key(unknown, DIGESTS)
    both = QuotasSpec.model_validate({"keys": {"abcdef12": {"requests_per_minute": 1}}})
    with pytest.raises(QuotaKeyError, match="2 keys have"):
        limits_by_key(both, ["abcdef12" + "0" * 56, "abcdef12" + "1" * 56])


@pytest.mark.parametrize(("serve", "message"), [
    ({"quotas": {"default": {"requests_per_minute": 5}}}, "serve.quotas needs API keys"),
    ({"api_keys_env": "K", "quotas": {"keys": {"alpha-key": {}}}}, "is not a key id"),
    ({"api_keys_env": "K", "quotas": {"keys": {"ABCDEF12": {}}}}, "lower-case hex"),
    ({"api_keys_env": "K", "quotas": {"keys": {123456789012: {}}}}, "read as a number"),
    ({"api_keys_env": "K", "quotas": {"default": {"tokens_per_minute": 0}}},
     "serve.quotas.default.tokens_per_minute"),
    ({"api_keys_env": "K", "quotas": {"default": {"requests_per_hour": 5}}}, "requests_per_hour"),
])
def test_bad_quotas_are_refused_naming_the_field(serve: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(tiny_spec("gpt", serve=serve))


# --- the HTTP app in-process (no Ray) --------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    root = tmp_path_factory.mktemp("quotas")
    return {family: initial_bundle(root / family, parse_spec(tiny_spec(family)), rows)
            for family in ("gpt", "classifier")}


def keyed_client(bundle_dir: Path, family: str, quotas: dict, **serve: Any) -> TestClient:
    limits = parse_spec(tiny_spec(family, serve={"api_keys_env": "UNUSED", "quotas": quotas,
                                                 **serve})).serve
    server = ModelServer(str(bundle_dir), limits, DIGESTS, batching=False)
    return TestClient(create_api(server), raise_server_exceptions=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_rate_limited(response: Any) -> int:
    """OpenAI's 429: its error shape, code rate_limit_exceeded, Retry-After in whole seconds."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "per minute" in error["message"]
    retry = int(response.headers["Retry-After"])
    assert 1 <= retry <= 60
    return retry


WORK = {"gpt": [("/v1/completions", {"model": "test-gpt", "prompt": "The", "max_tokens": 2}),
                ("/tokenize", {"prompt": "The event loop"}),
                ("/detokenize", {"tokens": [5, 6, 7]})],
        "classifier": [("/v1/classify", {"input": ["The event loop"]})]}


@pytest.mark.parametrize("family", ["gpt", "classifier"])
def test_every_route_that_does_work_counts_and_refuses_past_the_limit(bundles, family) -> None:
    quotas = {"default": {"requests_per_minute": 100},
              "keys": {key_id(DIGESTS[0]): {"requests_per_minute": 2}}}
    for route, body in WORK[family]:
        client = keyed_client(bundles[family], family, quotas)  # a fresh minute for each route
        assert client.post(route, json=body, headers=bearer(ALPHA)).status_code == 200
        assert client.post(route, json=body, headers=bearer(ALPHA)).status_code == 200
        assert_rate_limited(client.post(route, json=body, headers=bearer(ALPHA)))
        assert client.post(route, json=body, headers=bearer(BETA)).status_code == 200
    # Listing the model or the tokenizer does no work: never counted, never refused.
    for route in ("/v1/models", "/tokenizer_info", "/healthz"):
        assert client.get(route, headers=bearer(ALPHA)).status_code == 200


def test_tokens_per_minute_count_prompt_and_completion_tokens(bundles) -> None:
    """max_tokens is reserved while a completion runs and settled to what it used; with
    ignore_eos every completion uses all of it, so 40 tokens per minute is exactly 4 requests
    of 6 + 4 tokens."""
    client = keyed_client(bundles["gpt"], "gpt", {"default": {"tokens_per_minute": 40}})
    prompt = client.post("/tokenize", json={"prompt": "The event loop runs every callback"},
                         headers=bearer(GAMMA)).json()["tokens"][:6]
    assert len(prompt) == 6
    body = {"model": "test-gpt", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    statuses = []
    for _ in range(5):
        response = client.post("/v1/completions", json=body, headers=bearer(GAMMA))
        if response.status_code == 200:
            assert response.json()["usage"]["total_tokens"] == 10
        statuses.append(response.status_code)
    assert statuses == [200] * 4 + [429]
    assert_rate_limited(client.post("/v1/completions", json=body, headers=bearer(GAMMA)))
    too_big = client.post("/v1/completions", json={**body, "max_tokens": 12, "n": 3},
                          headers=bearer(BETA))
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "request_over_quota"
    assert client.post("/v1/completions", json=body, headers=bearer(BETA)).status_code == 200


# --- one real Serve app: two replicas, one ledger ---------------------------------------------

LIMIT, SENT, OTHER_SENT = 50, 60, 30


@pytest.fixture(scope="module")
def quota_service(serving, bundles, monkeypatch_module) -> str:
    from orchestrator.serve import deploy

    monkeypatch_module.setenv("ORCH_TEST_QUOTA_KEYS", f"{ALPHA},{BETA}")
    spec = parse_spec({**tiny_spec("gpt", serve={
        "port": serving, "num_replicas": 2, "replica_cpus": 0.25,
        "api_keys_env": "ORCH_TEST_QUOTA_KEYS",
        "quotas": {"default": {"tokens_per_minute": 100_000},  # reserved and settled, never hit
                   "keys": {key_id(DIGESTS[0]): {"requests_per_minute": LIMIT}}}}),
        "name": "quota"})
    return deploy(spec, bundles["gpt"], timeout_s=120)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def scrape(ray_local) -> str:
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def series(text: str, name: str, key: str, app: str = "quota-service") -> dict[str, float]:
    """The values of one metric for one key id of the app, by the replica (WorkerId) that
    recorded them. The app matters: the Ray-free tests of this module serve the same keys from
    pytest's own process, whose metrics the node exports too once Ray runs in it."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'key="{key}"' in line and f'app="{app}"' in line:
            worker = re.search(r'WorkerId="(\w+)"', line)
            out[worker.group(1) if worker else ""] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_key_over_its_limit_gets_429_across_replicas_while_another_key_is_served(
        ray_local, quota_service: str) -> None:
    """Sent at once from 6 threads (90 tokenize requests: seconds, far inside the minute), half to the model's route and half through the front, 60
    requests of a key limited to 50 per minute: exactly 50 succeed and 10 get 429 with
    Retry-After. "Within 1% of the limit" is, for a limit of 50, within half a request: exactly
    50 (any count is exact, since one ledger counts for both replicas; replica-local counts would
    let up to 100 through). Meanwhile every request of another key succeeds, and the usage
    metrics count both keys under their ids, never the keys, with the tokens a completion
    returned as its usage."""
    front = quota_service.rsplit("/", 1)[0]

    def send(args: tuple[str, int]) -> requests.Response:
        key, i = args
        url = quota_service if i % 2 else front
        return requests.post(f"{url}/tokenize", json={"model": "quota", "prompt": "The event"},
                             headers=bearer(key), timeout=30)

    with ThreadPoolExecutor(6) as pool:
        work = [(ALPHA, i) for i in range(SENT)] + [(BETA, i) for i in range(OTHER_SENT)]
        answers = list(pool.map(send, work))
    alpha, beta = answers[:SENT], answers[SENT:]
    assert sum(a.status_code == 200 for a in alpha) == LIMIT
    refused_ = [a for a in alpha if a.status_code != 200]
    assert len(refused_) == SENT - LIMIT
    for answer in refused_:
        assert_rate_limited(answer)
    assert [b.status_code for b in beta] == [200] * OTHER_SENT
    completion = requests.post(f"{front}/v1/completions", headers=bearer(BETA), timeout=30, json={
        "model": "quota", "prompt": "The event loop", "max_tokens": 3, "temperature": 0})
    assert completion.status_code == 200, completion.text
    used = completion.json()["usage"]

    alpha_id, beta_id = key_id(digest(ALPHA)), key_id(digest(BETA))
    deadline = time.monotonic() + 30
    while True:
        text = scrape(ray_local)
        counts = {name: series(text, f"ray_orchestrator_serve_key_{name}_total", key)
                  for name, key in (("requests", alpha_id), ("rate_limited", alpha_id))}
        counts |= {f"other {name}": series(text, f"ray_orchestrator_serve_key_{name}_total",
                                           beta_id)
                   for name in ("requests", "prompt_tokens", "completion_tokens")}
        totals = {name: sum(values.values()) for name, values in counts.items()}
        wanted = {"requests": LIMIT, "rate_limited": SENT - LIMIT,
                  "other requests": OTHER_SENT + 1,
                  "other prompt_tokens": used["prompt_tokens"],
                  "other completion_tokens": used["completion_tokens"]}
        if totals == wanted or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert totals == wanted
    replicas = {worker for values in counts.values() for worker in values}
    assert len(replicas) == 2, "one replica took every request"
    assert ALPHA not in text and BETA not in text
