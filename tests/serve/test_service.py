"""The model service over real HTTP: a real Ray Serve app, the official `openai` client, no mocks.

Bundles hold freshly initialised models (no training run), so the tests check the service's
contract, not the quality of its answers. The two apps share one port and the root route, so
they are deployed one at a time: the language model with API keys, the classifier without.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from conftest import SAMPLE, TASKS, free_port, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.serve import deploy, shutdown
from orchestrator.spec import JobSpec, parse_spec

MAX_INPUTS, MAX_PROMPT_TOKENS, MAX_NEW_TOKENS = 4, 26, 12
CONTEXT = 32  # tiny_spec's block_size
API_KEYS = ["first-key-3f9c", "second-key-81aa"]
TIMEOUT_S = 30
GPT_NAME, CLASSIFIER_NAME = "test-gpt", "test-classifier"


def _spec(family: str, port: int, **serve: Any) -> JobSpec:
    return parse_spec(tiny_spec(family, serve={
        "port": port, "max_inputs": MAX_INPUTS, "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_new_tokens": MAX_NEW_TOKENS, "max_batch_size": 8, "max_queued_requests": 4,
        # Long enough that requests sent together land in one batch.
        "batch_wait_timeout_s": 0.05, **serve}))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[JobSpec, Path]]:
    root = tmp_path_factory.mktemp("bundles")
    keys_file = root / "api_keys"
    keys_file.write_text("# one key per line\n" + "\n".join(API_KEYS) + "\n")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    port = free_port()
    specs = {"gpt": _spec("gpt", port, api_keys_file=str(keys_file)),
             "classifier": _spec("classifier", port)}
    return {family: (spec, initial_bundle(root / family, spec, rows))
            for family, spec in specs.items()}


class Services:
    """Deploys one family's app at a time (each test module's models may share a name)."""

    def __init__(self, bundles: dict[str, tuple[JobSpec, Path]]):
        self.bundles = bundles
        self.current: str | None = None

    def url(self, family: str) -> str:
        spec, bundle_dir = self.bundles[family]
        if self.current not in (None, family):
            shutdown(self.bundles[self.current][0])
        url = deploy(spec, bundle_dir, timeout_s=120)
        self.current = family
        assert requests.get(f"{url}/healthz", timeout=TIMEOUT_S).json()["task"] == TASKS[family]
        return url

    def closed_url(self) -> str:
        """The language model on a replica told to require keys but given none (as when a
        configured source yields no key): it must let nobody in."""
        from ray import serve

        from orchestrator.serve.app import (
            ModelService,
            app_name,
            deployment_options,
            route_of,
            wait_until_running,
        )

        spec, bundle_dir = self.bundles["gpt"]
        if self.current is not None:
            shutdown(self.bundles[self.current][0])
        limits = spec.serve.model_copy(update={"api_keys_env": "ORCH_TEST_NO_KEYS",
                                               "api_keys_file": None})
        app = ModelService.options(**deployment_options(limits)).bind(
            str(bundle_dir), limits.model_dump(mode="json"), [])
        route = route_of(app_name(spec), spec)
        serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
        serve._run(app, name=app_name(spec), route_prefix=route, _blocking=False)
        wait_until_running(app_name(spec), 120)
        self.current = "gpt"
        return f"http://{spec.serve.host}:{spec.serve.port}{route}"

    def close(self) -> None:
        from ray import serve

        if self.current is not None:
            shutdown(self.bundles[self.current][0])
        serve.shutdown()  # later modules start Serve on ports of their own


@pytest.fixture(scope="module")
def services(ray_local, bundles) -> Iterator[Services]:
    from ray import serve

    serve.shutdown()  # a Serve left by an earlier module keeps its port and ignores ours
    services = Services(bundles)
    yield services
    services.close()


@pytest.fixture(scope="module")
def gpt_url(services: Services) -> str:
    return services.url("gpt")


@pytest.fixture(scope="module")
def classifier_url(services: Services) -> str:
    return services.url("classifier")


@pytest.fixture()
def client(gpt_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gpt_url}/v1", api_key=API_KEYS[1], max_retries=0,
                         timeout=TIMEOUT_S)


AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


def post(url: str, route: str, body: Any, headers: dict[str, str] | None = AUTH,
         **kwargs: Any) -> requests.Response:
    return requests.post(f"{url}{route}", json=body, headers=headers, timeout=TIMEOUT_S, **kwargs)


def assert_error(response: requests.Response, status: int, param: Any = ...) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    if param is not ...:
        assert body["error"]["param"] == param, body
    return body["error"]


# --- language model: the openai client --------------------------------------------------------

def complete(url: str, **body: Any) -> dict:
    response = post(url, "/v1/completions", {"model": GPT_NAME, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_healthz_needs_no_key(gpt_url: str) -> None:
    health = requests.get(f"{gpt_url}/healthz", timeout=TIMEOUT_S).json()
    assert health["status"] == "ok" and health["model"] == GPT_NAME and health["version"]


def test_openai_client_lists_the_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [GPT_NAME]
    assert client.models.retrieve(GPT_NAME).id == GPT_NAME


def test_openai_client_completion(client: openai.OpenAI) -> None:
    result = client.completions.create(model=GPT_NAME, prompt="The event loop", max_tokens=8,
                                       temperature=0.8, top_p=0.9, seed=3)
    assert result.object == "text_completion" and result.model == GPT_NAME
    [choice] = result.choices
    assert isinstance(choice.text, str) and choice.index == 0
    assert choice.finish_reason in ("length", "stop")
    assert result.usage.prompt_tokens >= 2
    assert 1 <= result.usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_openai_client_streaming_matches_the_whole_answer(client: openai.OpenAI) -> None:
    """Streamed chunks add up to the same text and usage as the same request without stream."""
    args = {"model": GPT_NAME, "prompt": ["Return the number of", "Create a"], "n": 2,
            "max_tokens": 10, "temperature": 1.0, "seed": 11}
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True,
                                            stream_options={"include_usage": True}))
    texts, finishes = [""] * 4, [None] * 4
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.text
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [choice.text for choice in sorted(whole.choices, key=lambda c: c.index)]
    assert finishes == [choice.finish_reason for choice in sorted(whole.choices,
                                                                  key=lambda c: c.index)]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len(chunks) > 5  # streamed token by token, not in one piece


def test_raw_stream_is_server_sent_events(gpt_url: str) -> None:
    response = post(gpt_url, "/v1/completions", {"model": GPT_NAME, "prompt": "a",
                                                 "max_tokens": 4, "stream": True}, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_n_and_prompt_lists_give_one_choice_each(gpt_url: str) -> None:
    out = complete(gpt_url, prompt=["a b", "c"], n=2, max_tokens=3, seed=5, temperature=1.0)
    assert sorted(choice["index"] for choice in out["choices"]) == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] <= 4 * 3


def test_greedy_is_deterministic_and_top_k_1_is_greedy(gpt_url: str) -> None:
    greedy = complete(gpt_url, prompt="Return the number of", max_tokens=10, temperature=0)
    again = complete(gpt_url, prompt="Return the number of", max_tokens=10, temperature=0)
    top1 = complete(gpt_url, prompt="Return the number of", max_tokens=10, temperature=1.0,
                    top_k=1, seed=9)
    assert greedy["choices"] == again["choices"] == top1["choices"]


def test_ignore_eos_gives_exactly_max_tokens_for_every_choice(gpt_url: str) -> None:
    out = complete(gpt_url, prompt=["The event loop", "A"], n=2, max_tokens=9, temperature=1.0,
                   seed=4, ignore_eos=True)
    assert [choice["finish_reason"] for choice in out["choices"]] == ["length"] * 4
    assert out["usage"]["completion_tokens"] == 4 * 9


def test_unseeded_sampling_varies(gpt_url: str) -> None:
    texts = {complete(gpt_url, prompt="Create a new", max_tokens=MAX_NEW_TOKENS,
                      temperature=1.0)["choices"][0]["text"] for _ in range(4)}
    assert len(texts) > 1


def test_seeded_requests_batched_together_match_alone(gpt_url: str) -> None:
    """A request's seed alone decides its sample, whatever else shares its batch."""
    bodies = [{"prompt": "The event loop" + " x" * seed, "max_tokens": 6 + seed % 3,
               "temperature": 1.0, "seed": seed} for seed in range(6)]
    alone = [complete(gpt_url, **body)["choices"] for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: complete(gpt_url, **body)["choices"], bodies))
    assert together == alone


def test_stop_string_ends_the_text_before_it(gpt_url: str) -> None:
    free = complete(gpt_url, prompt="The", max_tokens=MAX_NEW_TOKENS, temperature=0)
    text = free["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"the greedy text {text!r} is too short to cut"
    stopped = complete(gpt_url, prompt="The", max_tokens=MAX_NEW_TOKENS, temperature=0,
                       stop=[stop, "never-produced-xyz"])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stop not in stopped["text"] and text.startswith(stopped["text"])
    assert text.index(stop) == len(stopped["text"])


def test_openai_client_raises_on_bad_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="a")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=GPT_NAME, prompt="a", temperature=-1)
    assert bad.value.body["param"] == "temperature"
    assert client.completions.create(model=GPT_NAME, prompt="a", max_tokens=2).choices


# --- language model: bad requests --------------------------------------------------------------

GOOD = {"model": GPT_NAME, "prompt": "The event loop", "max_tokens": 4, "temperature": 0}
LONG_PROMPT = " ".join(["event"] * (MAX_PROMPT_TOKENS + 5))


@pytest.mark.parametrize(("request_kwargs", "status", "param"), [
    pytest.param({"data": "{prompt: 1}", "headers": {"content-type": "application/json", **AUTH}},
                 400, None, id="malformed-json"),
    pytest.param({"json": {"model": GPT_NAME}}, 400, "prompt", id="missing-prompt"),
    pytest.param({"json": {"prompt": "a"}}, 400, "model", id="missing-model"),
    pytest.param({"json": {**GOOD, "model": "gpt-9"}}, 404, "model", id="unknown-model"),
    pytest.param({"json": {**GOOD, "prompt": []}}, 400, "prompt", id="empty-prompt-list"),
    pytest.param({"json": {**GOOD, "prompt": 7}}, 400, "prompt", id="prompt-not-text"),
    pytest.param({"json": {**GOOD, "prompt": ["a"] * (MAX_INPUTS + 1)}}, 400, "n",
                 id="too-many-prompts"),
    pytest.param({"json": {**GOOD, "n": MAX_INPUTS + 1}}, 400, "n", id="n-over-cap"),
    pytest.param({"json": {**GOOD, "n": 0}}, 400, "n", id="n-zero"),
    pytest.param({"json": {**GOOD, "prompt": LONG_PROMPT}}, 400, "prompt", id="prompt-over-cap"),
    pytest.param({"json": {**GOOD, "max_tokens": MAX_NEW_TOKENS + 1}}, 400, "max_tokens",
                 id="max-tokens-over-cap"),
    pytest.param({"json": {**GOOD, "max_tokens": 0}}, 400, "max_tokens", id="max-tokens-zero"),
    pytest.param({"json": {**GOOD, "max_tokens": "ten"}}, 400, "max_tokens",
                 id="max-tokens-not-int"),
    pytest.param({"json": {**GOOD, "temperature": -0.1}}, 400, "temperature",
                 id="negative-temperature"),
    pytest.param({"json": {**GOOD, "temperature": "hot"}}, 400, "temperature",
                 id="temperature-not-number"),
    pytest.param({"json": {**GOOD, "top_p": 0}}, 400, "top_p", id="top-p-zero"),
    pytest.param({"json": {**GOOD, "top_p": 1.5}}, 400, "top_p", id="top-p-over-one"),
    pytest.param({"json": {**GOOD, "top_k": -1}}, 400, "top_k", id="negative-top-k"),
    pytest.param({"json": {**GOOD, "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop",
                 id="five-stop-strings"),
    pytest.param({"json": {**GOOD, "seed": 2**64}}, 400, "seed", id="seed-too-large"),
    pytest.param({"json": {**GOOD, "logit_bias": {"5": 1}}}, 400, "logit_bias",
                 id="unsupported-param"),
    pytest.param({"json": {**GOOD, "logprobs": 6}}, 400, "logprobs", id="logprobs-over-five"),
    pytest.param({"json": {**GOOD, "echo": "yes"}}, 400, "echo", id="echo-not-bool"),
    pytest.param({"json": {**GOOD, "ignore_eos": 1}}, 400, "ignore_eos", id="ignore-eos-not-bool"),
    pytest.param({"json": {**GOOD, "presence_penalty": 2.5}}, 400, "presence_penalty",
                 id="presence-penalty-over-two"),
    pytest.param({"json": {**GOOD, "frequency_penalty": -3.0}}, 400, "frequency_penalty",
                 id="frequency-penalty-under-minus-two"),
    pytest.param({"json": {**GOOD, "stop": "x" * 65}}, 400, "stop", id="stop-string-too-long"),
    pytest.param({"json": {**GOOD, "prompt": [1, 2, 10**6]}}, 400, "prompt",
                 id="token-id-outside-vocab"),
    pytest.param({"json": {**GOOD, "prompt": [[1, 2], []]}}, 400, "prompt",
                 id="empty-token-id-prompt"),
    pytest.param({"json": {**GOOD, "prompt": "word " * 5000}}, 400, "prompt",
                 id="prompt-far-over-cap"),
    pytest.param({"json": ["a", "b"]}, 400, ..., id="body-not-an-object"),
])
def test_bad_completion_request(gpt_url: str, request_kwargs: dict, status: int,
                                param: Any) -> None:
    kwargs = {"headers": AUTH, **request_kwargs}
    response = requests.post(f"{gpt_url}/v1/completions", timeout=TIMEOUT_S, **kwargs)
    assert_error(response, status, param)
    assert complete(gpt_url, **GOOD)["choices"][0]["finish_reason"] in ("length", "stop")


def test_prompt_and_max_tokens_beyond_the_context_is_refused(gpt_url: str) -> None:
    """Learned positions end at the context: prompt + max_tokens must fit, as with OpenAI."""
    words, prompt_tokens = [], 0
    while prompt_tokens <= CONTEXT - MAX_NEW_TOKENS:
        words.append(f"word{len(words)}")
        prompt_tokens = complete(gpt_url, **{**GOOD, "prompt": " ".join(words),
                                             "max_tokens": 1})["usage"]["prompt_tokens"]
    assert prompt_tokens <= MAX_PROMPT_TOKENS, "the prompt grew past the cap in one word"
    response = post(gpt_url, "/v1/completions", {**GOOD, "prompt": " ".join(words),
                                                 "max_tokens": MAX_NEW_TOKENS})
    assert assert_error(response, 400, "max_tokens")["code"] == "context_length_exceeded"
    fitting = CONTEXT - prompt_tokens
    assert complete(gpt_url, **{**GOOD, "prompt": " ".join(words), "max_tokens": fitting})


def test_bad_request_does_not_fail_its_batch(gpt_url: str) -> None:
    """Good requests sent alongside bad ones (possibly in the same batch) still succeed."""
    good = [{**GOOD, "prompt": f"Return {i}", "seed": i} for i in range(4)]
    bad = [{**GOOD, "prompt": "Return 9", "top_p": 2.0} for _ in range(4)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: post(gpt_url, "/v1/completions", body),
                                  good + bad))
    assert [r.status_code for r in responses[:4]] == [200] * 4
    for response in responses[4:]:
        assert_error(response, 400, "top_p")


def test_client_disconnecting_mid_stream_leaves_the_service_serving(gpt_url: str) -> None:
    body = {**GOOD, "max_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "stream": True}
    for _ in range(3):
        with post(gpt_url, "/v1/completions", body, stream=True) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line)
            assert first.startswith(b"data: ")
        # Leaving the block closes the connection with the stream unfinished.
    assert complete(gpt_url, **GOOD)["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("bad", [
    pytest.param({"temperature": 1e-46}, id="temperature-underflows"),
    pytest.param({"temperature": 5e-324}, id="temperature-subnormal"),
    pytest.param({"top_k": 9223372036854775808}, id="top-k-past-int64"),
    pytest.param({"top_k": 2**70, "temperature": 1e-30, "top_p": 1e-300}, id="all-at-once"),
    pytest.param({"presence_penalty": -2.0, "frequency_penalty": -2.0, "temperature": 2.0},
                 id="penalties-at-the-edge"),
    pytest.param({"stop": ["\ufffd", "x" * 64, "", "a"]}, id="refused-stop"),
    pytest.param({"max_tokens": 0}, id="max-tokens-zero-without-echo"),
    pytest.param({"prompt": [10**9]}, id="token-id-outside-vocab"),
    pytest.param({"prompt": "abc \ud800 def"}, id="lone-surrogate"),
])
def test_a_bad_request_among_concurrent_good_ones_fails_no_good_one(gpt_url: str,
                                                                    bad: dict) -> None:
    """1 bad request among 10 good ones in flight: 0 good requests fail, and the bad one gets
    an answer (sampled safely) or its own JSON error."""
    good = [{**GOOD, "prompt": f"Return {i}", "max_tokens": MAX_NEW_TOKENS, "temperature": 0.9,
             "seed": i} for i in range(10)]
    alone = [complete(gpt_url, **body)["choices"] for body in good]
    bodies = good[:5] + [{**GOOD, "max_tokens": MAX_NEW_TOKENS, **bad}] + good[5:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(gpt_url, "/v1/completions", body), bodies))
    outcome = responses.pop(5)
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    assert [r.json()["choices"] for r in responses] == alone  # seeded: untouched by the bad one
    if outcome.status_code != 200:
        assert_error(outcome, 400)


def test_a_cancelled_caller_in_a_shared_batch_leaves_the_others_whole(gpt_url: str) -> None:
    """Callers that disconnect mid-stream while sharing the batch with good requests."""
    good = [{**GOOD, "prompt": f"Create {i}", "max_tokens": MAX_NEW_TOKENS, "temperature": 0.9,
             "seed": 20 + i} for i in range(6)]
    alone = [complete(gpt_url, **body)["choices"] for body in good]

    def leave_early(_: int) -> None:
        body = {**GOOD, "max_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "stream": True}
        with post(gpt_url, "/v1/completions", body, stream=True) as response:
            next(line for line in response.iter_lines() if line)

    with ThreadPoolExecutor(10) as pool:
        leaving = [pool.submit(leave_early, i) for i in range(4)]
        together = list(pool.map(lambda body: complete(gpt_url, **body)["choices"], good))
        for future in leaving:
            future.result()
    assert together == alone


def test_logprobs_and_echo_through_the_openai_client(client: openai.OpenAI) -> None:
    result = client.completions.create(model=GPT_NAME, prompt="The event loop", max_tokens=6,
                                       temperature=0, logprobs=3, echo=True)
    [choice] = result.choices
    assert choice.text.startswith("The event loop")
    logprobs = choice.logprobs
    n = len(logprobs.tokens)
    assert n == result.usage.prompt_tokens + result.usage.completion_tokens
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    # Greedy: each generated token is its position's most likely one.
    for lp, top in zip(logprobs.token_logprobs[-6:], logprobs.top_logprobs[-6:]):
        assert lp == pytest.approx(max(top.values()))


def test_prompt_scoring_equals_the_evaluate_stage_loss(client: openai.OpenAI, gpt_url: str,
                                                      bundles) -> None:
    """echo + logprobs + max_tokens 0, as evaluation harnesses score a text; text and token-id
    prompts alike, against the loss the evaluate stage computes offline for the same tokens."""
    import numpy as np

    from orchestrator.evaluate import ScoreBatch

    texts = ["Return the number of items in the list.", "Create a new event loop."]
    ids = [post(gpt_url, "/tokenize", {"prompt": text}).json()["tokens"] for text in texts]
    scored_text = client.completions.create(model=GPT_NAME, prompt=texts, max_tokens=0, echo=True,
                                            logprobs=1)
    scored_ids = client.completions.create(model=GPT_NAME, prompt=ids, max_tokens=0, echo=True,
                                           logprobs=0)
    _, bundle_dir = bundles["gpt"]
    scorer = ScoreBatch(str(bundle_dir), np.zeros(512))
    for index, (text, token_ids) in enumerate(zip(texts, ids)):
        by_text = next(c for c in scored_text.choices if c.index == index)
        by_ids = next(c for c in scored_ids.choices if c.index == index)
        assert by_text.text == text and by_ids.text == text
        assert by_text.finish_reason == "length"
        nll = float(scorer({"ids": np.array([token_ids]), "split": np.array(["x"])})["nll"][0])
        for choice in (by_text, by_ids):
            assert len(choice.logprobs.tokens) == len(token_ids)
            assert -sum(choice.logprobs.token_logprobs[1:]) == pytest.approx(nll, abs=1e-4)
    assert scored_text.usage.completion_tokens == 0


def test_token_id_prompts_equal_text_prompts(client: openai.OpenAI, gpt_url: str) -> None:
    ids = post(gpt_url, "/tokenize", {"prompt": "The event loop"}).json()["tokens"]
    by_text = client.completions.create(model=GPT_NAME, prompt="The event loop", max_tokens=6,
                                        temperature=0)
    by_ids = client.completions.create(model=GPT_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_lists = client.completions.create(model=GPT_NAME, prompt=[ids, ids], max_tokens=6,
                                         temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.text for c in by_lists.choices] == [by_text.choices[0].text] * 2


def test_penalties_are_accepted_and_change_greedy_text(client: openai.OpenAI) -> None:
    args = {"model": GPT_NAME, "prompt": "The", "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    free = client.completions.create(**args).choices[0].text
    penalized = client.completions.create(**args, presence_penalty=2.0,
                                          frequency_penalty=2.0).choices[0].text
    assert isinstance(free, str) and isinstance(penalized, str)


def test_tokenizer_endpoints(gpt_url: str) -> None:
    tokens = post(gpt_url, "/tokenize", {"prompt": "Return the number"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == CONTEXT
    text = post(gpt_url, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Return the number"
    info = requests.get(f"{gpt_url}/tokenizer_info", headers=AUTH, timeout=TIMEOUT_S).json()
    assert info["eos_token"] == "<|endoftext|>" and info["vocab_size"] == 512
    assert_error(post(gpt_url, "/detokenize", {"tokens": [10**9]}), 400, "tokens")
    assert_error(post(gpt_url, "/tokenize", {"prompt": "a"}, headers=None), 401)


def test_readme_curl_bodies_are_json_whatever_the_content_type(gpt_url: str) -> None:
    """curl -d sends application/x-www-form-urlencoded: the body is JSON all the same."""
    body = json.dumps({"model": GPT_NAME, "prompt": "Return the", "max_tokens": 3})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
        response = requests.post(f"{gpt_url}/v1/completions", data=body, headers=headers,
                                 timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text


def test_a_body_over_the_limit_gets_413_and_the_next_succeeds(gpt_url: str) -> None:
    big = {**GOOD, "prompt": "a" * 1_100_000}
    assert_error(post(gpt_url, "/v1/completions", big), 413)
    chunked = requests.post(f"{gpt_url}/v1/completions", headers=AUTH, timeout=TIMEOUT_S,
                            data=(b"x" * 65536 for _ in range(20)))  # no Content-Length
    assert_error(chunked, 413)
    assert complete(gpt_url, **GOOD)["choices"]


def test_a_full_queue_answers_503_with_retry_after(gpt_url: str) -> None:
    """max_batch_size 8 + max_queued_requests 4 per replica: a burst beyond them is refused at
    once with Retry-After, never queued without end; every admitted request succeeds."""
    body = {**GOOD, "max_tokens": MAX_NEW_TOKENS, "temperature": 1.0}
    refused = []
    for _ in range(5):  # bursts until one overflows the queue (no timing is assumed)
        with ThreadPoolExecutor(48) as pool:
            responses = list(pool.map(lambda _: post(gpt_url, "/v1/completions", body), range(48)))
        assert {r.status_code for r in responses} <= {200, 503}, {r.text for r in responses}
        refused = [r for r in responses if r.status_code == 503]
        if refused:
            break
    assert refused, "no burst filled the queue"
    for response in refused:
        assert assert_error(response, 503)["code"] == "overloaded"
        assert int(response.headers["retry-after"]) >= 1
    assert complete(gpt_url, **GOOD)["choices"]


def test_the_schema_needs_the_key_and_the_docs_page_asks_for_it(gpt_url: str) -> None:
    """A browser opening /docs sends no key: the page asks for it and sends it to fetch the
    schema (tests/serve/test_routes.py runs its script)."""
    assert_error(requests.get(f"{gpt_url}/openapi.json", timeout=TIMEOUT_S), 401)
    schema = requests.get(f"{gpt_url}/openapi.json", headers=AUTH, timeout=TIMEOUT_S).json()
    assert "/v1/completions" in schema["paths"] and schema["security"] == [{"HTTPBearer": []}]
    page = requests.get(f"{gpt_url}/docs", timeout=TIMEOUT_S)
    assert page.status_code == 200 and "requestInterceptor" in page.text


def test_classify_on_the_language_model_is_404(gpt_url: str) -> None:
    error = assert_error(post(gpt_url, "/v1/classify", {"input": ["a"]}), 404)
    assert "/v1/completions" in error["message"]


# --- API keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong-key"),
    pytest.param({"Authorization": f"Bearer {API_KEYS[0]}x"}, id="key-plus-a-char"),
    pytest.param({"Authorization": API_KEYS[0]}, id="no-bearer-scheme"),
])
def test_requests_without_a_valid_key_get_401(gpt_url: str, headers: dict) -> None:
    for route, method, body in (("/v1/completions", "post", json.dumps(GOOD)),
                                ("/v1/models", "get", None),
                                ("/v1/completions", "post", "{prompt: 1"),  # malformed: still 401
                                ("/no-such-route", "get", None)):
        response = requests.request(method, f"{gpt_url}{route}", data=body, headers=headers,
                                    timeout=TIMEOUT_S)
        error = assert_error(response, 401, None)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_every_configured_key_works(gpt_url: str) -> None:
    for key in API_KEYS:
        response = post(gpt_url, "/v1/completions", GOOD, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text


def test_openai_client_with_a_wrong_key_is_refused(gpt_url: str) -> None:
    wrong = openai.OpenAI(base_url=f"{gpt_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=GPT_NAME, prompt="a", max_tokens=2)


def test_keys_fail_closed(services: Services, bundles, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key source that yields no key refuses to deploy; a replica that requires keys but has
    none answers 401 to every keyed route, whatever key is sent. (Runs last among the language
    model's tests: it replaces the app.)"""
    from orchestrator.serve.auth import KeySourceError

    spec, bundle_dir = bundles["gpt"]
    closed = spec.model_copy(update={"serve": spec.serve.model_copy(
        update={"api_keys_env": "ORCH_TEST_NO_KEYS", "api_keys_file": None})})
    monkeypatch.setenv("ORCH_TEST_NO_KEYS", " , ,")  # "$K1,$K2" with both unset
    with pytest.raises(KeySourceError, match="no keys"):
        deploy(closed, bundle_dir)
    url = services.closed_url()
    assert requests.get(f"{url}/healthz", timeout=TIMEOUT_S).status_code == 200
    for headers in (None, AUTH, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
        assert_error(post(url, "/v1/completions", GOOD, headers=headers), 401)
        assert_error(requests.get(f"{url}/openapi.json", headers=headers, timeout=TIMEOUT_S), 401)


# --- classifier (no keys configured: open) ----------------------------------------------------

@pytest.fixture(scope="module")
def labels() -> set[str]:
    return {row["label"] for row in map(json.loads, SAMPLE.read_text().splitlines())}


def classify(url: str, texts: list[str] | str) -> list[dict]:
    response = post(url, "/v1/classify", {"input": texts}, headers=None)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == CLASSIFIER_NAME
    return body["data"]


def assert_predictions(predictions: list[dict], count: int, labels: set[str]) -> None:
    assert [p["index"] for p in predictions] == list(range(count))
    for prediction in predictions:
        assert prediction["label"] in labels
        assert set(prediction["scores"]) == labels
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert prediction["score"] == max(prediction["scores"].values())
        assert prediction["scores"][prediction["label"]] == prediction["score"]


def test_classify(classifier_url: str, labels: set[str]) -> None:
    texts = ["The event loop runs callbacks.", "Parse an XML document.", "Log a message."]
    assert_predictions(classify(classifier_url, texts), len(texts), labels)
    assert_predictions(classify(classifier_url, "One text alone."), 1, labels)


def test_classify_concurrent_requests_get_their_own_predictions(classifier_url: str,
                                                                labels: set[str]) -> None:
    """Requests batched together get back exactly their own texts' predictions."""
    requests_texts = [[f"text {i}.{j} about {word}" for j in range(1 + i % MAX_INPUTS)]
                      for i, word in enumerate(["sockets", "logging", "email", "threads",
                                                "xml", "asyncio", "ctypes", "imports"])]
    alone = [classify(classifier_url, texts) for texts in requests_texts]
    with ThreadPoolExecutor(len(requests_texts)) as pool:
        together = list(pool.map(lambda texts: classify(classifier_url, texts), requests_texts))
    for texts, got, want in zip(requests_texts, together, alone):
        assert_predictions(got, len(texts), labels)
        for one, other in zip(got, want):
            assert one["scores"] == pytest.approx(other["scores"], abs=1e-4)


@pytest.mark.parametrize(("body", "param"), [
    pytest.param({}, "input", id="missing-input"),
    pytest.param({"input": []}, "input", id="empty-list"),
    pytest.param({"input": ["ok", 3]}, "input", id="not-a-string"),
    pytest.param({"input": ["a"] * (MAX_INPUTS + 1)}, "input", id="too-many"),
    pytest.param({"input": ["fine", "  "]}, "input", id="blank-string"),
    pytest.param({"input": ["a"], "model": "other"}, "model", id="unknown-model"),
    pytest.param({"input": ["a"], "top_k": 3}, "top_k", id="unknown-field"),
    pytest.param({"input": "abc \ud800 def"}, "input", id="lone-surrogate"),
])
def test_bad_classify_request(classifier_url: str, body: dict, param: str) -> None:
    response = post(classifier_url, "/v1/classify", body, headers=None)
    assert_error(response, 404 if param == "model" else 400, param)
    assert classify(classifier_url, ["Return the number of items."])


def test_a_bad_classify_request_among_concurrent_good_ones_fails_no_good_one(
        classifier_url: str, labels: set[str]) -> None:
    """1 bad request among 10 good ones in flight, three times: the bad one gets its 400 and the
    good ones their predictions (before: 3, 7 and 7 of the 10 good ones got 500, as Serve sets a
    batch's error on every request in it)."""
    good = [[f"text {i} about {word}"] for i, word in enumerate(
        ["sockets", "logging", "email", "threads", "xml", "asyncio", "ctypes", "imports",
         "codecs", "json"])]
    for _ in range(3):
        bodies = [{"input": texts} for texts in good[:5]] + [{"input": ["abc \ud800 def"]}] + \
                 [{"input": texts} for texts in good[5:]]
        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(
                lambda body: post(classifier_url, "/v1/classify", body, headers=None), bodies))
        assert_error(responses.pop(5), 400, "input")
        assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
        for response in responses:
            assert_predictions(response.json()["data"], 1, labels)


def test_completions_on_the_classifier_is_404(classifier_url: str) -> None:
    response = post(classifier_url, "/v1/completions", {**GOOD, "model": CLASSIFIER_NAME},
                    headers=None)
    assert "/v1/classify" in assert_error(response, 404)["message"]


@pytest.mark.parametrize(("method", "route", "status"), [
    ("get", "/no-such-route", 404),
    ("get", "/v1/classify", 405),
    ("post", "/classify", 404),  # the pre-OpenAI routes are gone
    ("post", "/generate", 404),
])
def test_unknown_route_or_method_is_json_error(classifier_url: str, method: str, route: str,
                                               status: int) -> None:
    response = requests.request(method, f"{classifier_url}{route}", json={}, timeout=TIMEOUT_S)
    assert_error(response, status, None)
