"""The winner's model bundle: everything the service and batch inference need, in one folder.

  winner/model.pt          model weights (state dict)
  winner/tokenizer.json    the run's tokenizer
  winner/spec.yaml         the spec the winner trained with (sweep values applied)
  winner/data_info.json    vocabulary size, special ids, labels, sequence length
  winner/metrics.json      validation (and, after evaluate, test) metrics
  winner/provenance.json   trial id, checkpoint, Ray / torch / Python versions, git commit
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from tokenizers import Tokenizer
from torch import nn

from orchestrator.data import DataInfo
from orchestrator.data.tokenizer import EOS, PAD, TOKENIZER_FILE, save_tokenizer, train_tokenizer
from orchestrator.models import build_model
from orchestrator.spec import JobSpec, parse_spec, spec_to_yaml
from orchestrator.train.checkpoint import load_model_weights

WINNER_DIR = "winner"
MODEL_FILE, SPEC_FILE, INFO_FILE = "model.pt", "spec.yaml", "data_info.json"
METRICS_FILE, PROVENANCE_FILE = "metrics.json", "provenance.json"


@dataclass
class Bundle:
    spec: JobSpec
    info: DataInfo
    model: nn.Module
    tokenizer: Tokenizer
    metrics: dict[str, Any]


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_bundle(directory: str | Path, spec: JobSpec, info: DataInfo,
                 state_dict: dict[str, torch.Tensor], tokenizer_dir: str | Path,
                 metrics: dict[str, Any], provenance: dict[str, Any]) -> Path:
    """Write a bundle folder from weights in memory; see the module docstring for its files."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    torch.save(state_dict, directory / MODEL_FILE)
    shutil.copy(Path(tokenizer_dir) / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    (directory / SPEC_FILE).write_text(spec_to_yaml(spec))
    (directory / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
    write_metrics(directory, metrics)
    provenance = {**provenance, "ray_version": ray.__version__,
                  "torch_version": torch.__version__,
                  "python_version": platform.python_version(), "git_commit": git_commit()}
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    return directory


def save_bundle(directory: str | Path, spec: JobSpec, info: DataInfo, checkpoint_path: str,
                tokenizer_dir: str | Path, metrics: dict[str, Any], trial_id: str) -> Path:
    """The winner's bundle, from the checkpoint of its best validation step."""
    model = build_model(spec, info)
    load_model_weights(checkpoint_path, model)
    return write_bundle(directory, spec, info, model.state_dict(), tokenizer_dir, metrics,
                        {"trial_id": trial_id, "checkpoint": checkpoint_path})


def initial_bundle(directory: str | Path, spec: JobSpec, rows: list[dict[str, str]]) -> Path:
    """A bundle with freshly initialised weights and a tokenizer trained on the rows' `text`
    (classifier labels from their `label`): what the service benchmark and the service tests
    serve when the answers' quality does not matter, without a training run."""
    tokenizer = train_tokenizer((row["text"] for row in rows), spec.data.vocab_size)
    eos_id, pad_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    if spec.model.family == "gpt":
        info = DataInfo("gpt", tokenizer.get_vocab_size(), eos_id, pad_id, spec.data.block_size)
    else:
        counts = Counter(row["label"] for row in rows)
        info = DataInfo("classifier", tokenizer.get_vocab_size(), eos_id, pad_id,
                        spec.data.max_length, labels=sorted(counts),
                        label_counts={"train": dict(counts)})
    model = build_model(spec, info)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = save_tokenizer(tokenizer, scratch).parent
        return write_bundle(directory, spec, info, model.state_dict(), tokenizer_dir, {},
                            {"trial_id": None, "note": "initial weights, not trained"})


def write_metrics(directory: str | Path, metrics: dict[str, Any]) -> None:
    (Path(directory) / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))


def find_bundle(path: str | Path) -> Path:
    """The bundle of a run directory (its winner/) or a bundle directory itself."""
    path = Path(path)
    for candidate in (path / WINNER_DIR, path):
        if (candidate / MODEL_FILE).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{path} is neither a run directory with {WINNER_DIR}/ nor a model "
                            f"bundle ({MODEL_FILE} is missing)")


def read_spec_and_info(directory: str | Path) -> tuple[JobSpec, DataInfo]:
    """A bundle's spec and data info, without loading its weights."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a model bundle: {MODEL_FILE} is missing")
    spec = parse_spec(yaml.safe_load((directory / SPEC_FILE).read_text()))
    return spec, DataInfo.from_dict(json.loads((directory / INFO_FILE).read_text()))


def load_bundle(directory: str | Path) -> Bundle:
    """Load a bundle for inference (model in eval mode, on CPU)."""
    directory = Path(directory)
    spec, info = read_spec_and_info(directory)
    model = build_model(spec, info)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu",
                                     weights_only=True))
    model.eval()
    return Bundle(spec=spec, info=info, model=model,
                  tokenizer=Tokenizer.from_file(str(directory / TOKENIZER_FILE)),
                  metrics=json.loads((directory / METRICS_FILE).read_text()))
