"""Model families and the one function that builds them from the spec."""

from __future__ import annotations

from torch import nn

from orchestrator.models.classifier import TextClassifier
from orchestrator.models.gpt import GPT
from orchestrator.spec import ModelSpec


def build_model(model: ModelSpec, vocab_size: int, seq_len: int, pad_id: int,
                num_classes: int = 0) -> nn.Module:
    """The model for `model.family`; seq_len is the LM's block_size + 1 or the classifier's
    max_length, as the data stage wrote them."""
    if model.family == "gpt":
        return GPT(vocab_size, seq_len - 1, model.n_layer, model.n_head, model.d_model,
                   model.dropout)
    return TextClassifier(vocab_size, num_classes, seq_len, pad_id, model.n_layer,
                          model.n_head, model.d_model, model.dropout)


__all__ = ["GPT", "TextClassifier", "build_model"]
