"""What incremental decoding (predictor.py, the service, `predict`) asks of a language model.

A model that decodes keeps a cache of what it has read: GPT its keys and values (gpt.KVCache),
the LSTM its recurrent state (lstm.RecurrentState). The engine never looks inside the cache; it
only creates it, feeds the model new columns through it, and drops finished rows from it.
"""

from __future__ import annotations

from typing import Protocol

import torch


class DecodingCache(Protocol):
    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch)."""


class Decoder(Protocol):
    block_size: int  # the context length: a prompt and its new tokens must fit in it together

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor) -> DecodingCache:
        """An empty cache for `batch` rows of up to max_len columns, row i left-padded by
        pad[i] columns that the model must ignore."""

    def __call__(self, ids: torch.Tensor, cache: DecodingCache | None = None) -> torch.Tensor:
        """(batch, columns, vocab) next-token logits. With a cache: ids are the batch's next
        columns (the first call: the left-padded prompts), read after the cached ones."""
