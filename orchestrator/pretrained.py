"""The checkpoint a job starts from (model.pretrained): found, checked against the spec and
copied into the run directory (its weights are loaded by weights/base.py).

`model.pretrained` names a Hugging Face model directory (local or in object storage), a Hub id
(the ordinary `from_pretrained` path, for machines that reach the Hub), or an earlier run of ours
(its run directory, `runs/<job name>` for that job's latest run, or a bundle), which export.py
writes as a Hugging Face directory first. The data
stage checks it before anything else runs and copies it into the run directory's base/ (config,
safetensors weights, tokenizer files): every worker on every node, the bundle and a resumed run
then read that copy, whatever happens to the original.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.export import export_hf
from orchestrator.models import build_model
from orchestrator.models.hf import MODEL_TYPES, gpt2_problems, quiet_transformers
from orchestrator.records import MODEL_FILE, DataInfo
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, SpecError, Task
from orchestrator.storage import Location, is_uri, resolve
from orchestrator.weights.lora import missing_targets, target_modules

FIELD = "model.pretrained"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # gpt2, openai-community/gpt2


@dataclass
class Base:
    """A checked checkpoint: its config (a dict) and its fast tokenizer."""

    config: dict[str, Any]
    tokenizer: Any  # transformers.PreTrainedTokenizerFast

    @property
    def special_tokens(self) -> dict[str, str]:
        return {role: str(token) for role, token in self.tokenizer.special_tokens_map.items()
                if isinstance(token, str)}

    @property
    def eos_id(self) -> int:
        tokenizer = self.tokenizer
        for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
            if token_id is not None:
                return token_id
        raise SpecError(f"{FIELD}: the checkpoint's tokenizer has no end-of-text, separator or "
                        "padding token")

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad  # GPT-2 has no padding token


def _is_ours(location: Location) -> bool:
    run_dir = RunDir.at(location)
    return any(where.join(MODEL_FILE).is_file() for where in (run_dir.winner, run_dir.root))


@contextlib.contextmanager
def checkpoint_source(reference: str) -> Iterator[str]:
    """A local directory (or a Hub id) that transformers' from_pretrained reads."""
    local = not is_uri(reference)
    if local and not Path(reference).exists():
        latest = RunDir.of_job(reference)  # runs/<job name>
        if latest is None and not HUB_ID.fullmatch(reference):
            raise SpecError(f"{FIELD} = {reference!r} does not exist")
        if latest is None:
            yield reference  # a Hub id: from_pretrained downloads it, or says why not
            return
        reference = latest.uri
    location = resolve(reference)
    if not location.exists():
        raise SpecError(f"{FIELD} = {reference!r} does not exist")
    if _is_ours(location):
        winner = RunDir.at(location).winner  # full precision, whatever variant a run serves
        with tempfile.TemporaryDirectory() as scratch:
            export_hf(winner.uri if winner.exists() else reference, scratch, field=FIELD,
                      check_texts=[])
            yield scratch
        return
    if not location.join("config.json").is_file():
        raise SpecError(f"{FIELD} = {reference!r} is neither a Hugging Face model directory "
                        "(no config.json) nor a run directory or bundle of ours (no model.pt)")
    if local:
        yield str(reference)
        return
    with location.local_copy() as folder:
        yield str(folder)


def _read(source: str, reference: str) -> Base:
    from transformers import AutoConfig, AutoTokenizer

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(source).to_dict()
    except (OSError, ValueError) as error:
        raise SpecError(f"{FIELD} = {reference!r}: not a local directory, and no Hugging Face "
                        f"checkpoint could be read under that name ({error})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise SpecError(f"{FIELD} = {reference!r} has no usable tokenizer: {error}") from None
    if not tokenizer.is_fast:
        raise SpecError(f"{FIELD} = {reference!r}: its tokenizer has no fast (tokenizers) form")
    return Base(config, tokenizer)


def check_base(spec: JobSpec, base: Base) -> None:
    """Everything about the checkpoint that the spec must agree with, each naming the field."""
    reference, task, config = spec.model.pretrained, spec.model.task, base.config
    model_type = config.get("model_type")
    supported = MODEL_TYPES[task]
    if model_type not in supported:
        raise SpecError(f"{FIELD} = {reference!r} is a {model_type!r} model; model.task "
                        f"{task.value!r} supports {', '.join(supported)}")
    if task == Task.LANGUAGE_MODEL:
        problems = gpt2_problems(config)
        if problems:
            raise SpecError(f"{FIELD} = {reference!r}: unsupported GPT-2 settings: "
                            f"{'; '.join(problems)}")
        positions, field, wanted = config["n_positions"], "data.block_size", spec.data.block_size
    else:
        # RoBERTa's positions start after its padding id.
        offset = config.get("pad_token_id", 0) + 1 if model_type == "roberta" else 0
        positions = config["max_position_embeddings"] - offset
        field, wanted = "data.max_length", spec.data.max_length
    if wanted > positions:
        raise SpecError(f"{field} = {wanted} is past the {positions} positions of "
                        f"{FIELD} = {reference!r}; use at most {positions}")
    if len(base.tokenizer) > config["vocab_size"]:
        raise SpecError(f"{FIELD} = {reference!r}: its tokenizer has {len(base.tokenizer)} "
                        f"tokens, more than the model's {config['vocab_size']} embeddings")
    if spec.train.finetune == "lora":
        _check_lora(spec, config)


def _check_lora(spec: JobSpec, config: dict[str, Any]) -> None:
    info = DataInfo(spec.model.task, config["vocab_size"], 0, 0, 8, labels=["a", "b"],
                    architecture=config)
    with torch.device("meta"):
        model = build_model(spec, info)
    targets = target_modules(spec, config)
    missing = missing_targets(model, targets)
    if missing:
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, nn.Linear)})
        raise SpecError(f"train.lora.target_modules: {', '.join(map(repr, missing))} names no "
                        f"linear layer of {FIELD} = {spec.model.pretrained!r}; its linear "
                        f"layers: {', '.join(names)}")


def inspect_base(spec: JobSpec) -> Base:
    """Read and check model.pretrained without copying its weights."""
    with checkpoint_source(spec.model.pretrained) as source:
        base = _read(source, spec.model.pretrained)
    check_base(spec, base)
    return base


def stage_base(spec: JobSpec, target: Location) -> Base:
    """Check model.pretrained and copy it (config, weights, tokenizer) to `target`."""
    from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

    with checkpoint_source(spec.model.pretrained) as source:
        base = _read(source, spec.model.pretrained)
        check_base(spec, base)
        model_class = (GPT2LMHeadModel if spec.model.task == Task.LANGUAGE_MODEL
                       else AutoModelForSequenceClassification)
        model = model_class.from_pretrained(source)
        with target.local_folder() as folder:
            model.save_pretrained(folder)
            base.tokenizer.save_pretrained(folder)
    base.config = model.config.to_dict()
    return base
