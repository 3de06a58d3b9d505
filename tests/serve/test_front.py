"""The front over real HTTP without Ray: requests routed by their `model` field to each model's
own app (a language model, a classifier, and a keyed one), whole and streamed, with the models'
own answers, keys and errors; /v1/models merged; what the front cannot route is a 4xx in
OpenAI's shape. The same front on Serve is tested in test_deploy.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
import requests
from conftest import SAMPLE, served_in_thread, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve import forwarding
from orchestrator.serve.auth import digest
from orchestrator.serve.forwarding import Answer, Forwarded
from orchestrator.serve.front import Front, UnknownModel
from orchestrator.serve.routes import create_api
from orchestrator.serve.server import ModelServer
from orchestrator.spec import parse_spec

KEY = "front-test-key"


class LocalModels:
    """Models in this process: each model's own app, called as the replica's forward does."""

    def __init__(self, apps: dict[str, object]):
        self.apps = apps

    def names(self) -> list[str]:
        return sorted(self.apps)

    def _app(self, model: str) -> object:
        if model not in self.apps:
            raise UnknownModel(model)
        return self.apps[model]

    async def whole(self, model: str, request: Forwarded) -> Answer:
        return await forwarding.whole(self._app(model), request)

    async def stream(self, model: str, request: Forwarded) -> AsyncIterator[Answer | bytes]:
        async for part in forwarding.stream(self._app(model), request):
            yield part


@pytest.fixture(scope="module")
def front_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    root = tmp_path_factory.mktemp("front")
    apps = {}
    for name, family, keys in (("writer", "gpt", []), ("sorter", "classifier", []),
                               ("locked", "gpt", [digest(KEY)])):
        spec = parse_spec({**tiny_spec(family), "name": name})
        bundle = initial_bundle(root / name, spec, rows)
        apps[name] = create_api(ModelServer(str(bundle), spec.serve, keys, batching=False))
    with served_in_thread(Front(LocalModels(apps))) as url:
        yield url


def post(url: str, route: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, timeout=60, **kwargs)


def test_requests_go_to_the_model_they_name(front_url: str) -> None:
    completion = post(front_url, "/v1/completions",
                      {"model": "writer", "prompt": "The event loop", "max_tokens": 3})
    assert completion.status_code == 200, completion.text
    assert completion.json()["model"] == "writer"
    classified = post(front_url, "/v1/classify", {"model": "sorter", "input": ["Return the"]})
    assert classified.status_code == 200, classified.text
    assert classified.json()["model"] == "sorter"
    tokenized = post(front_url, "/tokenize", {"model": "writer", "prompt": "The event loop"})
    assert tokenized.status_code == 200 and tokenized.json()["count"] > 0


def test_a_streamed_completion_arrives_as_the_models_server_sent_events(front_url: str) -> None:
    with post(front_url, "/v1/completions", {"model": "writer", "prompt": "The", "max_tokens": 4,
                                             "stream": True, "ignore_eos": True},
              stream=True) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]" and len(events) >= 2
    assert all(json.loads(event[6:])["model"] == "writer" for event in events[:-1])


def test_the_models_own_keys_and_errors_come_back_unchanged(front_url: str) -> None:
    body = {"model": "locked", "prompt": "The", "max_tokens": 2}
    refused = post(front_url, "/v1/completions", body)
    assert refused.status_code == 401 and refused.json()["error"]["type"]
    allowed = post(front_url, "/v1/completions", body,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert allowed.status_code == 200, allowed.text
    wrong_route = post(front_url, "/v1/completions", {"model": "sorter", "prompt": "x"})
    assert wrong_route.status_code == 404  # the classifier's own answer
    assert wrong_route.json()["error"]["code"] == "unsupported_route"


def test_what_the_front_cannot_route_is_a_4xx_naming_the_models(front_url: str) -> None:
    unknown = post(front_url, "/v1/completions", {"model": "nobody", "prompt": "x"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "writer" in unknown.json()["error"]["message"]
    missing = post(front_url, "/v1/completions", {"prompt": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    broken = requests.post(f"{front_url}/v1/completions", data=b"{not json", timeout=60)
    assert broken.status_code == 400
    assert requests.get(f"{front_url}/tokenizer_info", timeout=60).status_code == 404


def test_models_lists_every_model_the_callers_key_opens(front_url: str) -> None:
    listed = requests.get(f"{front_url}/v1/models", timeout=60).json()
    assert {m["id"] for m in listed["data"]} == {"writer", "sorter"}  # not the locked one
    keyed = requests.get(f"{front_url}/v1/models", timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "locked" in {m["id"] for m in keyed["data"]}
    one = requests.get(f"{front_url}/v1/models/sorter", timeout=60)
    assert one.status_code == 200 and one.json()["id"] == "sorter"
    health = requests.get(f"{front_url}/healthz", timeout=60).json()
    assert health == {"status": "ok", "models": ["locked", "sorter", "writer"]}
