"""The continuous-batching engine without Ray or HTTP: admission into a running batch,
retirement, cancellation mid-decode, a poisoned row among good rows, seeds, logprobs and prompt
scoring (against the evaluate stage's own loss), penalties, and the async driver's bounded queue.

The model is freshly initialised (no training): the tests check the contract, not the text.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE, tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.bench.bundles import initial_bundle
from orchestrator.evaluate import ScoreBatch
from orchestrator.inference.engine import (
    _UNICODE_TO_BYTE,
    AsyncEngine,
    Engine,
    QueueFull,
    RequestOutput,
    text_offsets,
)
from orchestrator.inference.sampling import SamplingParams
from orchestrator.spec import parse_spec
from orchestrator.weights.model import Bundle, load_bundle

PROMPTS = ["Return the", "A", "Return a new list of", "Create a new"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    torch.manual_seed(0)
    return initial_bundle(tmp_path_factory.mktemp("engine") / "bundle",
                          parse_spec(tiny_spec("gpt")), rows)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


def engine_of(bundle: Bundle, max_batch_size: int = 8, model: torch.nn.Module | None = None) -> Engine:
    return Engine(model or bundle.model, bundle.tokenizer, bundle.info.eos_id, max_batch_size)


def encode(bundle: Bundle, text: str) -> list[int]:
    return bundle.tokenizer.encode(text).ids


class Collector:
    """Steps an engine and gathers each request's text, finish, error and logprobs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.text: dict = {}
        self.finish: dict = {}
        self.errors: dict = {}
        self.logprobs: dict = {}
        self.prompt_logprobs: dict = {}
        self.steps = 0

    def add(self, rid, text_or_ids, params: SamplingParams, bundle: Bundle) -> None:
        ids = encode(bundle, text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        self.engine.add(rid, [ids], [params])
        self.text[rid] = ""

    def step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        self.steps += 1
        for out in outputs:
            for _, update in out.updates:
                self.text[out.request_id] += update.text
                self.logprobs.setdefault(out.request_id, []).extend(update.logprobs)
                if update.prompt_logprobs is not None:
                    self.prompt_logprobs[out.request_id] = update.prompt_logprobs
                if update.finish_reason:
                    self.finish[out.request_id] = update.finish_reason
            if out.error is not None:
                self.errors[out.request_id] = out.error
        return outputs

    def run(self, limit: int = 200) -> None:
        while self.engine.has_work and limit:
            self.step()
            limit -= 1


def alone(bundle: Bundle, prompt: str, params: SamplingParams) -> str:
    collector = Collector(engine_of(bundle))
    collector.add(0, prompt, params, bundle)
    collector.run()
    return collector.text[0]


def test_a_request_joins_a_running_batch_and_both_match_their_solo_runs(bundle: Bundle) -> None:
    engine = engine_of(bundle, max_batch_size=4)
    collector = Collector(engine)
    first, second = SamplingParams(14, 0.0), SamplingParams(10, 1.0, seed=3)
    collector.add("first", PROMPTS[0], first, bundle)
    for _ in range(3):
        collector.step()
    assert engine.num_running == 1 and "first" not in collector.finish
    # A longer prompt than the columns so far: the cache grows to the left to take it.
    collector.add("second", PROMPTS[2] + " items in the", second, bundle)
    outputs = collector.step()
    assert {out.request_id for out in outputs} == {"first", "second"}
    assert engine.num_running == 2
    collector.run()
    assert collector.text["first"] == alone(bundle, PROMPTS[0], first)
    assert collector.text["second"] == alone(bundle, PROMPTS[2] + " items in the", second)
    assert not collector.errors and not engine.has_work


def test_finished_rows_retire_and_waiting_requests_take_their_slots(bundle: Bundle) -> None:
    engine = engine_of(bundle, max_batch_size=2)
    collector = Collector(engine)
    limits = {"a": 2, "b": 9, "c": 5}
    for rid, limit in limits.items():
        collector.add(rid, PROMPTS[0], SamplingParams(limit, 0.0), bundle)
    collector.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)  # c waits for a slot
    collector.step()  # a takes its 2nd and last token and retires
    assert collector.finish == {"a": "length"} and engine.num_running == 1
    collector.step()  # c is admitted into the running batch
    assert (engine.num_running, engine.num_waiting) == (2, 0)
    collector.run()
    assert collector.finish == {"a": "length", "b": "length", "c": "length"}
    for rid, limit in limits.items():
        assert collector.text[rid] == alone(bundle, PROMPTS[0], SamplingParams(limit, 0.0))


def test_cancelling_a_row_mid_decode_leaves_the_others_untouched(bundle: Bundle) -> None:
    engine = engine_of(bundle)
    collector = Collector(engine)
    params = SamplingParams(12, 0.0)
    for rid, prompt in enumerate(PROMPTS[:3]):
        collector.add(rid, prompt, params, bundle)
    collector.step()
    collector.step()
    engine.abort(1)
    outputs = collector.step()
    [cancelled] = [out for out in outputs if out.request_id == 1]
    assert cancelled.finished and cancelled.error.code == "cancelled"
    assert engine.num_running == 2
    collector.run()
    for rid in (0, 2):
        assert collector.finish[rid] == "length"
        assert collector.text[rid] == alone(bundle, PROMPTS[rid], params)
    # A request cancelled before it was admitted leaves the queue.
    engine.add("late", [encode(bundle, "x")], [params])
    engine.abort("late")
    assert [out.error.code for out in engine.step()] == ["cancelled"] and not engine.has_work


def test_a_poisoned_row_fails_alone(bundle: Bundle) -> None:
    """Non-finite logits for one row (a NaN positional embedding that only a long prompt
    reaches), and hostile sampling values, among good rows: only the poisoned request fails."""
    poisoned_position = 12
    model = copy.deepcopy(bundle.model)
    with torch.no_grad():
        model.wpe.weight[poisoned_position] = float("nan")
    engine = engine_of(bundle, model=model)
    collector = Collector(engine)
    good = {"greedy": SamplingParams(6, 0.0), "sampled": SamplingParams(6, 0.9, seed=1),
            "tiny-temperature": SamplingParams(6, 1e-46, seed=2),
            "huge-top-k": SamplingParams(6, 1.0, top_k=2**63, seed=3)}
    for rid, params in good.items():
        collector.add(rid, "A", params, bundle)
    long_prompt = encode(bundle, " ".join(["event"] * 20))[:poisoned_position + 2]
    collector.add("poisoned", long_prompt, SamplingParams(4, 1.0, seed=4), bundle)
    collector.run()
    assert set(collector.errors) == {"poisoned"}
    assert collector.errors["poisoned"].code == "invalid_logits"
    for rid, params in good.items():
        assert collector.finish[rid] in ("length", "stop")
        assert collector.text[rid] == alone(bundle, "A", params)
    assert collector.text["tiny-temperature"] == alone(bundle, "A", SamplingParams(6, 0.0))


def test_seeded_rows_give_the_same_text_whatever_shares_the_batch(bundle: Bundle) -> None:
    mine = SamplingParams(12, 1.0, seed=7)
    solo = alone(bundle, PROMPTS[1], mine)
    engine = engine_of(bundle, max_batch_size=3)
    collector = Collector(engine)
    collector.add("other-1", PROMPTS[2], SamplingParams(9, 0.7, top_p=0.9, seed=8), bundle)
    collector.step()
    collector.add("mine", PROMPTS[1], mine, bundle)
    collector.add("other-2", PROMPTS[3], SamplingParams(3, 1.3, top_k=4), bundle)
    collector.add("other-3", PROMPTS[0], SamplingParams(5, 0.0), bundle)  # waits for a slot
    collector.run()
    assert collector.text["mine"] == solo
    assert alone(bundle, PROMPTS[1], SamplingParams(12, 1.0, seed=8)) != solo


def test_prompt_scoring_equals_the_evaluate_stage_loss(bundle: Bundle, bundle_dir: Path) -> None:
    text = "Return the number of items in the list."
    ids = encode(bundle, text)
    collector = Collector(engine_of(bundle))
    collector.add("score", ids, SamplingParams(0, prompt_logprobs=2), bundle)
    collector.add("beside", PROMPTS[0], SamplingParams(8, 0.0), bundle)  # sharing the prefill
    collector.run()
    entries = collector.prompt_logprobs["score"]
    assert collector.finish["score"] == "length" and collector.text["score"] == ""
    assert [e.token for e in entries] == [bundle.tokenizer.decode([i]) for i in ids]
    assert entries[0].logprob is None and entries[0].top is None
    assert all(len(e.top) <= 2 and e.logprob <= max(e.top.values()) + 1e-6 for e in entries[1:])
    assert [e.offset for e in entries] == [len(bundle.tokenizer.decode(ids[:j]))
                                           for j in range(len(ids))]
    scored = ScoreBatch(str(bundle_dir), np.zeros(bundle.info.vocab_size))(
        {"ids": np.array([ids]), "split": np.array(["test"])})
    assert -sum(e.logprob for e in entries[1:]) == pytest.approx(float(scored["nll"][0]), abs=1e-4)


def test_logprobs_of_generated_tokens(bundle: Bundle) -> None:
    collector = Collector(engine_of(bundle))
    collector.add(0, PROMPTS[0], SamplingParams(8, 0.0, logprobs=3), bundle)
    collector.run()
    entries = collector.logprobs[0]
    assert len(entries) == 8 and "".join(e.token for e in entries) == collector.text[0]
    for entry in entries:
        assert len(entry.top) == 3
        assert entry.logprob == pytest.approx(max(entry.top.values()))  # greedy takes the top
        assert all(math.isfinite(v) and v <= 0 for v in entry.top.values())
    assert [e.offset for e in entries] == [len("".join(x.token for x in entries[:k]))
                                           for k in range(len(entries))]


def test_presence_penalty_stops_repeats(bundle: Bundle) -> None:
    collector = Collector(engine_of(bundle))
    collector.add("free", PROMPTS[0], SamplingParams(20, 0.0), bundle)
    collector.add("penalized", PROMPTS[0], SamplingParams(20, 0.0, presence_penalty=1e4), bundle)
    collector.run()
    free = bundle.tokenizer.encode(collector.text["free"]).ids
    assert len(set(free)) < len(free), "the untrained model should repeat itself greedily"
    # Each generated token is a new one (the text re-encodes to the same ids here or fewer).
    assert collector.text["penalized"] != collector.text["free"]


def test_async_engine_bounded_queue_and_abort_on_close(bundle: Bundle) -> None:
    async def scenario() -> None:
        driver = AsyncEngine(engine_of(bundle, max_batch_size=1), max_waiting=1)
        params = [SamplingParams(6, 0.0)]
        first = driver.generate([encode(bundle, "A")], params)
        assert (await anext(first)).updates  # running
        second = driver.generate([encode(bundle, "B")], params)
        waiting = asyncio.ensure_future(anext(second))  # queued behind the first
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await anext(driver.generate([encode(bundle, "C")], params))
        await first.aclose()  # the caller leaves: its row is aborted
        out = await waiting
        assert out.request_id is not None and not out.error
        texts = [u.text for _, u in out.updates]
        async for output in second:
            texts += [u.text for _, u in output.updates]
        assert "".join(texts) == alone(bundle, "B", params[0])
        assert not driver.engine.has_work

    asyncio.run(scenario())


def test_ignore_eos_decodes_max_tokens_past_eos_beside_rows_that_stop(bundle: Bundle) -> None:
    """A model that always predicts EOS: rows that heed it stop at once, the row that ignores
    it decodes exactly max_tokens in the same batch (how the speed benchmarks time decoding)."""
    model = copy.deepcopy(bundle.model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[bundle.info.eos_id] = 1e4
    model.lm_head = head
    collector = Collector(engine_of(bundle, model=model))
    counts: dict = {}
    collector.add("heeds", PROMPTS[0], SamplingParams(7, 0.0), bundle)
    collector.add("ignores", PROMPTS[0], SamplingParams(7, 0.0, ignore_eos=True), bundle)
    collector.add("sampled", PROMPTS[1], SamplingParams(7, 1.0, seed=5), bundle)
    while collector.engine.has_work:
        for out in collector.step():
            for _, update in out.updates:
                counts[out.request_id] = update.completion_tokens
    assert collector.finish == {"heeds": "stop", "ignores": "length", "sampled": "stop"}
    assert counts == {"heeds": 0, "ignores": 7, "sampled": 0} and not collector.errors


def test_a_failed_join_fails_the_new_request_at_once_and_the_running_one_goes_on(
        bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Joining the running batch can fail (out of memory on a long prompt): the newly admitted
    request fails in that step, instead of waiting for its timeout."""
    engine = engine_of(bundle, max_batch_size=4)
    collector = Collector(engine)
    params = SamplingParams(12, 0.0)
    collector.add("running", PROMPTS[0], params, bundle)
    collector.step()
    cache_class = type(engine._cache)

    def out_of_memory(self, new, context_length):
        raise torch.OutOfMemoryError("no room for the new rows")

    monkeypatch.setattr(cache_class, "join", out_of_memory)
    collector.add("new", PROMPTS[1], params, bundle)
    collector.step()
    assert "could not join the running batch" in collector.errors["new"].message
    monkeypatch.undo()
    collector.run()
    assert collector.text["running"] == alone(bundle, PROMPTS[0], params)
    assert "running" not in collector.errors and not engine.has_work


def test_a_waiting_request_cancelled_leaves_its_twin_waiting(bundle: Bundle) -> None:
    """Waiting requests compare by identity: removing one from the queue runs no Python __eq__,
    so a request added from the event loop's thread meanwhile cannot break the removal."""
    engine = engine_of(bundle, max_batch_size=1)
    collector = Collector(engine)
    params = SamplingParams(4, 0.0)
    collector.add("busy", PROMPTS[0], params, bundle)
    collector.step()  # "busy" fills the batch; the twins wait
    for twin in ("twin-a", "twin-b"):
        collector.add(twin, PROMPTS[1], params, bundle)
    engine.abort("twin-b")
    collector.run()
    assert collector.errors["twin-b"].code == "cancelled" and "twin-a" not in collector.errors
    assert collector.text["twin-a"] == alone(bundle, PROMPTS[1], params)


def test_a_vanishing_top_p_keeps_the_top_token_beside_an_ordinary_row(bundle: Bundle) -> None:
    """top_p = 1e-46 rounds to 0 in float32 and used to drop every token (a 500)."""
    collector = Collector(engine_of(bundle))
    tiny, plain = SamplingParams(8, 1.0, top_p=1e-46, seed=1), SamplingParams(8, 0.7, seed=2)
    collector.add("tiny", PROMPTS[0], tiny, bundle)
    collector.add("plain", PROMPTS[1], plain, bundle)
    collector.run()
    assert not collector.errors
    assert collector.text["tiny"] == alone(bundle, PROMPTS[0], SamplingParams(8, 0.0))
    assert collector.text["plain"] == alone(bundle, PROMPTS[1], plain)


def byte_token_ids(bundle: Bundle, lowest: int) -> list[int]:
    """The ids of the single-byte tokens from `lowest` up (0x80: bytes no UTF-8 text starts
    with alone; put together at random they split and break characters)."""
    ids = {byte: bundle.tokenizer.token_to_id(char) for char, byte in _UNICODE_TO_BYTE.items()}
    return [ids[byte] for byte in range(lowest, 256) if ids[byte] is not None]


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_text_offsets_equal_the_decode_of_every_prefix(bundle: Bundle, data: st.DataObject) -> None:
    """Any ids, valid text or not: characters split over byte tokens, bytes no token finishes,
    EOS and padding, runs of U+FFFD."""
    texts = st.text(alphabet=st.sampled_from("aé€😀漢\ufffd \n"), max_size=12).map(
        lambda text: bundle.tokenizer.encode(text).ids)
    any_ids = st.lists(st.integers(0, bundle.info.vocab_size - 1), max_size=40)
    high_bytes = st.lists(st.sampled_from(byte_token_ids(bundle, 0x80)), max_size=40)
    ids = data.draw(st.lists(texts | any_ids | high_bytes, max_size=4).map(
        lambda parts: [token for part in parts for token in part]))
    assert text_offsets(bundle.tokenizer, ids) == [len(bundle.tokenizer.decode(ids[:j]))
                                                   for j in range(len(ids))]


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_echo_offsets_take_linear_time(bundle: Bundle) -> None:
    """Echo decoded every prompt prefix on the engine thread: n^2 / 2 ids for n tokens (2 million
    for a 2,048-token prompt); each offset now decodes a window of a few tokens."""
    tokenizer = CountingTokenizer(bundle.tokenizer)
    ids = encode(bundle, " ".join(f"word{i} é😀" for i in range(400)))[:2048]
    assert len(ids) == 2048
    offsets = text_offsets(tokenizer, ids)
    assert tokenizer.decoded < 8 * len(ids)
    assert offsets[-1] == len(bundle.tokenizer.decode(ids[:-1]))
    engine = engine_of(bundle)
    engine.tokenizer = CountingTokenizer(bundle.tokenizer)
    collector = Collector(engine)
    prompt = encode(bundle, "Return the number of items in the list of events, sorted")[:30]
    collector.add(0, prompt, SamplingParams(0, prompt_logprobs=1), bundle)
    collector.run()
    offsets = [entry.offset for entry in collector.prompt_logprobs[0]]
    assert offsets == [len(bundle.tokenizer.decode(prompt[:j])) for j in range(len(prompt))]
    assert engine.tokenizer.decoded < 8 * len(prompt)  # with n^2 / 2: 435 for these 30


def test_a_failing_step_callback_loses_no_output(bundle: Bundle) -> None:
    """Metrics are best effort: a callback that raises dropped the step's outputs, and every
    request in the batch waited for its timeout."""
    def broken_metrics(rows: int) -> None:
        raise RuntimeError("the metrics backend is down")

    async def scenario() -> tuple[str, int]:
        driver = AsyncEngine(engine_of(bundle), max_waiting=4, on_step=broken_metrics)
        params = [SamplingParams(6, 0.0)]
        texts = []
        async with asyncio.timeout(10):
            async for output in driver.generate([encode(bundle, "B")], params):
                texts += [update.text for _, update in output.updates]
        return "".join(texts), driver.on_step_failures

    text, failures = asyncio.run(scenario())
    assert text == alone(bundle, "B", SamplingParams(6, 0.0)) and failures >= 5
