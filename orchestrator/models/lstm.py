"""LSTM models: a language model and a bidirectional-LSTM text classifier.

The language model embeds tokens, runs a stack of LSTM layers and predicts the next token with a
head tied to the embedding (Press & Wolf, 2017). Decoding keeps the LSTM's recurrent state as its
cache: a prompt is read once, then each new token costs one step, like GPT's key/value cache.

The classifier is the cheap baseline of the scalability literature: embedding, a bidirectional
LSTM over the real tokens only (packed, so padding never enters the state), mean and max pooling
over time, and a linear head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from orchestrator.models.decoding import generate_cacheless


class RecurrentState:
    """Every LSTM layer's hidden and cell state for a batch of left-padded rows: the LSTM's
    decoding cache (see models/decoding.py). `pad[i]` columns of row i are padding; the first
    forward reads the prompts packed, so padding never enters a row's state."""

    def __init__(self, pad: torch.Tensor, max_len: int):
        self.pad = pad
        self.max_len = max_len
        self.length = 0  # columns read
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch)."""
        rows = rows.to(self.pad.device)
        self.pad = self.pad.index_select(0, rows)
        if self.state is not None:
            self.state = tuple(s.index_select(1, rows) for s in self.state)

    def join(self, new: RecurrentState, spare: int = 0) -> None:
        """Append the rows of another (prefilled) state after these: a recurrent state has no
        columns to align, each row's state is all it keeps of its past."""
        if self.state is None or new.state is None:
            raise ValueError("join needs two states that have read their prompts")
        self.state = tuple(torch.cat([mine, theirs], dim=1)
                           for mine, theirs in zip(self.state, new.state))
        self.pad = torch.cat([self.pad, new.pad.to(self.pad.device)])
        self.length = max(self.length, new.length)

    def make_room(self, columns: int, spare: int = 0) -> None:
        """Nothing to do: the state does not grow with the columns read."""


def _shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row i moved shift[i] columns to the left (negative: to the right), clamped at the edges."""
    columns = torch.arange(x.shape[1], device=x.device)
    index = (columns[None, :] + shift[:, None]).clamp(0, x.shape[1] - 1)
    if x.dim() == 3:
        index = index[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, index)


class LSTMLanguageModel(nn.Module):
    """`forward(ids)` returns next-token logits for every column; with a RecurrentState, ids are
    the batch's next columns and the state advances."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, d_model: int,
                 dropout: float):
        super().__init__()
        self.block_size = block_size  # the context it was trained on, which serving keeps to
        self.wte = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(d_model, d_model, n_layer, batch_first=True,
                            dropout=dropout if n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor) -> RecurrentState:
        if pad.shape != (batch,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}, expected ({batch},)")
        return RecurrentState(pad.to(next(self.lstm.parameters()).device), max_len)

    def forward(self, ids: torch.Tensor, cache: RecurrentState | None = None) -> torch.Tensor:
        x = self.drop(self.wte(ids.contiguous()))  # an int8 embedding needs contiguous ids
        if cache is None:
            out, _ = self.lstm(x)
        elif cache.state is None and bool(cache.pad.any()):
            out, cache.state = self._read_left_padded(x, cache.pad)
        else:
            out, cache.state = self.lstm(x, cache.state)
        if cache is not None:
            cache.length += ids.shape[1]
        return self.lm_head(self.drop(out))

    def _read_left_padded(self, x: torch.Tensor, pad: torch.Tensor):
        """The prompts' outputs (at their own columns) and final states, padding skipped: rows are
        moved to the left, packed by length, and their outputs moved back."""
        lengths = x.shape[1] - pad
        packed = pack_padded_sequence(_shift(x, pad), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, state = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return _shift(out, -pad), state

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample up to max_new_tokens for each row, rereading the whole sequence every step
        (the cache-less reference); temperature 0 is greedy decoding."""
        return generate_cacheless(self, ids, max_new_tokens, temperature, top_k, eos_id,
                                  generator, window=None)


class LSTMClassifier(nn.Module):
    """`forward(ids)` returns class logits; `pad_id` marks the (right) padding to ignore."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                 n_layer: int, d_model: int, dropout: float):
        super().__init__()
        self.pad_id = pad_id
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(d_model, d_model, n_layer, batch_first=True, bidirectional=True,
                            dropout=dropout if n_layer > 1 else 0.0)
        self.head = nn.Linear(4 * d_model, num_classes)  # mean and max of both directions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_length]
        real = ids != self.pad_id
        lengths = real.sum(1).clamp(min=1)  # an empty text reads one padding token
        packed = pack_padded_sequence(self.drop(self.embed(ids)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        keep = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None])
        keep = keep.unsqueeze(-1).to(out.dtype)
        mean = (out * keep).sum(1) / keep.sum(1)
        largest = out.masked_fill(keep == 0, float("-inf")).amax(1)
        return self.head(self.drop(torch.cat([mean, largest], dim=-1)))
