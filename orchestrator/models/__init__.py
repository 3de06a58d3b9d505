"""Model families and the registry that builds them from the spec and the data info.

A task is a task (`model.task`: gpt, the language model, or classifier) and an architecture
(`model.arch`); each architecture lives in one file and takes plain sizes. Every model of a task
takes the same input (packed blocks of ids for the LM, right-padded ids for the classifier) and
returns logits, so training, evaluation and serving need no case per architecture. Language
models also follow models/decoding.py's small protocol, which is what serving uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from orchestrator.models.bow import BagOfNgrams
from orchestrator.models.classifier import TextClassifier
from orchestrator.models.decoding import Decoder, DecodingCache
from orchestrator.models.gpt import GPT
from orchestrator.models.hf import EncoderClassifier, gpt_from_config
from orchestrator.models.linear import LinearNgrams
from orchestrator.models.lstm import LSTMClassifier, LSTMLanguageModel
from orchestrator.spec import ModelSpec, Task

if TYPE_CHECKING:
    from orchestrator.records import DataInfo
    from orchestrator.spec import JobSpec

Builder = Callable[[ModelSpec, "DataInfo"], nn.Module]

REGISTRY: dict[tuple[str, str], Builder] = {
    (Task.LANGUAGE_MODEL, "transformer"): lambda m, info: GPT(
        info.vocab_size, info.context_length, m.n_layer, m.n_head, m.d_model, m.dropout),
    (Task.LANGUAGE_MODEL, "lstm"): lambda m, info: LSTMLanguageModel(
        info.vocab_size, info.context_length, m.lstm.n_layer, m.lstm.d_model, m.dropout),
    (Task.CLASSIFIER, "transformer"): lambda m, info: TextClassifier(
        info.vocab_size, info.num_classes, info.context_length, info.pad_id, m.n_layer,
        m.n_head, m.d_model, m.dropout),
    (Task.CLASSIFIER, "lstm"): lambda m, info: LSTMClassifier(
        info.vocab_size, info.num_classes, info.context_length, info.pad_id, m.lstm.n_layer,
        m.lstm.d_model, m.dropout),
    (Task.CLASSIFIER, "bow"): lambda m, info: BagOfNgrams(
        info.vocab_size, info.num_classes, info.context_length, info.pad_id, m.bow.d_model,
        m.bow.buckets, m.dropout),
    (Task.CLASSIFIER, "linear"): lambda m, info: LinearNgrams(
        info.vocab_size, info.num_classes, info.context_length, info.pad_id, m.linear.buckets),
}


def build_model(spec: JobSpec, info: DataInfo) -> nn.Module:
    """The model of the spec's task and architecture, sized by its model section (or, with
    model.pretrained, by the checkpoint's config), for the data the data stage prepared
    (vocabulary, context length, padding id, classes). Its weights are fresh: training loads a
    checkpoint's (weights/base.py), inference a bundle's (weights/model.py)."""
    model = spec.model
    if info.task != model.task:
        raise ValueError(f"the data was prepared for model.task {info.task.value!r}, the spec "
                         f"asks for {model.task.value!r}")
    if info.architecture is not None:
        if model.task == Task.LANGUAGE_MODEL:
            return gpt_from_config(info.architecture, model.dropout)
        return EncoderClassifier(info.architecture, info.labels, info.pad_id, info.context_length)
    try:
        builder = REGISTRY[(model.task, model.arch)]
    except KeyError:
        raise ValueError(f"model.arch {model.arch!r} has no {model.task} model") from None
    return builder(model, info)


__all__ = ["GPT", "REGISTRY", "BagOfNgrams", "Decoder", "DecodingCache", "EncoderClassifier",
           "LSTMClassifier", "LSTMLanguageModel", "LinearNgrams", "TextClassifier", "build_model"]
