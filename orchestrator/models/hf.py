"""Hugging Face architectures: GPT-2 checkpoints in and out of our GPT, and BERT-family encoders
wrapped as a classifier.

GPT-2 is nanoGPT's architecture, so a GPT-2 checkpoint loads into our own GPT (with GPT-2's tanh
GELU): the KV-cache serving engine, FSDP per block, FLOPs and the export of every from-scratch
winner then need nothing new, and the conversion is a renaming plus a transpose (GPT-2 stores
its linear layers as Conv1D, input-major). Encoders differ in ways a port would have to follow
one by one (BERT's post-norm and token types, RoBERTa's padding-offset positions, DistilBERT's
names), so the classifier wraps transformers' own AutoModelForSequenceClassification.

An architecture travels as its Hugging Face config (a dict): in DataInfo.architecture for the
models built from it, and as config.json in an exported model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from orchestrator.models.gpt import GPT
from orchestrator.spec import Task

GPT_TYPES = ("gpt2",)
ENCODER_TYPES = ("bert", "roberta", "distilbert")
MODEL_TYPES = {Task.LANGUAGE_MODEL: GPT_TYPES, Task.CLASSIFIER: ENCODER_TYPES}
# GPT-2 config activation_function -> F.gelu's `approximate`
GELU_OF_ACTIVATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}

# GPT-2 block parameter -> ours; the Conv1D weights are stored transposed.
_GPT2_NAMES = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc",
               "mlp.c_proj": "mlp.proj", "ln_1": "ln_1", "ln_2": "ln_2"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def quiet_transformers() -> None:
    """transformers prints progress bars and load reports (a fresh task head's MISSING keys)
    for every from_pretrained: in a job's log, noise beside our own lines."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    disable_progress_bars()


def gpt2_problems(config: Mapping[str, Any]) -> list[str]:
    """What in a GPT-2 config our GPT cannot represent (empty: it loads exactly)."""
    problems = []
    activation = config.get("activation_function", "gelu_new")
    if activation not in GELU_OF_ACTIVATION:
        problems.append(f"activation_function {activation!r} (supported: "
                        f"{', '.join(GELU_OF_ACTIVATION)})")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        problems.append(f"n_inner {config['n_inner']} (supported: 4 × n_embd)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            problems.append(f"{flag} true")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false")
    if not config.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings false (our GPT ties the head to the embedding)")
    return problems


def gpt_from_config(config: Mapping[str, Any], dropout: float) -> GPT:
    """Our GPT with a GPT-2 config's shape (fresh weights: gpt_state_from_hf fills them)."""
    problems = gpt2_problems(config)
    if problems:
        raise ValueError(f"this GPT-2 checkpoint has {'; '.join(problems)}")
    return GPT(config["vocab_size"], config["n_positions"], config["n_layer"], config["n_head"],
               config["n_embd"], dropout,
               gelu=GELU_OF_ACTIVATION[config.get("activation_function", "gelu_new")],
               eps=config.get("layer_norm_epsilon", 1e-5))


def gpt2_config(model: GPT, eos_id: int) -> dict[str, Any]:
    """The GPT2Config (as a dict) of our GPT: what export writes as config.json."""
    gelu = model.blocks[0].mlp.gelu
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": model.wte.num_embeddings, "n_positions": model.block_size,
            "n_embd": model.wte.embedding_dim, "n_layer": len(model.blocks),
            "n_head": model.blocks[0].attn.n_head, "n_inner": None,
            "activation_function": "gelu_new" if gelu == "tanh" else "gelu",
            "layer_norm_epsilon": model.ln_f.eps, "tie_word_embeddings": True,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "bos_token_id": eos_id, "eos_token_id": eos_id}


def gpt2_module_name(ours: str) -> str:
    """GPT-2's name for a module of one of our blocks (`attn.qkv` -> `attn.c_attn`)."""
    return {name: theirs for theirs, name in _GPT2_NAMES.items()}[ours]


def gpt_state_from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict renamed (and its Conv1D weights transposed) for our GPT."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied head; old checkpoints' causal-mask buffers
        if key.startswith("h."):
            _, index, name = key.split(".", 2)
            module, _, kind = name.rpartition(".")
            value = value.t() if name in _CONV1D else value
            key = f"blocks.{index}.{_GPT2_NAMES[module]}.{kind}"
        ours[key] = value
    ours["lm_head.weight"] = ours["wte.weight"]
    return ours


def gpt_state_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our GPT's state dict as GPT2LMHeadModel's (the inverse of gpt_state_from_hf)."""
    theirs = {name: hf for hf, name in _GPT2_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            out[key] = value
            continue
        if key.startswith("blocks."):
            _, index, name = key.split(".", 2)
            module, _, kind = name.rpartition(".")
            name = f"{theirs[module]}.{kind}"
            value = value.t() if name in _CONV1D else value
            key = f"h.{index}.{name}"
        out[f"transformer.{key}"] = value.contiguous()
    return out


class EncoderClassifier(nn.Module):
    """A BERT-family encoder with a classification head over the job's labels (transformers'
    modules); `forward(ids)` returns class logits and ignores `pad_id` columns."""

    def __init__(self, config: Mapping[str, Any], labels: list[str], pad_id: int,
                 max_length: int):
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        settings = {key: value for key, value in config.items()
                    if key not in ("model_type", "architectures", "id2label", "label2id",
                                   "num_labels", "transformers_version")}
        hf_config = AutoConfig.for_model(
            config["model_type"], **settings, id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)})
        self.pad_id, self.max_length = pad_id, max_length
        self.hf = AutoModelForSequenceClassification.from_config(hf_config)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's layers: what FSDP shards and activation checkpointing recomputes."""
        base = self.hf.base_model
        encoder = getattr(base, "encoder", None) or base.transformer  # DistilBERT: transformer
        return encoder.layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, : self.max_length]
        return self.hf(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits
