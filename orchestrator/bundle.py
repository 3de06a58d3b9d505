"""The model bundle's format: everything the service and batch inference need, in one folder
(local, or a prefix in object storage). weights/model.py assembles and loads bundles.

  winner/model.pt          model weights (state dict)
  winner/tokenizer.json    the run's tokenizer
  winner/spec.yaml         the spec the winner trained with (sweep values applied)
  winner/data_info.json    vocabulary size, special ids, labels, sequence length
  winner/metrics.json      validation (and, after evaluate, test) metrics
  winner/provenance.json   trial id, checkpoint, Ray / torch / Python versions, git commit
  compression.json         a compressed variant only (compress/): how it was made; int8
                           weights are quantized modules' state, rebuilt by quantizing first
  ensemble.json            an ensemble only (sweep.ensemble): its member trials, each with
                           the model section that builds its part of model.pt
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml

from orchestrator.records import (
    COMPRESSION_FILE,
    ENSEMBLE_FILE,
    INFO_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PROVENANCE_FILE,
    SPEC_FILE,
    DataInfo,
    EnsembleMember,
)
from orchestrator.spec import JobSpec, parse_spec, spec_to_yaml
from orchestrator.storage import Location, resolve
from orchestrator.tokenizer import TOKENIZER_FILE


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_bundle(directory: str | Path | Location, spec: JobSpec, info: DataInfo,
                 state_dict: dict[str, torch.Tensor], tokenizer_file: str | Path,
                 metrics: dict[str, Any], provenance: dict[str, Any],
                 compression: dict[str, Any] | None = None,
                 ensemble: list[EnsembleMember] | None = None) -> str:
    """Write a bundle folder (local or in object storage) from weights in memory; see the
    module docstring for its files. Returns its path or URI."""
    target = resolve(directory)
    with target.local_folder() as folder:
        torch.save(state_dict, folder / MODEL_FILE)
        shutil.copy(tokenizer_file, folder / TOKENIZER_FILE)
        (folder / SPEC_FILE).write_text(spec_to_yaml(spec))
        (folder / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))
        provenance = {**provenance, "ray_version": version("ray"),
                      "torch_version": torch.__version__,
                      "python_version": platform.python_version(), "git_commit": git_commit()}
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        if compression is not None:
            (folder / COMPRESSION_FILE).write_text(json.dumps(compression, indent=2))
        if ensemble is not None:
            (folder / ENSEMBLE_FILE).write_text(
                json.dumps([asdict(member) for member in ensemble], indent=2, default=float))
    return target.uri


def write_metrics(directory: str | Location, metrics: dict[str, Any]) -> None:
    resolve(directory).join(METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))


def read_ensemble(directory: str | Path | Location) -> list[EnsembleMember] | None:
    """An ensemble bundle's members, in the order of their weights; None for one model."""
    file = resolve(directory).join(ENSEMBLE_FILE)
    if not file.is_file():
        return None
    return [EnsembleMember.from_dict(raw) for raw in json.loads(file.read_text())]


def read_spec_and_info(directory: str | Path | Location) -> tuple[JobSpec, DataInfo]:
    """A bundle's spec and data info, without loading its weights."""
    bundle = resolve(directory)
    if not bundle.join(MODEL_FILE).is_file():
        raise FileNotFoundError(f"{bundle.uri} is not a model bundle: {MODEL_FILE} is missing")
    spec = parse_spec(yaml.safe_load(bundle.join(SPEC_FILE).read_text()))
    return spec, DataInfo.from_dict(json.loads(bundle.join(INFO_FILE).read_text()))


