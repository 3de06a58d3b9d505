"""A bundle of fresh weights, made without a training run: what the service benchmark and the
service tests serve when the answers' quality does not matter."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from orchestrator.bundle import write_bundle
from orchestrator.models import build_model
from orchestrator.records import DataInfo
from orchestrator.spec import JobSpec, Task
from orchestrator.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer


def initial_bundle(directory: str | Path, spec: JobSpec, rows: list[dict[str, str]]) -> Path:
    """A bundle with freshly initialised weights and a tokenizer trained on the rows' `text`
    (classifier labels from their `label`): what the service benchmark and the service tests
    serve when the answers' quality does not matter, without a training run."""
    tokenizer = train_tokenizer((row["text"] for row in rows), spec.data.vocab_size)
    eos_id, pad_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    if spec.model.task == Task.LANGUAGE_MODEL:
        info = DataInfo(Task.LANGUAGE_MODEL, tokenizer.get_vocab_size(), eos_id, pad_id, spec.data.block_size)
    else:
        counts = Counter(row["label"] for row in rows)
        info = DataInfo(Task.CLASSIFIER, tokenizer.get_vocab_size(), eos_id, pad_id,
                        spec.data.max_length, labels=sorted(counts),
                        label_counts={"train": dict(counts)})
    model = build_model(spec, info)
    with tempfile.TemporaryDirectory() as scratch:
        write_bundle(directory, spec, info, model.state_dict(), save_tokenizer(tokenizer, scratch),
                     {}, {"trial_id": None, "note": "initial weights, not trained"})
    return Path(directory).absolute()
