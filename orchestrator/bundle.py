"""The winner's model bundle: everything the service and batch inference need, in one folder
(local, or a prefix in object storage).

  winner/model.pt          model weights (state dict)
  winner/tokenizer.json    the run's tokenizer
  winner/spec.yaml         the spec the winner trained with (sweep values applied)
  winner/data_info.json    vocabulary size, special ids, labels, sequence length
  winner/metrics.json      validation (and, after evaluate, test) metrics
  winner/provenance.json   trial id, checkpoint, Ray / torch / Python versions, git commit
  compression.json         a compressed variant only (compress/): how it was made; int8
                           weights are quantized modules' state, rebuilt by quantizing first
"""

from __future__ import annotations

import hashlib
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
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, parse_spec, spec_to_yaml
from orchestrator.storage import Location, resolve
from orchestrator.train.checkpoint import load_model_weights

MODEL_FILE, SPEC_FILE, INFO_FILE = "model.pt", "spec.yaml", "data_info.json"
METRICS_FILE, PROVENANCE_FILE = "metrics.json", "provenance.json"
COMPRESSION_FILE = "compression.json"


@dataclass
class Bundle:
    spec: JobSpec
    info: DataInfo
    model: nn.Module
    tokenizer: Tokenizer
    metrics: dict[str, Any]
    version: str = ""  # the first 12 hex digits of model.pt's SHA-256: which weights answer
    compression: dict[str, Any] | None = None  # compression.json of a compressed variant


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
                 compression: dict[str, Any] | None = None) -> str:
    """Write a bundle folder (local or in object storage) from weights in memory; see the
    module docstring for its files. Returns its path or URI."""
    target = resolve(directory)
    with target.local_folder() as folder:
        torch.save(state_dict, folder / MODEL_FILE)
        shutil.copy(tokenizer_file, folder / TOKENIZER_FILE)
        (folder / SPEC_FILE).write_text(spec_to_yaml(spec))
        (folder / INFO_FILE).write_text(json.dumps(asdict(info), indent=2))
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))
        provenance = {**provenance, "ray_version": ray.__version__,
                      "torch_version": torch.__version__,
                      "python_version": platform.python_version(), "git_commit": git_commit()}
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        if compression is not None:
            (folder / COMPRESSION_FILE).write_text(json.dumps(compression, indent=2))
    return target.uri


def save_bundle(directory: str | Location, spec: JobSpec, info: DataInfo, checkpoint: str,
                tokenizer_dir: str | Location, metrics: dict[str, Any], trial_id: str,
                base: str | Location | None = None) -> str:
    """The winner's bundle, from the checkpoint (path or URI) of its best validation step; a
    fine-tuning's checkpoint holds only what trained, over the staged pretrained model at
    `base`. LoRA adapters are merged: the bundle is a plain model."""
    from orchestrator.train.finetune import merge_adapters, starting_model

    model = starting_model(spec, info, base)
    with resolve(checkpoint).local_copy() as local_checkpoint:
        load_model_weights(local_checkpoint, model)
    model = merge_adapters(model)
    with resolve(tokenizer_dir).local_copy() as tokenizer:
        return write_bundle(directory, spec, info, model.state_dict(), tokenizer / TOKENIZER_FILE,
                            metrics, {"trial_id": trial_id, "checkpoint": checkpoint})


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
        write_bundle(directory, spec, info, model.state_dict(), save_tokenizer(tokenizer, scratch),
                     {}, {"trial_id": None, "note": "initial weights, not trained"})
    return Path(directory).absolute()


def write_metrics(directory: str | Location, metrics: dict[str, Any]) -> None:
    resolve(directory).join(METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))


def find_bundle(location: str | Path) -> str:
    """The bundle of a run directory (the variant its compress stage chose, or its winner/), of
    `<base>/<job name>` (that job's latest run) or a bundle itself, local or in object storage;
    its path or URI."""
    run_dir = RunDir.of_job(location) or RunDir.at(location)
    if run_dir.compression_selection.is_file():  # the compress stage chose what to serve
        return json.loads(run_dir.compression_selection.read_text())["bundle"]
    for candidate in (run_dir.winner, run_dir.root):
        if candidate.join(MODEL_FILE).is_file():
            return candidate.uri
    raise FileNotFoundError(f"{run_dir.uri} is neither a run directory with "
                            f"{run_dir.winner.name}/ nor a model bundle ({MODEL_FILE} is missing)")


def read_spec_and_info(directory: str | Path | Location) -> tuple[JobSpec, DataInfo]:
    """A bundle's spec and data info, without loading its weights."""
    bundle = resolve(directory)
    if not bundle.join(MODEL_FILE).is_file():
        raise FileNotFoundError(f"{bundle.uri} is not a model bundle: {MODEL_FILE} is missing")
    spec = parse_spec(yaml.safe_load(bundle.join(SPEC_FILE).read_text()))
    return spec, DataInfo.from_dict(json.loads(bundle.join(INFO_FILE).read_text()))


def load_bundle(directory: str | Path | Location) -> Bundle:
    """Load a bundle (local or in object storage) for inference: model in eval mode, on CPU."""
    spec, info = read_spec_and_info(directory)
    model = build_model(spec, info)
    with resolve(directory).local_copy() as folder:
        compression = None
        if (folder / COMPRESSION_FILE).is_file():
            compression = json.loads((folder / COMPRESSION_FILE).read_text())
        if compression and compression["variant"] == "int8":
            from orchestrator.compress.int8 import quantize_int8

            model = quantize_int8(model)  # the quantized modules the weights belong to
        model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu",
                                         weights_only=compression is None or
                                         compression["variant"] != "int8"))
        with open(folder / MODEL_FILE, "rb") as weights:
            version = hashlib.file_digest(weights, "sha256").hexdigest()[:12]
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        metrics = json.loads((folder / METRICS_FILE).read_text())
    model.eval()
    return Bundle(spec=spec, info=info, model=model, tokenizer=tokenizer, metrics=metrics,
                  version=version, compression=compression)
