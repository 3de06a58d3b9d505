"""What incremental decoding (inference/engine.py: the service, `predict`, evaluate) asks of a language
model.

A model that decodes keeps a cache of what it has read: GPT its keys and values (gpt.KVCache),
the LSTM its recurrent state (lstm.RecurrentState). An engine that stays architecture-free never
looks inside the cache: it creates it, feeds the model new columns through it, drops finished
rows from it and, for continuous batching, joins freshly prefilled rows to it and asks it for
room. `join` and `make_room` are what continuous batching needs, so that the column bookkeeping of a KV cache (aligning a new
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


def generate_cacheless(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int,
                       temperature: float, top_k: int | None, eos_id: int | None,
                       generator: torch.Generator | None, window: int | None) -> torch.Tensor:
    """The cache-less reference decoder every language model shares: reread the last `window`
    tokens (all when None) each step; temperature 0 is greedy decoding."""
    import torch.nn.functional as F

    for _ in range(max_new_tokens):
        logits = model(ids if window is None else ids[:, -window:])[:, -1, :]
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits.float(), dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        if eos_id is not None and ids.shape[0] == 1 and next_id.item() == eos_id:
            break
    return ids
