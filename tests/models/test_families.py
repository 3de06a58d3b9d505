"""The families beyond the transformers: the LSTM language model (and its recurrent-state
decoding cache), the bidirectional-LSTM and bag-of-n-grams classifiers, and the registry that
builds every (task, architecture) pair from a spec and the data info."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.models import (
    GPT,
    REGISTRY,
    BagOfNgrams,
    LinearNgrams,
    LSTMClassifier,
    LSTMLanguageModel,
    TextClassifier,
    build_model,
)
from orchestrator.records import DataInfo
from orchestrator.spec import ARCHS, SpecError, parse_spec

EXPECTED = {("gpt", "transformer"): GPT, ("gpt", "lstm"): LSTMLanguageModel,
            ("classifier", "transformer"): TextClassifier, ("classifier", "lstm"): LSTMClassifier,
            ("classifier", "bow"): BagOfNgrams, ("classifier", "linear"): LinearNgrams}


def _spec(family: str, arch: str, **model):
    return parse_spec({"data": {"path": "x.jsonl", "label_column": "label"},
                       "model": {"family": family, "arch": arch, "n_layer": 1, "n_head": 2,
                                 "d_model": 16, "lstm": {"d_model": 24},
                                 "bow": {"d_model": 12, "buckets": 128},
                                 "linear": {"buckets": 128}, **model}})


@pytest.mark.parametrize("family,arch", sorted(EXPECTED))
def test_registry_builds_every_family_from_spec_and_info(family, arch):
    assert set(REGISTRY) == {(f, a) for f, archs in ARCHS.items() for a in archs}
    info = DataInfo(family, 40, 0, 1, context_length=12,
                    labels=["a", "b", "c"] if family == "classifier" else [])
    model = build_model(_spec(family, arch), info).eval()
    assert type(model) is EXPECTED[(family, arch)]
    ids = torch.randint(2, 40, (3, 12))
    out = model(ids)
    assert out.shape == ((3, 12, 40) if family == "gpt" else (3, 3))
    with pytest.raises(ValueError, match="prepared for model.task"):
        build_model(_spec("gpt" if family == "classifier" else "classifier", "transformer"), info)


def _random_lstm_lm() -> LSTMLanguageModel:
    torch.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=64, block_size=32, n_layer=2, d_model=32, dropout=0.0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


@torch.no_grad()
def test_lstm_lm_is_causal_and_tied():
    model = _random_lstm_lm()
    ids = torch.randint(0, 64, (2, 10))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    assert torch.allclose(model(changed)[:, :-1], model(ids)[:, :-1], atol=1e-6)
    assert model.lm_head.weight is model.wte.weight


@torch.no_grad()
def test_lstm_left_padded_batch_decodes_each_row_as_alone():
    """The recurrent state is the LSTM's cache: prompts of different lengths read together
    (left-padded, the padding never entering a state), rows leaving the batch, each row's greedy
    tokens the same as decoding it alone without a cache."""
    model = _random_lstm_lm()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 9, 6)]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=12, temperature=0)[0, len(p):].tolist()
             for p in prompts]
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts])
    cache = model.new_cache(3, width + 12, pad)
    logits = model(torch.tensor([[0] * (width - len(p)) + p for p in prompts]), cache)
    rows, out = [0, 1, 2], [[], [], []]
    for step in range(12):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        for row, token in zip(rows, next_ids[:, 0].tolist()):
            out[row].append(token)
        if step == 4:  # the middle row leaves the batch; the others must not notice
            cache.keep(torch.tensor([0, 2]))
            rows, next_ids = [0, 2], next_ids[[0, 2]]
        logits = model(next_ids, cache)
    assert out[0] == alone[0] and out[2] == alone[2] and out[1] == alone[1][:5]
    assert len({tuple(a) for a in alone}) == 3


@torch.no_grad()
def test_lstm_state_joins_rows_prefilled_apart():
    """A continuous-batching engine prefills new prompts apart and joins them to the running
    rows: every row then decodes as it would alone."""
    model = _random_lstm_lm()
    first, second = [5, 9, 3, 7], [11, 2]
    running = model.new_cache(1, 16, torch.zeros(1, dtype=torch.long))
    logits = model(torch.tensor([first]), running)[:, -1]
    step = logits.argmax(-1, keepdim=True)
    logits = model(step, running)[:, -1]  # the running row is one token ahead
    fresh = model.new_cache(1, 16, torch.zeros(1, dtype=torch.long))
    fresh_logits = model(torch.tensor([second]), fresh)[:, -1]
    running.join(fresh, 8)
    running.make_room(8, 8)
    tokens = torch.cat([logits, fresh_logits]).argmax(-1, keepdim=True)
    out = [[step.item(), tokens[0].item()], [tokens[1].item()]]
    for _ in range(5):
        tokens = model(tokens, running)[:, -1].argmax(-1, keepdim=True)
        out[0].append(tokens[0].item())
        out[1].append(tokens[1].item())
    alone = [model.generate(torch.tensor([p]), max_new_tokens=n, temperature=0)[0, len(p):].tolist()
             for p, n in ((first, 7), (second, 6))]
    assert out == alone


def test_lstm_lm_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=10, block_size=9, n_layer=1, d_model=32, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    ids = torch.arange(10).repeat(4, 1)
    for _ in range(80):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 10), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    out = model.eval().generate(ids[:1, :3], max_new_tokens=4, temperature=0)
    assert out[0].tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("cls,sizes", [(LSTMClassifier, {"n_layer": 1, "d_model": 16}),
                                       (BagOfNgrams, {"d_model": 16, "buckets": 97})])
def test_classifiers_ignore_padding(cls, sizes):
    torch.manual_seed(0)
    model = cls(vocab_size=30, num_classes=3, max_length=12, pad_id=0, dropout=0.0, **sizes)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    model.eval()
    short = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]])
    longer_pad = torch.cat([short, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    assert torch.allclose(model(short), model(longer_pad), atol=1e-5)
    # Order matters to both: the LSTM reads a sequence, the bag holds bigrams.
    assert not torch.allclose(model(torch.tensor([[5, 6, 7]])), model(torch.tensor([[7, 6, 5]])))


@pytest.mark.parametrize("cls,sizes", [(LSTMClassifier, {"n_layer": 1, "d_model": 16}),
                                       (BagOfNgrams, {"d_model": 16, "buckets": 256})])
def test_classifiers_learn_which_tokens_mark_a_class(cls, sizes):
    """Class 1 texts hold the bigram (3, 4) somewhere among random tokens; class 0 texts hold
    the same tokens in the other order, so only the order tells them apart."""
    torch.manual_seed(0)
    ids = torch.randint(5, 30, (128, 10))
    labels = torch.randint(0, 2, (128,))
    at = torch.randint(0, 8, (128,))
    rows = torch.arange(128)
    ids[rows, at] = torch.where(labels == 1, 3, 4)
    ids[rows, at + 1] = torch.where(labels == 1, 4, 3)
    ids[:, -1] = 0  # padding
    model = cls(vocab_size=30, num_classes=2, max_length=10, pad_id=0, dropout=0.0, **sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model.eval()(ids).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.95, accuracy


def test_archs_a_family_lacks_and_blockwise_options_are_refused_by_name():
    with pytest.raises(SpecError, match=r"model.arch: 'bow' is not an architecture of model.task 'language_model'"):
        _spec("gpt", "bow")
    raw = {"data": {"path": "x.jsonl"}, "model": {"family": "gpt", "arch": "lstm"},
           "train": {"strategy": "fsdp"}}
    with pytest.raises(SpecError, match=r"train.strategy = 'fsdp' shards per transformer block, "
                                        r"and model.arch 'lstm' has none"):
        parse_spec(raw)
    raw["train"] = {"compile": True}
    with pytest.raises(SpecError, match=r"train.compile = True .* model.arch 'lstm'"):
        parse_spec(raw)
    # An architecture only the sweep draws is checked too.
    raw = {"data": {"path": "x.jsonl", "label_column": "label"},
           "model": {"family": "classifier"}, "train": {"activation_checkpointing": True},
           "sweep": {"space": {"model.arch": {"choice": ["transformer", "bow"]}}}}
    with pytest.raises(SpecError, match=r"train.activation_checkpointing = True .* 'bow'"):
        parse_spec(raw)
    raw["train"] = {}
    raw["sweep"]["space"]["model.arch"] = {"choice": ["transformer", "gru"]}
    with pytest.raises(SpecError, match=r"sweep.space.model.arch: 'gru' is not an architecture"):
        parse_spec(raw)
    raw["sweep"]["space"]["model.arch"] = {"uniform": [0, 1]}
    with pytest.raises(SpecError, match=r"model.arch: sweep it with"):
        parse_spec(raw)


def test_a_trial_config_sets_nested_sizes():
    from orchestrator.sweep.space import apply_trial_config

    spec = _spec("classifier", "transformer")
    trial = apply_trial_config(spec, {"model.arch": "lstm", "model.lstm.d_model": 48})
    assert trial.model.arch == "lstm" and trial.model.lstm.d_model == 48
    assert spec.model.arch == "transformer"


def test_data_info_reads_the_old_seq_len():
    old = DataInfo.from_dict({"family": "gpt", "vocab_size": 9, "eos_id": 0, "pad_id": 1,
                              "seq_len": 65})
    assert old.context_length == 64 and old.seq_len == 65
    clf = DataInfo.from_dict({"family": "classifier", "vocab_size": 9, "eos_id": 0, "pad_id": 1,
                              "seq_len": 48, "labels": ["a"]})
    assert clf.context_length == 48 == clf.seq_len
