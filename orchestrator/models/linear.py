"""A linear classifier over hashed n-grams: the strongest classical model for short texts
(a linear SVM or logistic regression on word and character n-grams; Wang and Manning, 2012,
"Baselines and Bigrams"), trained and served like our other classifiers.

Its features are the tokens and hashed token bigrams, and, of the text's whitespace-separated
words (lowercased), the hashed words, word bigrams and character 2- to 5-grams of each word with
its bounding spaces (scikit-learn's `char_wb`). The words come from the tokens' own bytes
(`token_bytes`, filled from the tokenizer's vocabulary when training starts by
`read_vocabulary`), so the model reads the same padded ids as the other classifiers and works
with any byte-level tokenizer: a word that the tokenizer splits into pieces still counts whole.

Unlike the bag of n-grams (bow.py), which averages low-dimensional embeddings and overfits
within an epoch on short texts, each feature here has one weight per class and the text's
feature vector is scaled to unit L2 norm, as TF-IDF's is: weight decay is then an L2 penalty on
a convex problem, and training runs to the budget without the peak-and-fall of the bag.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.models.bow import BIGRAM_PRIME

CHAR_NGRAMS = range(2, 6)
TOKEN_BYTES = 16            # a longer token keeps its first 16 bytes
HASH_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64  # Knuth's golden-ratio hash, as a signed int64
WHITESPACE = (9, 10, 13, 32)
WORD_PRIME = 1_099_511_628_211  # FNV-1a's 64-bit prime


def gpt2_byte_decoder() -> dict[str, int]:
    """The byte each character of a byte-level BPE token stands for (GPT-2's table: printable
    bytes stand for themselves, the others for the characters from U+0100 on, in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable},
            **{chr(256 + i): b for i, b in enumerate(others)}}


class LinearNgrams(nn.Module):
    """`forward(ids)` returns class logits; `pad_id` marks padding to ignore."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                 buckets: int):
        super().__init__()
        self.pad_id = pad_id
        self.max_length = max_length
        self.buckets = buckets
        self.unigrams = nn.Embedding(vocab_size, num_classes)
        self.bigrams = nn.Embedding(buckets, num_classes)
        self.chars = nn.Embedding(buckets, num_classes)
        self.word_unigrams = nn.Embedding(buckets, num_classes)
        self.word_bigrams = nn.Embedding(buckets, num_classes)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        # Each token's bytes, 0 past its end (no token holds a NUL byte).
        self.register_buffer("token_bytes", torch.zeros(vocab_size, TOKEN_BYTES,
                                                        dtype=torch.uint8))
        for table in (self.unigrams, self.bigrams, self.chars, self.word_unigrams,
                      self.word_bigrams):
            nn.init.zeros_(table.weight)
        # WORD_PRIME ** k for each byte offset k within a word (int64, wrapping as hashes do).
        powers = [pow(WORD_PRIME, k, 2**64) for k in range(max_length * TOKEN_BYTES + 2)]
        self.register_buffer("powers", torch.tensor([p - 2**64 if p >= 2**63 else p
                                                     for p in powers]), persistent=False)

    def read_vocabulary(self, vocabulary: dict[str, int]) -> None:
        """Fill `token_bytes` from the byte-level tokenizer's vocabulary (token -> id)."""
        decoder = gpt2_byte_decoder()
        for token, index in vocabulary.items():
            if index < len(self.token_bytes) and all(c in decoder for c in token):
                data = bytes(decoder[c] for c in token)[:TOKEN_BYTES]
                self.token_bytes[index, :len(data)] = torch.tensor(list(data),
                                                                   dtype=torch.uint8)

    def text_bytes(self, ids: torch.Tensor, real: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bytes, blank, within), each (batch, positions): the text's bytes, lowercased
        (ASCII), between a space before and one after it; where they are whitespace; and which
        positions hold the text (the rest is padding)."""
        data = (self.token_bytes[ids].long() * real.unsqueeze(-1)).flatten(1)
        present = data > 0
        # The bytes to the left, in order.
        order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
        data = torch.gather(data, 1, order) * torch.gather(present, 1, order)
        data = torch.where((data >= 65) & (data <= 90), data + 32, data)
        space = torch.full_like(data[:, :1], 32)
        data = torch.cat([space, data, space], dim=1)
        # The closing space sits where the padding starts.
        end = present.sum(1, keepdim=True) + 1
        data = data.scatter(1, end, 32)
        blank = torch.isin(data, torch.tensor(WHITESPACE, device=data.device))
        within = torch.arange(data.shape[1], device=data.device).unsqueeze(0) <= end
        return data, blank & within, within

    def char_ngrams(self, data: torch.Tensor, blank: torch.Tensor, within: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets, mask), each (batch, n-grams): the hashed character n-grams of each word,
        with the spaces around it (scikit-learn's char_wb)."""
        hashes, masks = [], []
        for n in CHAR_NGRAMS:
            windows = data.unfold(1, n, 1)                      # (batch, starts, n)
            spaces = blank.unfold(1, n, 1)
            inside = (~spaces[..., 1:-1].any(-1) & within.unfold(1, n, 1).all(-1)
                      & ~spaces.all(-1))
            value = torch.zeros_like(windows[..., 0]) + n
            for i in range(n):
                value = value * 257 + windows[..., i]
            hashes.append(self._bucket(value))
            masks.append(inside)
        return torch.cat(hashes, 1), torch.cat(masks, 1)

    def words(self, data: torch.Tensor, blank: torch.Tensor, within: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hashes, mask), each (batch, words): a hash of each whitespace-separated word, the
        words to the left in order. A word's hash sums its bytes times powers of a prime from
        its first byte on, so it does not depend on where the word stands."""
        position = torch.arange(data.shape[1], device=data.device).expand_as(data)
        start = torch.cummax(torch.where(blank, position, 0), dim=1).values
        letter = within & ~blank
        powers = self.powers[position - start]
        slot = torch.cumsum(blank.long(), dim=1)                # one slot per word
        hashes = torch.zeros_like(data).scatter_add(1, slot, torch.where(letter, data * powers, 0))
        present = torch.zeros_like(data).scatter_add(1, slot, letter.long()) > 0
        order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
        return torch.gather(hashes, 1, order), torch.gather(present, 1, order)

    def _bucket(self, value: torch.Tensor) -> torch.Tensor:
        return ((value * HASH_MULTIPLIER) >> 24).remainder(self.buckets)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_length]
        real = ids != self.pad_id
        pairs = real[:, :-1] & real[:, 1:]
        bigrams = (ids[:, :-1].long() * BIGRAM_PRIME + ids[:, 1:].long()).remainder(self.buckets)
        data, blank, within = self.text_bytes(ids, real)
        grams, inside = self.char_ngrams(data, blank, within)
        words, present = self.words(data, blank, within)
        word_pairs = present[:, :-1] & present[:, 1:]
        total = ((self.unigrams(ids) * real.unsqueeze(-1)).sum(1)
                 + (self.bigrams(bigrams) * pairs.unsqueeze(-1)).sum(1)
                 + (self.chars(grams) * inside.unsqueeze(-1)).sum(1)
                 + (self.word_unigrams(self._bucket(words)) * present.unsqueeze(-1)).sum(1)
                 + (self.word_bigrams(self._bucket(words[:, :-1] * BIGRAM_PRIME + words[:, 1:]))
                    * word_pairs.unsqueeze(-1)).sum(1))
        count = (real.sum(1) + pairs.sum(1) + inside.sum(1) + present.sum(1)
                 + word_pairs.sum(1)).clamp(min=1)
        return total / count.unsqueeze(-1).sqrt() + self.bias
