"""What a training run's workers are told: one typed, picklable config, built once by the driver.

The driver (the pipeline, a sweep trial, the compress stage) decides everything a worker must
not decide again on another node: the trial's spec with its sweep values applied and its device
decided, the data it trains on, and where its weights start. The start is an object its owner
builds (train/ has the ordinary one; compress/ builds its pruned and distilled starts), so the
training loop runs any of them without knowing who made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from orchestrator.cluster import training_spec
from orchestrator.models.bow import BagOfNgrams
from orchestrator.models.linear import LinearNgrams
from orchestrator.records import DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec
from orchestrator.tokenizer import load_tokenizer
from orchestrator.train.objectives import Objective, objective_for
from orchestrator.weights.model import starting_model


@dataclass
class Beginning:
    """A run's first weights and what it minimises; `keep_zeros` holds the weights that are zero
    at the start at zero throughout (a pruned model's recovery)."""

    model: nn.Module
    objective: Objective
    keep_zeros: bool = False


class Start(Protocol):
    """Where a run's weights and objective come from."""

    def begin(self, config: WorkerConfig, device: torch.device) -> Beginning: ...


@dataclass(frozen=True)
class FromSpec:
    """Fresh weights, or the staged pretrained checkpoint (model.pretrained) with the
    fine-tuning's adapters and frozen parts: what every sweep trial starts from."""

    def begin(self, config: WorkerConfig, device: torch.device) -> Beginning:
        model = starting_model(config.spec, config.info, config.run_dir.base)
        # Their character n-grams (and the linear model's words) come from the vocabulary.
        if isinstance(model, BagOfNgrams | LinearNgrams):
            with config.run_dir.tokenizer.local_copy() as tokenizer:
                model.read_vocabulary(load_tokenizer(tokenizer).get_vocab())
        return Beginning(model, objective_for(config.info, config.spec.train.loss))


@dataclass(frozen=True)
class WorkerConfig:
    """One run's workers' orders. The run directory travels as its URI: each worker resolves it
    with its own credentials, so none are pickled into Tune's or Train's state."""

    spec: JobSpec                 # sweep values applied, device decided, options checked
    info: DataInfo
    run_dir_uri: str
    start: Start = FromSpec()
    resume_from: str | None = None  # a checkpoint of another run to start from

    @property
    def run_dir(self) -> RunDir:
        return RunDir.at(self.run_dir_uri)

    @property
    def use_gpu(self) -> bool:
        return self.spec.resources.use_gpu is True


def worker_config(spec: JobSpec, info: DataInfo, run_dir: RunDir, start: Start = FromSpec(),
                  resume_from: str | None = None) -> WorkerConfig:
    """The config of a run of `spec`, whose resources.use_gpu the driver has decided
    (cluster.with_device): a worker on another node would see another cluster."""
    use_gpu = spec.resources.use_gpu
    if use_gpu == "auto":
        raise ValueError("resources.use_gpu is still 'auto': the driver decides the device "
                         "(cluster.with_device) before it tells any worker")
    return WorkerConfig(training_spec(spec, use_gpu), info, run_dir.uri, start, resume_from)
