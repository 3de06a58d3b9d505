"""A Transformer encoder text classifier.

Token embeddings plus sinusoidal positional encoding, a stack of encoder layers that ignore
padding, mean pooling over the real tokens, and a linear head over the classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_encoding(max_len: int, d_model: int) -> torch.Tensor:
    position = torch.arange(max_len).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    encoding = torch.zeros(max_len, d_model)
    encoding[:, 0::2] = torch.sin(position * div)
    encoding[:, 1::2] = torch.cos(position * div[: d_model // 2])
    return encoding


class TextClassifier(nn.Module):
    """`forward(ids)` returns class logits; `pad_id` marks padding to ignore."""

    def __init__(self, vocab_size: int, num_classes: int, max_length: int, pad_id: int,
                 n_layer: int, n_head: int, d_model: int, dropout: float):
        super().__init__()
        self.pad_id = pad_id
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("positions", sinusoidal_encoding(max_length, d_model),
                             persistent=False)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, n_head, dim_feedforward=4 * d_model,
                                           dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_length]
        padding = ids == self.pad_id
        x = self.embed(ids) * math.sqrt(self.embed.embedding_dim)
        x = self.drop(x + self.positions[: ids.shape[1]])
        x = self.norm(self.encoder(x, src_key_padding_mask=padding))
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(pooled)
