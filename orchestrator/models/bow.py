"""A fastText-style bag of n-grams classifier (Joulin et al., 2016, "Bag of Tricks").

Each text is the average of the embeddings of its tokens and of its hashed token bigrams, and a
linear layer maps that average to the classes. No recurrence, no attention: it trains in seconds
and is strong on short texts, which makes it the first thing a deeper model must beat.

The "words" are the tokenizer's tokens (a byte-level BPE keeps most frequent words whole), so the
model reads the same padded ids as the other classifiers and serves through the same path.
"""

from __future__ import annotations

import torch
from torch import nn

BIGRAM_PRIME = 1_000_003  # hash(a, b) = (a * prime + b) mod buckets


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
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)
        for table in (self.unigrams, self.bigrams):  # fastText's initialisation
            nn.init.uniform_(table.weight, -1.0 / d_model, 1.0 / d_model)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def bigram_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids[:, :-1].long() * BIGRAM_PRIME + ids[:, 1:].long()) % self.buckets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_length]
        real = (ids != self.pad_id).unsqueeze(-1)
        pairs = real[:, :-1] & real[:, 1:]
        total = ((self.unigrams(ids) * real).sum(1)
                 + (self.bigrams(self.bigram_ids(ids)) * pairs).sum(1))
        count = (real.sum(1) + pairs.sum(1)).clamp(min=1)
        return self.head(self.drop(total / count))
