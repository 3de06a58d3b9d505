"""The model families: shapes, causality, tying, padding, and that they can learn."""

from __future__ import annotations

import torch

from orchestrator.models import GPT, TextClassifier, build_model
from orchestrator.spec import ModelSpec


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


def test_classifier_ignores_padding():
    torch.manual_seed(0)
    model = TextClassifier(vocab_size=30, num_classes=3, max_length=12, pad_id=0, n_layer=1,
                           n_head=2, d_model=16, dropout=0.0).eval()
    short = torch.tensor([[5, 6, 7, 0, 0, 0]])
    longer_pad = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert model(short).shape == (1, 3)
    assert torch.allclose(model(short), model(longer_pad), atol=1e-5)


def test_build_model_from_spec():
    gpt = build_model(ModelSpec(family="gpt", n_layer=1, n_head=2, d_model=16), 40, 9, 1)
    assert isinstance(gpt, GPT) and gpt.block_size == 8
    clf = build_model(ModelSpec(family="classifier", n_layer=1, n_head=2, d_model=16), 40, 20,
                      1, num_classes=4)
    assert isinstance(clf, TextClassifier) and clf.head.out_features == 4
