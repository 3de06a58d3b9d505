"""The model service over real HTTP: a real Ray Serve app, real requests, no mocks.

Bundles are written without training (a freshly initialised model and a tokenizer trained on the
sample texts), so the tests check the service's contract, not the quality of its answers.
The two apps share one port and the root route, so they are deployed one at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import SAMPLE, free_port, tiny_spec

from orchestrator.bundle import write_bundle
from orchestrator.data.stage import DataInfo
from orchestrator.data.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer
from orchestrator.models import build_model
from orchestrator.serve import deploy, shutdown
from orchestrator.spec import JobSpec, parse_spec

MAX_TEXTS, MAX_PROMPT_CHARS, MAX_NEW_TOKENS = 4, 200, 16
TIMEOUT_S = 30
ANY_FIELD = object()


def _spec(family: str, port: int) -> JobSpec:
    return parse_spec(tiny_spec(family, serve={
        "port": port, "max_texts": MAX_TEXTS, "max_prompt_chars": MAX_PROMPT_CHARS,
        "max_new_tokens": MAX_NEW_TOKENS, "max_batch_size": 8,
        # Long enough that requests sent together land in one batch.
        "batch_wait_timeout_s": 0.05,
    }))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[JobSpec, Path]]:
    """One untrained GPT bundle and one untrained classifier bundle, both on one port."""
    root = tmp_path_factory.mktemp("bundles")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    port = free_port()
    specs = {family: _spec(family, port) for family in ("gpt", "classifier")}
    tokenizer = train_tokenizer((row["text"] for row in rows), specs["gpt"].data.vocab_size)
    tokenizer_dir = save_tokenizer(tokenizer, root / "tokenizer").parent
    eos_id, pad_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    counts = Counter(row["label"] for row in rows)
    infos = {
        "gpt": DataInfo("gpt", tokenizer.get_vocab_size(), eos_id, pad_id,
                        specs["gpt"].data.block_size + 1),
        "classifier": DataInfo("classifier", tokenizer.get_vocab_size(), eos_id, pad_id,
                               specs["classifier"].data.max_length, labels=sorted(counts),
                               label_counts={"train": dict(counts)}),
    }
    out = {}
    for family, spec in specs.items():
        info = infos[family]
        model = build_model(spec.model, info.vocab_size, info.seq_len, info.pad_id,
                            info.num_classes)
        out[family] = (spec, write_bundle(root / family, spec, info, model.state_dict(),
                                          tokenizer_dir, {"val": {}}, {"trial_id": "test"}))
    return out


class Services:
    """Deploys one family's app at a time (both would claim the root route)."""

    def __init__(self, bundles: dict[str, tuple[JobSpec, Path]]):
        self.bundles = bundles
        self.current: str | None = None

    def url(self, family: str) -> str:
        spec, bundle_dir = self.bundles[family]
        if self.current not in (None, family):
            shutdown(self.bundles[self.current][0])
            self.current = None
        url = deploy(spec, bundle_dir, timeout_s=90)
        self.current = family
        health = requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()
        assert health["family"] == family
        return url

    def close(self) -> None:
        from ray import serve

        if self.current is not None:
            shutdown(self.bundles[self.current][0])
        # Later test modules may start Serve on a port of their own.
        serve.shutdown()


@pytest.fixture(scope="module")
def services(ray_local, bundles) -> Iterator[Services]:
    from ray import serve

    # A Serve left running by an earlier module keeps its port and ignores ours: start afresh.
    serve.shutdown()
    services = Services(bundles)
    yield services
    services.close()


@pytest.fixture(scope="module")
def classifier_url(services: Services) -> str:
    return services.url("classifier")


@pytest.fixture(scope="module")
def gpt_url(services: Services) -> str:
    return services.url("gpt")


@pytest.fixture(scope="module")
def labels() -> set[str]:
    return {row["label"] for row in map(json.loads, SAMPLE.read_text().splitlines())}


def post(url: str, route: str, body: Any) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, timeout=TIMEOUT_S)


def assert_error(response: requests.Response, status: int, field: Any = ANY_FIELD) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "field"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if field is not ANY_FIELD:
        assert body["error"]["field"] == field, body


# --- classifier --------------------------------------------------------------------------------

CLASSIFY_OK = {"texts": ["Return the number of items."]}


def assert_predictions(predictions: list[dict], count: int, labels: set[str]) -> None:
    assert len(predictions) == count
    for prediction in predictions:
        assert prediction["label"] in labels
        assert 0.0 <= prediction["score"] <= 1.0
        assert set(prediction["scores"]) == labels
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["score"] == max(prediction["scores"].values())
        assert prediction["scores"][prediction["label"]] == prediction["score"]


def test_classifier_healthz(classifier_url: str) -> None:
    response = requests.get(f"{classifier_url}/healthz", timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "family": "classifier", "name": "test-classifier"}


def test_classify(classifier_url: str, labels: set[str]) -> None:
    texts = ["The event loop runs callbacks.", "Parse an XML document.", "Log a message."]
    response = post(classifier_url, "/classify", {"texts": texts})
    assert response.status_code == 200, response.text
    assert_predictions(response.json()["predictions"], len(texts), labels)


def test_classify_concurrent_requests_get_their_own_predictions(classifier_url: str,
                                                                labels: set[str]) -> None:
    """Requests batched together get back exactly their own texts' predictions."""
    requests_texts = [[f"text {i}.{j} about {word}" for j in range(1 + i % MAX_TEXTS)]
                      for i, word in enumerate(["sockets", "logging", "email", "threads",
                                                "xml", "asyncio", "ctypes", "imports",
                                                "tests", "json", "queues", "paths"])]
    alone = [post(classifier_url, "/classify", {"texts": texts}).json()["predictions"]
             for texts in requests_texts]
    with ThreadPoolExecutor(len(requests_texts)) as pool:
        responses = list(pool.map(lambda texts: post(classifier_url, "/classify",
                                                     {"texts": texts}), requests_texts))
    for texts, response, expected in zip(requests_texts, responses, alone):
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert_predictions(predictions, len(texts), labels)
        for got, want in zip(predictions, expected):
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)


@pytest.mark.parametrize(("request_kwargs", "status", "field"), [
    pytest.param({"data": '{"texts": ["a"', "headers": {"content-type": "application/json"}},
                 400, None, id="malformed-json"),
    pytest.param({"json": {}}, 422, "texts", id="missing-texts"),
    pytest.param({"json": {"texts": "abc"}}, 422, "texts", id="texts-not-a-list"),
    pytest.param({"json": {"texts": ["ok", 3]}}, 422, "texts.1", id="text-not-a-string"),
    pytest.param({"json": {"texts": []}}, 422, "texts", id="empty-texts"),
    pytest.param({"json": {"texts": ["a"] * (MAX_TEXTS + 1)}}, 422, "texts", id="too-many"),
    pytest.param({"json": {"texts": ["fine", ""]}}, 422, "texts", id="empty-string"),
    pytest.param({"json": {"texts": ["   "]}}, 422, "texts", id="blank-string"),
    pytest.param({"json": {"texts": ["a"], "top_k": 3}}, 422, "top_k", id="unknown-field"),
    pytest.param({"json": ["a", "b"]}, 422, ANY_FIELD, id="body-not-an-object"),
])
def test_classify_bad_request(classifier_url: str, request_kwargs: dict, status: int,
                              field: Any) -> None:
    response = requests.post(f"{classifier_url}/classify", timeout=TIMEOUT_S, **request_kwargs)
    assert_error(response, status, field)
    assert post(classifier_url, "/classify", CLASSIFY_OK).status_code == 200


def test_generate_on_classifier_is_404(classifier_url: str) -> None:
    response = post(classifier_url, "/generate", {"prompt": "The event loop", "max_tokens": 4})
    assert_error(response, 404, None)
    assert "/classify" in response.json()["error"]["message"]
    assert post(classifier_url, "/classify", CLASSIFY_OK).status_code == 200


@pytest.mark.parametrize(("method", "route", "status"), [
    ("get", "/no-such-route", 404),
    ("get", "/classify", 405),
])
def test_unknown_route_or_method_is_json_error(classifier_url: str, method: str, route: str,
                                               status: int) -> None:
    response = requests.request(method, f"{classifier_url}{route}", timeout=TIMEOUT_S)
    assert_error(response, status, None)
    assert post(classifier_url, "/classify", CLASSIFY_OK).status_code == 200


# --- language model ------------------------------------------------------------------------------

GENERATE_OK = {"prompt": "The event loop", "max_tokens": 4, "temperature": 0}


def generate(url: str, **body: Any) -> dict:
    response = post(url, "/generate", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_gpt_healthz(gpt_url: str) -> None:
    response = requests.get(f"{gpt_url}/healthz", timeout=TIMEOUT_S)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "family": "gpt", "name": "test-gpt"}


def test_generate(gpt_url: str) -> None:
    out = generate(gpt_url, prompt="The event loop", max_tokens=8, temperature=0.8, top_k=20,
                   seed=3)
    assert out["prompt"] == "The event loop"
    assert isinstance(out["text"], str)
    assert 0 <= out["tokens"] <= 8
    assert out["finish_reason"] in ("length", "stop")
    if out["finish_reason"] == "length":
        assert out["tokens"] == 8


def test_generate_defaults_and_edge_prompts(gpt_url: str) -> None:
    assert generate(gpt_url, prompt="Return")["tokens"] <= MAX_NEW_TOKENS
    assert generate(gpt_url, prompt="", max_tokens=3)["tokens"] <= 3
    # A prompt at the character cap is longer than the model's context: it is cropped, not refused.
    out = generate(gpt_url, prompt="x y " * (MAX_PROMPT_CHARS // 4), max_tokens=MAX_NEW_TOKENS)
    assert out["tokens"] <= MAX_NEW_TOKENS


def test_greedy_is_deterministic(gpt_url: str) -> None:
    first = generate(gpt_url, prompt="Return the number of", max_tokens=12, temperature=0)
    second = generate(gpt_url, prompt="Return the number of", max_tokens=12, temperature=0)
    assert first == second


def test_same_seed_same_text(gpt_url: str) -> None:
    body = {"prompt": "Create a new", "max_tokens": 12, "temperature": 1.0, "top_k": 50,
            "seed": 1234}
    assert generate(gpt_url, **body) == generate(gpt_url, **body)


def test_unseeded_sampling_varies(gpt_url: str) -> None:
    texts = {generate(gpt_url, prompt="Create a new", max_tokens=MAX_NEW_TOKENS,
                      temperature=1.0)["text"] for _ in range(4)}
    assert len(texts) > 1


def test_seeded_requests_batched_together_match_alone(gpt_url: str) -> None:
    """A request's seed alone decides its sample, whatever else shares its batch."""
    bodies = [{"prompt": "The event loop", "max_tokens": 10, "temperature": 1.0, "seed": seed}
              for seed in range(6)]
    alone = [generate(gpt_url, **body) for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: generate(gpt_url, **body), bodies))
    assert together == alone


@pytest.mark.parametrize(("request_kwargs", "status", "field"), [
    pytest.param({"data": "{prompt: 1}", "headers": {"content-type": "application/json"}},
                 400, None, id="malformed-json"),
    pytest.param({"json": {"max_tokens": 4}}, 422, "prompt", id="missing-prompt"),
    pytest.param({"json": {"prompt": ["a"]}}, 422, "prompt", id="prompt-not-a-string"),
    pytest.param({"json": {"prompt": "a", "max_tokens": "ten"}}, 422, "max_tokens",
                 id="max-tokens-not-an-int"),
    pytest.param({"json": {"prompt": "a", "max_tokens": 2.5}}, 422, "max_tokens",
                 id="max-tokens-float"),
    pytest.param({"json": {"prompt": "a", "max_tokens": 0}}, 422, "max_tokens",
                 id="max-tokens-zero"),
    pytest.param({"json": {"prompt": "a", "max_tokens": MAX_NEW_TOKENS + 1}}, 422, "max_tokens",
                 id="max-tokens-over-cap"),
    pytest.param({"json": {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}}, 422, "prompt",
                 id="prompt-too-long"),
    pytest.param({"json": {"prompt": "a", "temperature": -0.1}}, 422, "temperature",
                 id="negative-temperature"),
    pytest.param({"json": {"prompt": "a", "temperature": "hot"}}, 422, "temperature",
                 id="temperature-not-a-number"),
    pytest.param({"json": {"prompt": "a", "top_k": -1}}, 422, "top_k", id="negative-top-k"),
    pytest.param({"json": {"prompt": "a", "seed": "7"}}, 422, "seed", id="seed-not-an-int"),
    pytest.param({"json": {"prompt": "a", "seed": 2**64}}, 422, "seed", id="seed-too-large"),
    pytest.param({"json": {"prompt": "a", "stream": True}}, 422, "stream", id="unknown-field"),
])
def test_generate_bad_request(gpt_url: str, request_kwargs: dict, status: int,
                              field: Any) -> None:
    response = requests.post(f"{gpt_url}/generate", timeout=TIMEOUT_S, **request_kwargs)
    assert_error(response, status, field)
    assert generate(gpt_url, **GENERATE_OK)["tokens"] <= GENERATE_OK["max_tokens"]


def test_bad_request_does_not_fail_its_batch(gpt_url: str) -> None:
    """Good requests sent alongside bad ones (possibly in the same batch) still succeed."""
    good = [{"prompt": f"Return {i}", "max_tokens": 4, "seed": i} for i in range(4)]
    bad = [{"prompt": "Return 9", "max_tokens": 4, "seed": 2**64 + i} for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: post(gpt_url, "/generate", body), good + bad))
    assert [r.status_code for r in responses[:4]] == [200] * 4
    for response in responses[4:]:
        assert_error(response, 422, "seed")


def test_classify_on_gpt_is_404(gpt_url: str) -> None:
    response = post(gpt_url, "/classify", {"texts": ["The event loop"]})
    assert_error(response, 404, None)
    assert "/generate" in response.json()["error"]["message"]
    assert generate(gpt_url, **GENERATE_OK)["tokens"] <= GENERATE_OK["max_tokens"]
