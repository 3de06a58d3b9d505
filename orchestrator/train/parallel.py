"""How one worker's model is spread over the workers and sped up, applied to a plain model by
small functions in torchtitan's order: activation checkpointing, compile, then DDP or FSDP2.

Every option keeps the model's parameter names, so checkpoints and bundles do not depend on them.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from orchestrator.spec import TrainSpec


@dataclass(frozen=True)
class Precision:
    """What autocast runs in (None: full fp32) and whether losses need fp16's grad scaler."""

    dtype: torch.dtype | None
    scaler: bool = False

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]


def resolve_precision(requested: str, device: torch.device) -> tuple[Precision, str | None]:
    """The precision to train in on this device, and a warning when it differs from the request.

    fp16 on CPU is refused before workers start (cluster.refuse_untrainable)."""
    cuda = device.type == "cuda"
    if requested == "fp32" or (requested == "auto" and not cuda):
        return Precision(None), None
    if requested == "fp16":
        return Precision(torch.float16, scaler=True), None
    if cuda and not torch.cuda.is_bf16_supported():
        warning = (f"train.precision {requested}: {torch.cuda.get_device_name(device)} has no "
                   "bf16; training in fp16 with a gradient scaler instead")
        return Precision(torch.float16, scaler=True), warning
    return Precision(torch.bfloat16), None


def compile_unsupported(device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None when it can): it needs Dynamo for this Python and
    a C++ compiler on CPU or Triton on GPU."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++) and none was found"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile on GPU needs Triton, which is not installed"
    return None


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks that FSDP shards and activation checkpointing recomputes one by one."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return model.blocks  # GPT
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers  # the classifier's nn.TransformerEncoder
    raise ValueError(f"{type(model).__name__} has no transformer blocks (a `blocks` or "
                     "`encoder.layers` ModuleList), so it cannot be sharded or checkpointed "
                     "per block")


def checkpoint_activations(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations during backward instead of keeping them.

    Wraps the instance's forward rather than the module (torch's checkpoint_wrapper would rename
    every parameter with a `_checkpoint_wrapped_module.` prefix)."""
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                          use_reentrant=False)


def parallelize(model: nn.Module, train: TrainSpec, device: torch.device, world_size: int,
                precision: Precision, compile_model: bool) -> nn.Module:
    """The model ready for training on this worker: on its device, wrapped for the strategy.

    One worker needs no wrapper; DDP is torch's, over the process group the host set up. FSDP2 shards every
    block, then the root (embeddings, final norm and the tied head stay together in it); on GPU
    in bf16 it gathers parameters in bf16 and reduces gradients in fp32."""
    blocks = transformer_blocks(model) if (train.activation_checkpointing or compile_model
                                           or train.strategy == "fsdp") else None
    if train.activation_checkpointing:
        checkpoint_activations(blocks)
    if compile_model:
        for block in blocks:
            block.compile()
    model.to(device)
    if world_size == 1:
        return model
    if train.strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and precision.dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
