"""The linear n-gram classifier: its character n-grams are scikit-learn's `char_wb` ones and its
words whitespace-separated ones, whole however the tokenizer split them, read from the tokens' bytes that travel with the
weights; trained with the squared hinge it learns words it never saw from their spelling."""

from __future__ import annotations

import torch
from sklearn.feature_extraction.text import CountVectorizer

from orchestrator.models.linear import LinearNgrams
from orchestrator.tokenizer import train_tokenizer
from orchestrator.train.objectives import squared_hinge_loss

TEXTS = ["Perl module to parse CSV files", "perl interface to the libfoo library",
         "shared library for PNG images - development files", "Haskell binding for GHC"] * 50
BUCKETS = 1 << 24  # few enough collisions to count distinct n-grams by their buckets


def _padded(tokenizer, texts: list[str], length: int = 64) -> torch.Tensor:
    ids = torch.ones(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        encoded = tokenizer.encode(text).ids[:length]
        ids[row, :len(encoded)] = torch.tensor(encoded)
    return ids


def _model(tokenizer, num_classes: int = 3, buckets: int = BUCKETS) -> LinearNgrams:
    model = LinearNgrams(tokenizer.get_vocab_size(), num_classes, max_length=64, pad_id=1,
                         buckets=buckets)
    model.read_vocabulary(tokenizer.get_vocab())
    return model


def test_character_ngrams_are_scikit_learns_char_wb_of_whole_words():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = _model(tokenizer)
    texts = ["Perl module to parse  CSV files", "Haskell bindings for libgtk-4, UNSEEN words",
             "x"]
    ids = _padded(tokenizer, texts)
    assert any(len(tokenizer.encode(w).tokens) > 1 for w in ("bindings", "UNSEEN"))
    text = model.text_bytes(ids, ids != 1)
    buckets, inside = model.char_ngrams(*text)
    words, present = model.words(*text)
    analyzer = CountVectorizer(analyzer="char_wb", ngram_range=(2, 5)).build_analyzer()
    for row, text in enumerate(texts):
        ours = buckets[row][inside[row]].tolist()
        theirs = analyzer(text)
        assert len(ours) == len(theirs)
        assert len(set(ours)) == len(set(theirs))
        assert int(present[row].sum()) == len(text.split())
    # The same word gives the same n-grams and hash wherever it stands and whatever its case.
    same = _padded(tokenizer, ["unseen words", "more UNSEEN"])
    text = model.text_bytes(same, same != 1)
    (grams, inside), (words, present) = model.char_ngrams(*text), model.words(*text)
    assert words[0, 0] == words[1, 1] and len(set(words[present].tolist())) == 3
    unseen = _padded(tokenizer, ["unseen"])
    alone, kept = model.char_ngrams(*model.text_bytes(unseen, unseen != 1))
    alone = set(alone[0][kept[0]].tolist())
    assert alone <= set(grams[0][inside[0]].tolist()) and alone <= set(grams[1][inside[1]].tolist())


def test_the_tokens_bytes_travel_with_the_weights():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = _model(tokenizer, buckets=4096)
    torch.nn.init.normal_(model.chars.weight)
    ids = _padded(tokenizer, ["perl module for png images"])
    served = LinearNgrams(tokenizer.get_vocab_size(), 3, max_length=64, pad_id=1, buckets=4096)
    assert not torch.equal(served(ids), model(ids))
    served.load_state_dict(model.state_dict())  # a checkpoint or bundle holds the bytes
    assert torch.equal(served(ids), model(ids))


def test_squared_hinge_is_linear_svms_loss_and_leaves_unseen_labels_out():
    logits = torch.tensor([[2.0, -0.5, 0.0], [0.3, 0.1, -2.0], [9.0, 9.0, 9.0]])
    model = lambda ids: logits  # noqa: E731 - the loss only calls the model
    labels = torch.tensor([0, 2, -1])
    # Row 0: class 0 above 1 (0), others: (1 - 0.5)^2 + 1^2; row 1: (1 + 0.3)^2 + 1.1^2 + 3^2.
    expected = ((0.25 + 1.0) + (1.69 + 1.21 + 9.0)) / 2
    assert torch.isclose(squared_hinge_loss(model, None, labels), torch.tensor(expected))


def test_trained_with_the_squared_hinge_it_classifies_unseen_words_by_spelling():
    """Which language a package is for, from words the training texts never hold: only the
    character n-grams ('perl', 'py') carry over."""
    train = [f"{lang}-{word} module" for lang in ("perl", "python") for word in
             ("csv", "yaml", "xml", "json", "http", "smtp", "zip", "tar", "png", "gif")]
    tokenizer = train_tokenizer(train, vocab_size=300)
    labels = torch.tensor([0] * 10 + [1] * 10)
    model = _model(tokenizer, num_classes=2, buckets=1 << 16)
    ids = _padded(tokenizer, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(60):
        loss = squared_hinge_loss(model, ids, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unseen = _padded(tokenizer, ["perlish toml reader", "pythonic toml reader",
                                 "Perl-ish jpeg tools", "Python-ish jpeg tools"])
    assert model(unseen).argmax(-1).tolist() == [0, 1, 0, 1]
