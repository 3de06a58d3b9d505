"""The Predictor without Ray: batched KV-cache generation against the cache-less model, streaming,
sampling controls, seeds and limits, and classification.

The bundles are untrained (a freshly initialised model and a tokenizer trained on the sample
texts): the tests check the contract, not the quality of the text.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import SAMPLE, tiny_spec
from tokenizers import Tokenizer

from orchestrator.inference.predictor import (
    ChoiceUpdate,
    Decoding,
    Predictor,
    SamplingParams,
    sampling_probs,
)
from orchestrator.models import build_model
from orchestrator.records import DataInfo
from orchestrator.spec import parse_spec
from orchestrator.tokenizer import EOS, PAD, train_tokenizer
from orchestrator.weights.model import Bundle

ROWS = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
PROMPTS = ["Return the", "A", "Return a new list", "Create a new"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer((row["text"] for row in ROWS), 512)


def _bundle(family: str, tokenizer: Tokenizer, arch: str = "transformer") -> Bundle:
    spec = parse_spec(tiny_spec(family, model={"arch": arch}))
    labels = sorted(Counter(row["label"] for row in ROWS)) if family == "classifier" else []
    context_length = spec.data.block_size if family == "gpt" else spec.data.max_length
    info = DataInfo(family, tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS),
                    tokenizer.token_to_id(PAD), context_length, labels=labels)
    torch.manual_seed(0)
    model = build_model(spec, info)
    if arch == "lstm":  # large random weights, so that its next token depends on the context
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.3)
    return Bundle(spec, info, model.eval(), tokenizer, {})


@pytest.fixture(scope="module", params=["transformer", "lstm"])
def predictor(tokenizer: Tokenizer, request) -> Predictor:
    """Every language model architecture decodes through the same engine (models/decoding.py)."""
    return Predictor(_bundle("gpt", tokenizer, request.param))


def greedy_oracle(predictor: Predictor, prompt: list[int], max_tokens: int) -> str:
    """The cache-less reference: GPT.generate one prompt at a time, cut at EOS."""
    out = predictor.model.generate(torch.tensor([prompt]), max_tokens, temperature=0)
    new = out[0, len(prompt):].tolist()
    eos = predictor.info.eos_id
    return predictor.tokenizer.decode(new[: new.index(eos)] if eos in new else new)


def stream(decoding: Decoding) -> list[list[ChoiceUpdate | None]]:
    steps = []
    while not decoding.finished:
        steps.append(decoding.step())
    return steps


def test_greedy_batch_matches_cacheless_generate_and_is_deterministic(predictor: Predictor):
    prompts = [predictor.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # really left-padded
    params = [SamplingParams(max_tokens=16, temperature=0.0)] * len(prompts)
    first = predictor.complete(prompts, params)
    assert [c.text for c in first] == [greedy_oracle(predictor, p, 16) for p in prompts]
    assert predictor.complete(prompts, params) == first
    assert all(c.finish_reason == "length" and c.completion_tokens == 16 for c in first)


def test_streamed_updates_concatenate_to_the_completion(predictor: Predictor):
    prompts = [predictor.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_tokens=20, temperature=0.0),
              SamplingParams(max_tokens=12, temperature=1.0, seed=3),
              SamplingParams(max_tokens=17, temperature=0.8, top_p=0.9, seed=4, stop=("zz", "e t")),
              SamplingParams(max_tokens=9, temperature=1.0, top_k=40, seed=5)]
    steps = stream(predictor.start(prompts, params))
    completions = predictor.complete(prompts, params)
    assert completions[0].text == greedy_oracle(predictor, prompts[0], 20)
    for row, (completion, p) in enumerate(zip(completions, params)):
        updates = [step[row] for step in steps]
        live = [u for u in updates if u is not None]
        assert updates[:len(live)] == live  # None only once the row has finished
        assert "".join(u.text for u in live) == completion.text
        assert [u.finish_reason for u in live[:-1]] == [None] * (len(live) - 1)
        assert live[-1].finish_reason == completion.finish_reason
        assert live[-1].completion_tokens == completion.completion_tokens <= p.max_tokens
        if not p.stop:  # an unfinished character is held back until its last byte arrives
            assert not any(u.text.endswith("\ufffd") for u in live[:-1])
    # Sampled stray bytes left a character unfinished at the end of some step: that case ran.
    assert any("\ufffd" in c.text for c in completions[1:])


def test_same_seed_gives_the_same_text_whatever_shares_the_batch(predictor: Predictor):
    prompts = [predictor.encode(p) for p in PROMPTS]
    mine = SamplingParams(max_tokens=15, temperature=1.0, seed=7)
    alone = predictor.complete(prompts[:1], [mine])[0]
    crowd = predictor.complete(prompts, [mine, SamplingParams(15, 1.0, seed=8),
                                         SamplingParams(5, 0.0), SamplingParams(15, 0.7, top_k=5)])
    assert crowd[0] == alone
    other_seed = predictor.complete(prompts[:1], [SamplingParams(15, 1.0, seed=8)])[0]
    assert other_seed.text != alone.text


def test_each_row_gets_its_own_max_tokens(predictor: Predictor):
    prompts = [predictor.encode(p) for p in PROMPTS[:3]]
    limits = [3, 11, 7]
    decoding = predictor.start(prompts, [SamplingParams(m, temperature=0.0) for m in limits])
    steps = stream(decoding)
    assert len(steps) == max(limits)
    completions = predictor.complete(prompts, [SamplingParams(m, temperature=0.0) for m in limits])
    for row, (limit, completion) in enumerate(zip(limits, completions)):
        assert sum(step[row] is not None for step in steps) == limit
        assert (completion.finish_reason, completion.completion_tokens) == ("length", limit)
        assert completion.text == greedy_oracle(predictor, prompts[row], limit)
    sampled = predictor.complete(prompts, [SamplingParams(m, 1.0, seed=1) for m in limits])
    for limit, completion in zip(limits, sampled):  # EOS may come first when sampling
        assert completion.completion_tokens == limit or completion.finish_reason == "stop"
        assert completion.completion_tokens <= limit


def test_stop_string_ends_generation_before_it(predictor: Predictor):
    prompt = predictor.encode(PROMPTS[0])
    free = predictor.complete([prompt], [SamplingParams(20, temperature=0.0)])[0].text
    # Three characters across a word boundary, so across tokens: the first must be held back.
    stop = next(free[k:k + 3] for k in range(1, len(free))
                if free[k + 1:k + 3].startswith(" ") and free.index(free[k:k + 3]) > 0)
    params = SamplingParams(20, temperature=0.0, stop=("never seen", stop))
    steps = stream(predictor.start([prompt], [params]))
    completion = predictor.complete([prompt], [params])[0]
    assert completion.text == free[:free.index(stop)]
    assert stop not in completion.text and completion.finish_reason == "stop"
    assert completion.completion_tokens < 20
    assert all(stop not in step[0].text for step in steps)


def test_eos_ends_generation_and_is_not_in_the_text(predictor: Predictor):
    """EOS is whichever id the Decoding is told: here the first new token greedy decoding picks."""
    prompt = predictor.encode(PROMPTS[0])
    greedy = predictor.model.generate(torch.tensor([prompt]), 20, temperature=0)[0, len(prompt):].tolist()
    first_change = next(i for i, token in enumerate(greedy) if token != greedy[0])
    steps = stream(Decoding(predictor.model, predictor.tokenizer, greedy[first_change], [prompt],
                            [SamplingParams(20, temperature=0.0)]))
    assert len(steps) == first_change + 1
    assert (steps[-1][0].finish_reason, steps[-1][0].completion_tokens) == ("stop", first_change)
    text = "".join(step[0].text for step in steps)
    assert text == predictor.tokenizer.decode(greedy[:first_change])


def test_top_k_1_and_a_tiny_top_p_equal_greedy(predictor: Predictor):
    prompts = [predictor.encode(p) for p in PROMPTS]
    greedy = predictor.complete(prompts, [SamplingParams(16, temperature=0.0)] * 4)
    top_k = predictor.complete(prompts, [SamplingParams(16, 1.5, top_k=1, seed=s) for s in range(4)])
    top_p = predictor.complete(prompts, [SamplingParams(16, 1.5, top_p=1e-6) for _ in range(4)])
    assert top_k == greedy and top_p == greedy
    sampled = predictor.complete(prompts, [SamplingParams(16, 1.5, seed=s) for s in range(4)])
    assert sampled != greedy


def test_sampling_probs_temperature_top_k_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4, 1)
    probs = sampling_probs(logits, [SamplingParams(1), SamplingParams(1, top_p=0.8),
                                    SamplingParams(1, top_k=3), SamplingParams(1, 0.5, top_p=0.9)])
    assert torch.allclose(probs[0], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(probs[1], torch.tensor([0.625, 0.375, 0.0, 0.0]))  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(probs[2], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    # Temperature 0.5 squares the probabilities: 0.685, 0.247, 0.062, 0.007; the top two reach 0.9.
    assert torch.allclose(probs[3], torch.tensor([0.25, 0.09, 0.0, 0.0]) / 0.34)


def test_too_long_prompts_and_bad_params_are_refused(predictor: Predictor):
    assert predictor.context_length == 32
    with pytest.raises(ValueError, match="30 tokens \\+ max_tokens 3 = 33 exceeds the context length 32"):
        predictor.start([[5] * 4, [5] * 30], [SamplingParams(20), SamplingParams(3)])
    assert predictor.complete([[5] * 30], [SamplingParams(2, 0.0)])[0].completion_tokens <= 2
    for bad in ({"max_tokens": -1}, {"max_tokens": 4, "top_p": 0.0},
                {"max_tokens": 4, "temperature": float("nan")}, {"max_tokens": 4, "logprobs": 6},
                {"max_tokens": 4, "presence_penalty": float("inf")}, {"max_tokens": 4, "temperature": -1},
                {"max_tokens": 4, "top_k": -1}, {"max_tokens": 4, "stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(4, stop=["a"]).stop == ("a",)  # type: ignore[arg-type]  # a list from JSON
    assert predictor.encode("") == [predictor.info.eos_id]


def test_classify_gives_each_class_a_probability(tokenizer: Tokenizer):
    classifier = Predictor(_bundle("classifier", tokenizer))
    results = classifier.classify([row["text"] for row in ROWS[:3]])
    assert len(results) == 3
    for result in results:
        assert set(result["scores"]) == set(classifier.info.labels)
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == max(result["scores"], key=result["scores"].get)
        assert result["score"] == result["scores"][result["label"]]
