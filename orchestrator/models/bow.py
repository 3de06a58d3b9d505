"""A fastText-style bag of n-grams classifier (Joulin et al., 2016, "Bag of Tricks"; Bojanowski
et al., 2017, "Enriching Word Vectors with Subword Information").

Each text is the average of the embeddings of its tokens, of its hashed token bigrams and of the
hashed character 3- to 5-grams of each token, and a linear layer maps that average to the
classes. No recurrence, no attention: it trains in seconds and is strong on short texts, which
makes it the first thing a deeper model must beat. Character n-grams let tokens that share
pieces of spelling ('-dev', 'perl', 'lib') share evidence, as a word-level TF-IDF cannot.

The "words" are the tokenizer's tokens (a byte-level BPE keeps most frequent words whole), so the
model reads the same padded ids as the other classifiers and serves through the same path. Each
token's character n-grams are a table the model keeps with its weights (`subwords`), filled from
the tokenizer's vocabulary when training starts (`read_vocabulary`); until then it is empty and
the model is the plain bag of tokens and bigrams.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

BIGRAM_PRIME = 1_000_003  # hash(a, b) = (a * prime + b) mod buckets
CHAR_NGRAMS = range(3, 6)
SUBWORDS_PER_TOKEN = 16   # a long token keeps the first of its character n-grams, sorted


def token_subwords(token: str, buckets: int) -> list[int]:
    """The bucket of each character n-gram of a byte-level BPE token ('Ġ' is its leading
    space), with fastText's word boundary marks."""
    word = f"<{token.replace('Ġ', ' ').strip().lower()}>"
    grams = sorted({word[i:i + n] for n in CHAR_NGRAMS for i in range(len(word) - n + 1)})
    return [zlib.crc32(g.encode()) % buckets for g in grams[:SUBWORDS_PER_TOKEN]]


class BagOfNgrams(nn.Module):
    """`forward(ids)` returns class logits; `pad_id` marks padding to ignore."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                 d_model: int, buckets: int, dropout: float):
        super().__init__()
        self.pad_id = pad_id
        self.max_length = max_length
        self.buckets = buckets
        self.unigrams = nn.Embedding(vocab_size, d_model)
        self.bigrams = nn.Embedding(buckets, d_model)
        self.chars = nn.Embedding(buckets, d_model)
        # Each token's character n-gram buckets, -1 where it has fewer.
        self.register_buffer("subwords", torch.full((vocab_size, SUBWORDS_PER_TOKEN), -1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)
        for table in (self.unigrams, self.bigrams, self.chars):  # fastText's initialisation
            nn.init.uniform_(table.weight, -1.0 / d_model, 1.0 / d_model)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def read_vocabulary(self, vocabulary: dict[str, int]) -> None:
        """Fill `subwords` from the tokenizer's vocabulary (token -> id)."""
        for token, index in vocabulary.items():
            if index < len(self.subwords):
                buckets = token_subwords(token, self.buckets)
                self.subwords[index, :len(buckets)] = torch.tensor(buckets)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints and bundles from before character n-grams: the empty table (and the
        # n-gram embeddings as they are, which it never reads).
        state_dict.setdefault(f"{prefix}subwords", torch.full_like(self.subwords, -1))
        state_dict.setdefault(f"{prefix}chars.weight", self.chars.weight.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bigram_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids[:, :-1].long() * BIGRAM_PRIME + ids[:, 1:].long()) % self.buckets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_length]
        real = (ids != self.pad_id).unsqueeze(-1)
        pairs = real[:, :-1] & real[:, 1:]
        # (batch, tokens × n-grams): int8's quantized embedding takes 2-d indices only.
        subwords = self.subwords[ids].flatten(1)
        grams = ((subwords >= 0) & real.repeat_interleave(self.subwords.shape[1], 1).squeeze(-1))
        grams = grams.unsqueeze(-1)
        total = ((self.unigrams(ids) * real).sum(1)
                 + (self.bigrams(self.bigram_ids(ids)) * pairs).sum(1)
                 + (self.chars(subwords.clamp(min=0)) * grams).sum(1))
        count = (real.sum(1) + pairs.sum(1) + grams.sum(1)).clamp(min=1)
        return self.head(self.drop(total / count))
