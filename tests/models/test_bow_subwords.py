"""The bag of n-grams' character n-grams (fastText's subwords): read from a real tokenizer's
vocabulary, shared by tokens that share spelling, kept with the weights, and absent (the plain
bag) in weights saved before them."""

from __future__ import annotations

import torch

from orchestrator.models.bow import BagOfNgrams
from orchestrator.tokenizer import train_tokenizer

TEXTS = ["Perl module to parse CSV files", "perl interface to the libfoo library",
         "shared library for PNG images - development files", "Haskell binding for GHC"] * 50


def _bow(vocab_size: int) -> BagOfNgrams:
    return BagOfNgrams(vocab_size, num_classes=3, max_length=16, pad_id=1, d_model=8,
                       buckets=4096, dropout=0.0)


def test_tokens_that_share_spelling_share_character_ngrams():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    vocabulary = tokenizer.get_vocab()
    model = _bow(tokenizer.get_vocab_size())
    model.read_vocabulary(vocabulary)
    grams = {t: set(model.subwords[vocabulary[t]].tolist()) - {-1}
             for t in ("lib", "Ġlib", "Ġlibrary", "Perl", "erl")}
    assert grams["lib"] and grams["lib"] == grams["Ġlib"]  # the leading space is no spelling
    assert grams["lib"] & grams["Ġlibrary"]  # '<li', 'lib' are in both
    assert not grams["Perl"] & grams["lib"]



def test_character_ngrams_change_the_prediction_and_travel_with_the_weights():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = _bow(tokenizer.get_vocab_size())
    torch.nn.init.normal_(model.head.weight)
    ids = torch.tensor([tokenizer.encode("perl module").ids + [1] * 3])
    plain = model(ids)
    model.read_vocabulary(tokenizer.get_vocab())
    assert not torch.allclose(model(ids), plain)

    served = _bow(tokenizer.get_vocab_size())
    served.load_state_dict(model.state_dict())  # a checkpoint or bundle holds the table
    assert torch.equal(served(ids), model(ids))

    before = {k: v for k, v in model.state_dict().items() if k not in ("subwords", "chars.weight")}
    old = _bow(tokenizer.get_vocab_size())
    old.load_state_dict(before)  # weights saved before character n-grams load as they are
    assert (old.subwords == -1).all() and torch.equal(old(ids), plain)
