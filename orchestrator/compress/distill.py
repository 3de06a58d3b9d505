"""Distillation: a student with fewer transformer blocks learns the teacher's softened output
distribution (KL divergence at a temperature, scaled by T²) mixed with the hard-label loss.

The student is the teacher's architecture with fewer blocks; it starts from the teacher's
weights where they fit (embeddings, norms, head, and every other block, as DistilBERT did), which
gets it much closer than random weights in the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.records import DataInfo
from orchestrator.spec import CompressSpec, JobSpec, SweepSpec, Task
from orchestrator.train.config import Beginning, WorkerConfig
from orchestrator.train.objectives import Objective
from orchestrator.train.parallel import transformer_blocks
from orchestrator.weights.model import load_bundle, starting_model

# The config key of a Hugging Face architecture's block count.
LAYER_KEYS = {"gpt2": "n_layer", "bert": "num_hidden_layers", "roberta": "num_hidden_layers",
              "distilbert": "n_layers"}


def teacher_blocks(spec: JobSpec, info: DataInfo) -> int:
    if info.architecture is not None:
        return info.architecture[LAYER_KEYS[info.architecture["model_type"]]]
    return spec.model.n_layer


def student_spec_and_info(spec: JobSpec, info: DataInfo) -> tuple[JobSpec, DataInfo]:
    """The student's spec (the teacher's with fewer blocks, the distillation's steps and lr, no
    compress section) and the DataInfo it builds from."""
    distill = spec.compress.distill
    layers = distill.n_layer or max(1, teacher_blocks(spec, info) // 2)
    train = spec.train.model_copy(update={
        "max_steps": distill.steps or spec.train.max_steps, "lr": distill.lr or spec.train.lr,
        "finetune": "full", "freeze_embeddings": False,
        "warmup_steps": min(spec.train.warmup_steps, (distill.steps or spec.train.max_steps) - 1)})
    if info.architecture is None:
        model = spec.model.model_copy(update={"n_layer": layers})
    else:
        key = LAYER_KEYS[info.architecture["model_type"]]
        info = replace(info, architecture={**info.architecture, key: layers})
        model = spec.model.model_copy(update={"pretrained": None})
    student = spec.model_copy(update={"model": model, "train": train, "compress": CompressSpec(),
                                      "sweep": SweepSpec(num_samples=1, grace_period=1)})
    return JobSpec.model_validate(student.model_dump(mode="json")), info


def _blocks_prefix(model: nn.Module) -> str:
    blocks = transformer_blocks(model)
    return next(f"{name}." for name, module in model.named_modules() if module is blocks)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy the teacher's weights into the student where names and shapes match, student block
    i taking teacher block i × (teacher blocks ÷ student blocks); return how many tensors."""
    prefix = _blocks_prefix(student)
    stride = len(transformer_blocks(teacher)) // len(transformer_blocks(student))
    source, state, copied = teacher.state_dict(), student.state_dict(), 0
    for key in state:
        origin = key
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            origin = f"{prefix}{int(index) * stride}.{rest}"
        if origin in source and source[origin].shape == state[key].shape:
            state[key] = source[origin].clone()
            copied += 1
    student.load_state_dict(state)
    return copied


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def distillation_objective(task: str, teacher: nn.Module, temperature: float,
                           alpha: float) -> Objective:
    """alpha × T² × KL(teacher ‖ student at temperature T) + (1 - alpha) × cross entropy."""
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["ids"].long()
        inputs = ids[:, :-1] if task == Task.LANGUAGE_MODEL else ids
        logits = model(inputs).float()
        with torch.no_grad():
            target = teacher(inputs).float()
        if task == Task.LANGUAGE_MODEL:
            logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1, logits.shape[-1])
            hard = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
        else:
            hard = F.cross_entropy(logits, batch["label"].long(), ignore_index=-1)
        soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                        F.log_softmax(target / temperature, dim=-1), log_target=True,
                        reduction="batchmean") * temperature**2
        return alpha * soft + (1 - alpha) * hard

    tokens = (lambda batch: batch["ids"][:, 1:].numel()) if task == Task.LANGUAGE_MODEL else \
        (lambda batch: batch["ids"].numel())
    return Objective(loss=loss, tokens=tokens)


@dataclass(frozen=True)
class Distillation:
    """A student's start: the teacher's weights where they fit, and the distillation objective
    (what the compress stage hands the training loop)."""

    teacher: str  # the teacher's bundle
    temperature: float
    alpha: float

    def begin(self, config: WorkerConfig, device: torch.device) -> Beginning:
        model = starting_model(config.spec, config.info, config.run_dir.base)
        teacher = load_bundle(self.teacher).model.to(device)
        init_from_teacher(model, teacher)
        return Beginning(model, distillation_objective(config.info.task, teacher,
                                                       self.temperature, self.alpha))
