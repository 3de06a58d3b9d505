"""Which weights a fine-tuning run trains: all of them, or low-rank adapters (LoRA, through
peft) with the rest frozen; and the merge that turns an adapted model back into a plain one.

Adapters are injected into the model in place (peft's inject_adapter_in_model), not wrapped in a
PeftModel: the model keeps its class and its `blocks`, so FSDP, activation checkpointing and
the loop treat it like any other. Frozen weights are the pretrained checkpoint's, which every
worker loads first; checkpoints hold only what trains (weights/checkpoint.py skips frozen
parameters), so a LoRA checkpoint is the adapters, a classifier's head and their optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from orchestrator.models import GPT, EncoderClassifier
from orchestrator.spec import JobSpec

# The attention projections each architecture's adapters go on by default (peft's defaults).
DEFAULT_TARGETS = {"gpt2": ["qkv"], "bert": ["query", "value"], "roberta": ["query", "value"],
                   "distilbert": ["q_lin", "v_lin"]}


def target_modules(spec: JobSpec, architecture: Mapping[str, Any]) -> list[str]:
    return spec.train.lora.target_modules or DEFAULT_TARGETS[architecture["model_type"]]


def missing_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets that name no linear layer of the model (peft matches a name or its suffix)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return [target for target in targets
            if not any(name == target or name.endswith(f".{target}") for name in linear)]


def _embeddings(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, GPT):
        return [model.wte, model.wpe]  # wte is also the tied output head
    if isinstance(model, EncoderClassifier):
        return [model.hf.base_model.embeddings]
    return [module for module in model.modules() if isinstance(module, nn.Embedding)]


def _head(model: nn.Module) -> list[nn.Parameter]:
    """A classifier's new head, which trains with the adapters (a language model's is tied to
    the embedding)."""
    if isinstance(model, EncoderClassifier):
        base = {id(p) for p in model.hf.base_model.parameters()}
        return [p for p in model.parameters() if id(p) not in base]
    return []


def prepare_finetune(model: nn.Module, spec: JobSpec,
                     architecture: Mapping[str, Any] | None) -> nn.Module:
    """Freeze and adapt the model as spec.train says (after its pretrained weights are in)."""
    train = spec.train
    if train.finetune == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha,
                            lora_dropout=train.lora.dropout,
                            target_modules=target_modules(spec, architecture or {}))
        model = inject_adapter_in_model(config, model)  # freezes everything but the adapters
        for param in _head(model):
            param.requires_grad_(True)
    if train.freeze_embeddings:
        for module in _embeddings(model):
            module.requires_grad_(False)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its layer's weight and put the plain layer back: the model
    then has the class, parameter names and speed of one that was never adapted."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def trainable_share(model: nn.Module) -> float:
    """Trained parameters over all parameters (tied ones counted once)."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
