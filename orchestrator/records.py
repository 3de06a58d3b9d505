"""What the stages hand each other: the typed records every stage reads and writes, below all of
them (this module imports only the spec and storage).

A stage's outputs are files in the run directory (rundir.py); stages.json records, per completed
stage, what it hands on, as the records here. Read it back with `StageRecords` rather than by
key, so that a reader and a writer cannot disagree on a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A bundle folder's files (bundle.py writes them; see its docstring).
MODEL_FILE, SPEC_FILE, INFO_FILE = "model.pt", "spec.yaml", "data_info.json"
METRICS_FILE, PROVENANCE_FILE = "metrics.json", "provenance.json"
COMPRESSION_FILE = "compression.json"


@dataclass
class DataInfo:
    """What later stages need to know about the prepared data."""

    family: str
    vocab_size: int
    eos_id: int
    pad_id: int
    context_length: int  # tokens a model sees at once: data.block_size (LM), data.max_length
    labels: list[str] = field(default_factory=list)
    texts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # The tokenizer's special tokens by role (eos_token, pad_token, cls_token...): what an
    # exported tokenizer declares.
    special_tokens: dict[str, str] = field(default_factory=dict)
    # With model.pretrained: the checkpoint's Hugging Face config, which build_model builds
    # instead of the spec's sizes (models/hf.py).
    architecture: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def seq_len(self) -> int:
        """Tokens per stored row: a language model's rows hold one more token than its context
        (the last position's target)."""
        return self.context_length + 1 if self.family == "gpt" else self.context_length

    @classmethod
    def from_dict(cls, raw: dict) -> DataInfo:
        """From meta.json or a bundle's data_info.json, also those written before
        context_length replaced seq_len."""
        raw = dict(raw)
        if "seq_len" in raw:
            seq_len = raw.pop("seq_len")
            raw.setdefault("context_length", seq_len - 1 if raw["family"] == "gpt" else seq_len)
        return cls(**raw)
