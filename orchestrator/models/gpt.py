"""A GPT-style decoder language model, after nanoGPT's model.py.

Pre-norm transformer blocks with causal self-attention through F.scaled_dot_product_attention,
learned positional embeddings, and the output head tied to the token embedding.

Decoding can keep every layer's keys and values in a KVCache, so that each new token costs one
position's work instead of the whole sequence's; `generate` is the plain cache-less reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.models.decoding import generate_cacheless


class KVCache:
    """Every layer's keys and values for a batch of left-padded rows, filled column by column.

    Row i's first pad[i] columns are padding: its token at column c has position c - pad[i], and
    no query attends to padding. Columns may outnumber block_size when rows have different
    paddings; only positions are bounded by it (GPT.forward checks).
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, max_len: int, pad: torch.Tensor,
                 dtype: torch.dtype):
        shape = (len(pad), n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=pad.device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=pad.device) for _ in range(n_layer)]
        self.pad = pad
        self.min_pad = int(pad.min())  # kept on the host: the position check needs no device sync
        self.max_len = max_len
        self.length = 0  # filled columns

    def positions(self, n: int) -> torch.Tensor:
        """(batch, n) positions of the next n columns; padding columns get position 0."""
        columns = torch.arange(self.length, self.length + n, device=self.pad.device)
        return (columns - self.pad[:, None]).clamp(min=0)

    def mask(self, n: int) -> torch.Tensor:
        """(batch, 1, n, length + n) boolean mask of the keys each of the next n columns may see.

        A column always sees itself: a padding query with nothing to attend to would make SDPA
        return NaN, and NaN in a masked-out value still poisons the matmul."""
        keys = torch.arange(self.length + n, device=self.pad.device)
        queries = keys[self.length:, None]
        allowed = ((keys >= self.pad[:, None, None]) & (keys <= queries)) | (keys == queries)
        return allowed[:, None]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the next columns' keys and values of one layer; return that layer's filled ones."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch), so finished ones cost nothing."""
        rows = rows.to(self.pad.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.pad = self.pad.index_select(0, rows)
        self.min_pad = int(self.pad.min())

    def join(self, new: KVCache, spare: int) -> None:
        """Put another cache's (freshly prefilled) rows beside these, each row's last column in
        the newest column, with `spare` free columns after; columns that are padding for every
        row here are dropped on the way. A row's keys and values depend only on its own tokens
        and positions, so where it sits changes nothing it computes."""
        start = self.min_pad  # this cache's oldest real column
        old_width = self.length - start
        length = max(old_width, new.length)
        shift, offset = length - old_width, length - new.length
        for layers in ("keys", "values"):
            joined = []
            for kept, fresh in zip(getattr(self, layers), getattr(new, layers)):
                rows, heads, _, dim = kept.shape
                out = kept.new_zeros(rows + fresh.shape[0], heads, length + spare, dim)
                out[:rows, :, shift:length] = kept[:, :, start:self.length]
                out[rows:, :, offset:length] = fresh[:, :, :new.length]
                joined.append(out)
            setattr(self, layers, joined)
        self.pad = torch.cat([self.pad - start + shift, new.pad + offset])
        self.min_pad = int(self.pad.min())
        self.length, self.max_len = length, length + spare

    def make_room(self, columns: int, spare: int) -> None:
        """Make sure `columns` more columns fit; when they do not, drop the columns that are
        padding for every row and make room for `columns + spare`."""
        if self.length + columns <= self.max_len:
            return
        start = self.min_pad
        max_len = self.length - start + columns + spare
        for layers in ("keys", "values"):
            resized = []
            for tensor in getattr(self, layers):
                rows, heads, _, dim = tensor.shape
                out = tensor.new_zeros(rows, heads, max_len, dim)
                out[:, :, :self.length - start] = tensor[:, :, start:self.length]
                resized.append(out)
            setattr(self, layers, resized)
        self.pad = self.pad - start
        self.min_pad -= start
        self.length -= start
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k, v = cache.store(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(batch, seq, width)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float, gelu: str = "none"):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.gelu = gelu  # F.gelu's `approximate`: "none" (erf) or "tanh" (GPT-2's gelu_new)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.gelu)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, gelu: str = "none",
                 eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, dropout, gelu)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model; `forward(ids)` returns next-token logits.

    With gelu "tanh" it is GPT-2's architecture exactly (models/hf.py converts the weights both
    ways); from scratch it uses the exact GELU."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 d_model: int, dropout: float, gelu: str = "none", eps: float = 1e-5):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, gelu, eps)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, eps=eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2's scaled init of residual outputs
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor) -> KVCache:
        """An empty cache for `batch` rows of up to max_len columns, row i left-padded by pad[i]."""
        if pad.shape != (batch,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}, expected ({batch},)")
        width, n_head = self.wte.embedding_dim, self.blocks[0].attn.n_head
        norm = self.ln_f.weight  # float in every variant (the embedding may be int8)
        return KVCache(len(self.blocks), n_head, width // n_head, max_len,
                       pad.to(norm.device), norm.dtype)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every column of ids. With a cache, ids are the batch's next columns: only
        they are computed, against the cached keys and values, and the cache advances."""
        if cache is not None:
            return self._forward_cached(ids, cache)
        seq = ids.shape[1]
        if seq > self.block_size:
            raise ValueError(f"sequence of {seq} tokens exceeds block_size {self.block_size}")
        positions = torch.arange(seq, device=ids.device)
        x = self.drop(self.wte(ids.contiguous()) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def _forward_cached(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        seq = ids.shape[1]
        if cache.length + seq > cache.max_len:
            raise ValueError(f"{seq} more columns overflow the cache: {cache.length} of "
                             f"{cache.max_len} are filled")
        last = cache.length + seq - 1 - cache.min_pad
        if last >= self.block_size:
            raise ValueError(f"position {last} is past block_size {self.block_size}: the learned "
                             f"positional embeddings end there")
        x = self.drop(self.wte(ids.contiguous()) + self.wpe(cache.positions(seq)))
        mask = cache.mask(seq)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, mask)
        cache.advance(seq)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample up to max_new_tokens for each row; temperature 0 is greedy decoding."""
        return generate_cacheless(self, ids, max_new_tokens, temperature, top_k, eos_id,
                                  generator, window=self.block_size)
