"""What incremental decoding (predictor.py, the service, `predict`) asks of a language model.

A model that decodes keeps a cache of what it has read: GPT its keys and values (gpt.KVCache),
the LSTM its recurrent state (lstm.RecurrentState). An engine that stays architecture-free never
looks inside the cache: it creates it, feeds the model new columns through it, drops finished
rows from it and, for continuous batching, joins freshly prefilled rows to it and asks it for
room. `keep` is all that predictor.Decoding uses today; `join` and `make_room` are what a
continuous-batching engine needs, so that the column bookkeeping of a KV cache (aligning a new
row's last prompt token with the newest column, dropping columns that are padding in every row)
lives with the KV cache, and a recurrent state, which has no columns, does nothing.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DecodingCache(Protocol):
    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch)."""

    def join(self, new: DecodingCache, spare: int) -> None:
        """Append the rows of `new` (prefilled by the same model) after this cache's rows, each
        row's next column read after its own last one, with `spare` columns free after."""

    def make_room(self, columns: int, spare: int) -> None:
        """Make sure `columns` more columns can be read (growing by `spare` more when it must
        grow)."""


class Decoder(Protocol):
    block_size: int  # the context length: a prompt and its new tokens must fit in it together

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor) -> DecodingCache:
        """An empty cache for `batch` rows of up to max_len columns, row i left-padded by
        pad[i] columns that the model must ignore."""

    def __call__(self, ids: torch.Tensor, cache: DecodingCache | None = None) -> torch.Tensor:
        """(batch, columns, vocab) next-token logits. With a cache: ids are the batch's next
        columns (the first call: the left-padded prompts), read after the cached ones."""
