"""Training checkpoints: sharded with torch.distributed.checkpoint (DCP), for DDP and FSDP alike.

One checkpoint directory holds:
  .metadata, __<rank>_0.distcp   model and optimizer state, each worker writing its own shards;
                                 DCP reshards on load, so a checkpoint saved by 2 workers resumes
                                 with 1 (or 4)
  rng-rank<r>.pt                 each worker's random number generator states
  trainer_state.json             step, LR schedule, data position and metrics, written last by
                                 rank 0, after every shard is on disk: it marks a complete
                                 checkpoint

Every worker saves into its own local directory (staging_directory) and reports it; Ray Train
merges them into one directory in storage and registers the checkpoint only when every worker
has reported, so a worker that dies mid-save leaves no checkpoint that resume could pick up.

A checkpoint is data, never code: DCP pickles `.metadata` and its planner unpickles the
optimizer's non-tensor values with torch.load(weights_only=False). Here `.metadata` is read by
an unpickler that knows only DCP's metadata classes and the few torch and standard types they
hold, and every other value with weights_only=True; anything else is refused, naming it.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

TRAINER_STATE_FILE = "trainer_state.json"
# Only what trains is saved and restored: frozen weights (a pretrained model's, under LoRA or
# frozen embeddings) are the staged checkpoint's, which every worker loads before this.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def _without_frozen(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The state without every name of a frozen parameter: DCP's ignore_frozen_params keeps a
    tied copy's second name (GPT's lm_head.weight, which is its frozen embedding)."""
    frozen = {name.removeprefix("module.")  # DDP's prefix, which the state does not have
              for name, param in model.named_parameters(remove_duplicate=False)
              if not param.requires_grad}
    return {key: value for key, value in state.items() if key not in frozen}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: incomplete, of a different model, or holding
    what a checkpoint never holds."""


# What DCP's .metadata pickles: its metadata classes, and the torch and standard types in them.
METADATA_MODULES = {"torch.distributed.checkpoint.metadata"}
METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                  ("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                  *(("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath"))}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        known = module in METADATA_MODULES or (module, name) in METADATA_NAMES or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype,
                                                                           torch.layout)))
        if not known:
            raise CheckpointError(f"checkpoint metadata names {module}.{name}, which no "
                                  "checkpoint holds: refused (a checkpoint is data, not code)")
        return super().find_class(module, name)


class DataOnlyReader(dcp.FileSystemReader):
    """DCP's reader with .metadata read by _MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp.Metadata:
        path = pathlib.Path(str(self.path)) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"checkpoint {path.parent}: its .metadata cannot be read "
                                  f"({type(error).__name__}: {error})") from None
        if not isinstance(metadata, dcp.Metadata):
            raise CheckpointError(f"checkpoint {path.parent}: .metadata holds a "
                                  f"{type(metadata).__name__}, not DCP's Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class DataOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner with the non-tensor values (the optimizer's settings) loaded
    weights_only: numbers, strings, tuples, lists and dicts."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            blocked = [line for line in str(error).splitlines() if "GLOBAL" in line]
            raise CheckpointError(f"checkpoint value {read_item.dest_index.fqn} is not plain "
                                  f"data: refused (a checkpoint is data, not code): "
                                  f"{(blocked or [str(error)])[0].strip()}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _load(state: dict[str, Any], directory: Path) -> None:
    """dcp.load, data only; a refusal surfaces as itself, not inside DCP's wrapper."""
    try:
        dcp.load(state, storage_reader=DataOnlyReader(str(directory)), planner=DataOnlyPlanner())
    except CheckpointException as error:
        refusals = [cause for cause, _ in error.failures.values()
                    if isinstance(cause, CheckpointError)]
        if refusals:
            raise refusals[0] from None
        raise


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def staging_root() -> Path:
    """Where this machine's workers stage their checkpoints: a folder per user and host (a /tmp
    that containers share holds several)."""
    return Path(tempfile.gettempdir()) / f"orchestrator-staging-{os.getuid()}-{socket.gethostname()}"


def staging_directory(step: int, rank: int) -> Path:
    """A new local directory for one worker's shards of one checkpoint, named by its process.
    A worker killed while it reports never removes its own (its `finally` does not run; a
    group's other workers are stopped the same way when one fails), so the folders of
    processes that are gone are removed first: a lost worker's shards stay only until the next
    save on its machine."""
    root = staging_root()
    root.mkdir(mode=0o700, exist_ok=True)
    for folder in root.iterdir():
        owner = folder.name.partition("-")[0]
        if owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-step{step}-rank{rank}-", dir=root))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rank: int) -> None:
    """Collective: every worker calls it with its own (local) directory."""
    directory = Path(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    model_state = _without_frozen(model, model_state)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    torch.save(_rng_state(), directory / _rng_file(rank))
    if rank == 0:  # dcp.save returned on rank 0, the coordinator: every shard is written
        partial = directory / f".{TRAINER_STATE_FILE}.partial"
        partial.write_text(json.dumps(trainer_state, indent=2))
        os.replace(partial, directory / TRAINER_STATE_FILE)


def check_complete(directory: str | Path) -> None:
    """Refuse a checkpoint whose trainer state or any shard file is missing."""
    directory = Path(directory)
    if not (directory / TRAINER_STATE_FILE).is_file() or not (directory / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {TRAINER_STATE_FILE} or "
                              ".metadata is missing (its save was interrupted)")
    metadata = DataOnlyReader(str(directory)).read_metadata()
    files = {item.relative_path for item in (metadata.storage_data or {}).values()}
    missing = sorted(name for name in files if not (directory / name).is_file())
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: shard files "
                              f"{', '.join(missing)} are missing")


def check_compatible(directory: str | Path, model_state: dict[str, Any]) -> None:
    """Compare the checkpoint's model tensors with this model's, naming both shapes on a
    mismatch, before DCP fails with an error about storage reads."""
    metadata = DataOnlyReader(str(directory)).read_metadata().state_dict_metadata
    saved = {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.items()
             if key.startswith("model.") and hasattr(meta, "size")}
    ours = {key: tuple(value.shape) for key, value in model_state.items()}
    problems = [f"{key}: checkpoint {saved[key]} vs model {ours[key]}"
                for key in ours if key in saved and saved[key] != ours[key]]
    problems += [f"{key}: not in the checkpoint" for key in ours if key not in saved]
    problems += [f"{key}: not in the model" for key in saved if key not in ours]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise CheckpointError(f"checkpoint {directory} holds a different model: {shown}")


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int) -> dict[str, Any]:
    """Collective: load model and optimizer state (resharded to this worker count) and this
    worker's RNG state; return the trainer state."""
    directory = Path(directory)
    check_complete(directory)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    model_state = _without_frozen(model, model_state)
    check_compatible(directory, model_state)
    state = {"model": model_state, "optimizer": optimizer_state}
    _load(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=TRAINED_ONLY)
    rng_file = directory / _rng_file(rank)
    if not rng_file.is_file():  # resumed with more workers than saved
        rng_file = directory / _rng_file(0)
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((directory / TRAINER_STATE_FILE).read_text())


def load_model_weights(directory: str | Path, model: nn.Module) -> dict[str, Any]:
    """Fill a plain model (one process, no process group) with a checkpoint's weights, e.g. to
    write the winner's bundle; return the trainer state."""
    directory = Path(directory)
    check_complete(directory)
    model_state = _without_frozen(model, get_model_state_dict(model, options=TRAINED_ONLY))
    check_compatible(directory, model_state)  # the same keys: strict=False hides nothing
    _load({"model": model_state}, directory)
    model.load_state_dict(model_state, strict=False)
    return json.loads((directory / TRAINER_STATE_FILE).read_text())
