"""The model families: shapes, causality, tying, padding, that they can learn, and that KV-cache
decoding computes what the cache-less model does."""

from __future__ import annotations

import pytest
import torch

from orchestrator.models import GPT, TextClassifier, build_model


def test_gpt_shapes_tying_and_causality():
    torch.manual_seed(0)
    model = GPT(vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=16, dropout=0.0).eval()
    ids = torch.randint(0, 50, (3, 8))
    logits = model(ids)
    assert logits.shape == (3, 8, 50)
    assert model.lm_head.weight is model.wte.weight
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    assert torch.allclose(model(changed)[:, :-1], logits[:, :-1], atol=1e-5)  # no peeking ahead


def test_gpt_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = GPT(vocab_size=10, block_size=9, n_layer=1, n_head=2, d_model=32, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.arange(10).repeat(4, 1)
    for _ in range(60):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    out = model.eval().generate(ids[:1, :3], max_new_tokens=4, temperature=0)
    assert out[0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def _random_gpt(block_size: int = 32) -> GPT:
    """A small GPT with large random weights, so that its next token depends on the context."""
    torch.manual_seed(0)
    model = GPT(vocab_size=64, block_size=block_size, n_layer=2, n_head=2, d_model=32, dropout=0.0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


@torch.no_grad()
def test_kv_cache_decoding_matches_cacheless_model():
    model = _random_gpt()
    prompt = torch.randint(0, 64, (1, 5))
    expected = model.generate(prompt, max_new_tokens=20, temperature=0)
    cache = model.new_cache(1, 25, torch.zeros(1, dtype=torch.long))
    logits = model(prompt, cache)
    assert torch.allclose(logits, model(prompt), atol=1e-5)
    ids = prompt
    for _ in range(20):
        next_id = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        logits = model(next_id, cache)
        assert logits.shape == (1, 1, 64)
        assert torch.allclose(logits[:, -1], model(ids)[:, -1], atol=1e-5)
    assert ids.tolist() == expected.tolist()

    # Teacher-forced random tokens too, where every step's context differs.
    tokens = torch.randint(0, 64, (2, 32))
    cache = model.new_cache(2, 32, torch.zeros(2, dtype=torch.long))
    steps = [model(tokens[:, :8], cache)] + [model(tokens[:, [i]], cache) for i in range(8, 32)]
    assert torch.allclose(torch.cat(steps, dim=1), model(tokens), atol=1e-5)
    with pytest.raises(ValueError, match="overflow the cache"):
        model(tokens[:, :1], cache)


@torch.no_grad()
def test_kv_cache_refuses_positions_past_block_size():
    model = _random_gpt(block_size=8)
    cache = model.new_cache(2, 12, torch.tensor([4, 0]))
    model(torch.randint(0, 64, (2, 8)), cache)  # row 1 fills positions 0..7, row 0 only 0..3
    with pytest.raises(ValueError, match="position 8 is past block_size 8"):
        model(torch.randint(0, 64, (2, 1)), cache)
    cache.keep(torch.tensor([0]))  # without the full row, there is room again
    assert model(torch.randint(0, 64, (1, 1)), cache).shape == (1, 1, 64)


@torch.no_grad()
def test_left_padded_batch_decodes_each_row_as_alone():
    model = _random_gpt()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 9, 6)]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=12, temperature=0)[0, len(p):].tolist()
             for p in prompts]
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    cache = model.new_cache(3, width + 12, pad)
    logits = model(torch.tensor([[0] * (width - len(p)) + p for p in prompts]), cache)
    assert not logits.isnan().any()  # padding queries attend to themselves, never to nothing
    rows, out = [0, 1, 2], [[], [], []]
    for step in range(12):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        for row, token in zip(rows, next_ids[:, 0].tolist()):
            out[row].append(token)
        if step == 4:  # the middle row leaves the batch; the others must not notice
            cache.keep(torch.tensor([0, 2]))
            rows, next_ids = [0, 2], next_ids[[0, 2]]
        logits = model(next_ids, cache)
    assert out[0] == alone[0] and out[2] == alone[2]
    assert out[1] == alone[1][:5]
    assert len({tuple(a) for a in alone}) == 3


def test_classifier_ignores_padding():
    torch.manual_seed(0)
    model = TextClassifier(vocab_size=30, num_classes=3, max_length=12, pad_id=0, n_layer=1,
                           n_head=2, d_model=16, dropout=0.0).eval()
    short = torch.tensor([[5, 6, 7, 0, 0, 0]])
    longer_pad = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert model(short).shape == (1, 3)
    assert torch.allclose(model(short), model(longer_pad), atol=1e-5)


def test_build_model_from_spec():
    from orchestrator.records import DataInfo
    from orchestrator.spec import parse_spec

    raw = {"data": {"path": "x.jsonl", "label_column": "label"},
           "model": {"family": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16}}
    gpt = build_model(parse_spec(raw), DataInfo("gpt", 40, 0, 1, context_length=8))
    assert isinstance(gpt, GPT) and gpt.block_size == 8
    raw["model"]["family"] = "classifier"
    clf = build_model(parse_spec(raw), DataInfo("classifier", 40, 0, 1, context_length=20,
                                                labels=["a", "b", "c", "d"]))
    assert isinstance(clf, TextClassifier) and clf.head.out_features == 4 and clf.max_length == 20
