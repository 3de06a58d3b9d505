"""A model's life in weights: what a trial starts training from, the winner's bundle assembled
from its checkpoint, and a bundle loaded for inference.

  models/          builds a model of fresh weights from the spec and the data info
  weights/base.py  a staged pretrained checkpoint's weights into it
  weights/lora.py  LoRA adapters in (and frozen parts), and merged out
  weights/checkpoint.py  training checkpoints (DCP) saved and loaded
  weights/int8.py  int8 quantization, also what an int8 bundle is loaded into
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from orchestrator.bundle import read_ensemble, read_spec_and_info, write_bundle
from orchestrator.models import build_model
from orchestrator.models.ensemble import Ensemble
from orchestrator.records import (
    COMPRESSION_FILE,
    METRICS_FILE,
    MODEL_FILE,
    BundleRef,
    DataInfo,
    EnsembleMember,
)
from orchestrator.spec import JobSpec, ModelSpec
from orchestrator.storage import Location, resolve
from orchestrator.tokenizer import TOKENIZER_FILE
from orchestrator.weights.base import load_base_weights
from orchestrator.weights.checkpoint import load_model_weights
from orchestrator.weights.int8 import quantize_int8
from orchestrator.weights.lora import merge_adapters, prepare_finetune


@dataclass
class Bundle:
    spec: JobSpec
    info: DataInfo
    model: nn.Module
    tokenizer: Tokenizer
    metrics: dict[str, Any]
    version: str = ""  # the first 12 hex digits of model.pt's SHA-256: which weights answer
    compression: dict[str, Any] | None = None  # compression.json of a compressed variant


def starting_model(spec: JobSpec, info: DataInfo, base: str | Location | None) -> nn.Module:
    """What a trial starts training: fresh weights, or the staged pretrained checkpoint's (at
    `base`, the run directory's base/) with the fine-tuning's adapters and frozen parts."""
    model = build_model(spec, info)
    if spec.model.pretrained is not None:
        if base is None:
            raise ValueError("model.pretrained is set but no staged checkpoint was given")
        load_base_weights(model, base, info.labels)
    return prepare_finetune(model, spec, info.architecture)


def save_bundle(directory: str | Location, spec: JobSpec, info: DataInfo, checkpoint: str,
                tokenizer_dir: str | Location, metrics: dict[str, Any], trial_id: str,
                base: str | Location | None = None) -> BundleRef:
    """The winner's bundle, from the checkpoint (path or URI) of its best validation step; a
    fine-tuning's checkpoint holds only what trained, over the staged pretrained model at
    `base`. LoRA adapters are merged: the bundle is a plain model."""
    model = trained_model(spec, info, checkpoint, base)
    with resolve(tokenizer_dir).local_copy() as tokenizer:
        return BundleRef(write_bundle(directory, spec, info, model.state_dict(),
                                      tokenizer / TOKENIZER_FILE, metrics,
                                      {"trial_id": trial_id, "checkpoint": checkpoint}))


def trained_model(spec: JobSpec, info: DataInfo, checkpoint: str,
                  base: str | Location | None = None) -> nn.Module:
    """A trial's model at a checkpoint (path or URI), LoRA adapters merged: a plain model."""
    model = starting_model(spec, info, base)
    with resolve(checkpoint).local_copy() as local_checkpoint:
        load_model_weights(local_checkpoint, model)
    return merge_adapters(model)


def save_ensemble_bundle(directory: str | Location, spec: JobSpec, info: DataInfo,
                         members: list[tuple[EnsembleMember, nn.Module]],
                         tokenizer_dir: str | Location, metrics: dict[str, Any]) -> BundleRef:
    """An ensemble's bundle: the members' weights in one model.pt, their model sections in
    ensemble.json; `spec` is the first member's (serving, limits and the rest are the job's)."""
    model = Ensemble([trained for _, trained in members])
    chosen = [member for member, _ in members]
    with resolve(tokenizer_dir).local_copy() as tokenizer:
        return BundleRef(write_bundle(directory, spec, info, model.state_dict(),
                                      tokenizer / TOKENIZER_FILE, metrics,
                                      {"trial_id": chosen[0].trial_id,
                                       "ensemble": [m.trial_id for m in chosen]},
                                      ensemble=chosen))


def bundle_model(spec: JobSpec, info: DataInfo, ensemble: list[EnsembleMember] | None) -> nn.Module:
    """A bundle's model of fresh weights: the spec's, or one per ensemble member."""
    if ensemble is None:
        return build_model(spec, info)
    return Ensemble([build_model(spec.model_copy(update={"model": ModelSpec.model_validate(
        member.model)}), info) for member in ensemble])


def load_bundle(directory: str | Path | Location) -> Bundle:
    """Load a bundle (local or in object storage) for inference: model in eval mode, on CPU."""
    spec, info = read_spec_and_info(directory)
    model = bundle_model(spec, info, read_ensemble(directory))
    with resolve(directory).local_copy() as folder:
        compression = None
        if (folder / COMPRESSION_FILE).is_file():
            compression = json.loads((folder / COMPRESSION_FILE).read_text())
        if compression and compression["variant"] == "int8":
            model = quantize_int8(model)  # the quantized modules the weights belong to
        # Weights only, whatever the bundle's own files say: a bundle is data, never code.
        model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu",
                                         weights_only=True))
        with open(folder / MODEL_FILE, "rb") as weights:
            version = hashlib.file_digest(weights, "sha256").hexdigest()[:12]
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        metrics = json.loads((folder / METRICS_FILE).read_text())
    model.eval()
    return Bundle(spec=spec, info=info, model=model, tokenizer=tokenizer, metrics=metrics,
                  version=version, compression=compression)
