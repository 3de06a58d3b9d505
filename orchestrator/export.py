"""A winner as a Hugging Face model directory (`orchestrator export RUN_DIR --format hf -o DIR`):
config.json, model.safetensors and the tokenizer's files, which transformers' Auto classes,
vLLM and the Hub load unchanged.

GPT winners (from scratch or fine-tuned) become GPT2LMHeadModel, whose architecture ours is
(models/hf.py); classifiers fine-tuned from a BERT-family checkpoint are transformers modules
already. Other architectures (LSTM, bag of n-grams, linear, our own transformer classifier) have
no Hugging Face form and are refused, naming the one found.

A GPT run fine-tuned with LoRA also exports as a PEFT adapter directory (`--format peft`):
adapter_config.json and adapter_model.safetensors, which peft loads onto the run's pretrained
GPT-2 checkpoint (model.pretrained), so that many fine-tunes of one base ship as small adapters.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.models import GPT, EncoderClassifier
from orchestrator.models.ensemble import Ensemble
from orchestrator.models.hf import gpt2_config, gpt2_module_name, gpt_state_to_hf, quiet_transformers
from orchestrator.records import PROVENANCE_FILE
from orchestrator.rundir import RunDir, find_bundle
from orchestrator.spec import SpecError
from orchestrator.storage import Location, StorageError, resolve
from orchestrator.tokenizer import EOS, PAD
from orchestrator.weights.checkpoint import load_model_weights
from orchestrator.weights.model import Bundle, load_bundle, starting_model

if TYPE_CHECKING:
    import torch


def _special_tokens(bundle: Bundle) -> dict[str, str]:
    """The tokenizer's special tokens by role (runs from before DataInfo kept them: ours)."""
    if bundle.info.special_tokens:
        return bundle.info.special_tokens
    return {"eos_token": EOS, "bos_token": EOS, "pad_token": PAD}


@dataclass
class Export:
    uri: str  # where the model directory was written
    max_logit_difference: float  # transformers' logits against ours on the checked texts
    texts_checked: int


def round_trip_error(bundle: Bundle, folder: str | Path, texts: list[str]) -> float:
    """The largest |logit difference| between transformers' Auto class loading the exported
    folder and our model, each encoding `texts` with its own tokenizer (which must agree)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(folder)
    auto = AutoModelForCausalLM if isinstance(bundle.model, GPT) else AutoModelForSequenceClassification
    hf_model = auto.from_pretrained(folder).eval()
    worst = 0.0
    for text in texts:
        ours, theirs = bundle.tokenizer.encode(text).ids, tokenizer(text)["input_ids"]
        if ours != theirs:
            raise ValueError(f"the exported tokenizer encodes {text!r} as {theirs}, ours as {ours}")
        ids = torch.tensor([ours[: bundle.info.context_length]])
        with torch.inference_mode():
            difference = (hf_model(input_ids=ids).logits - bundle.model(ids)).abs().max()
        worst = max(worst, float(difference))
    return worst


def _output(out: str | Path, overwrite: bool) -> Location:
    """Where an export goes: a new or empty folder, or with `overwrite` any folder (the files an
    export writes replace those of the same names; nothing else in it is touched)."""
    target = resolve(out)
    if (present := target.entries()) and not overwrite:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5
                                          else "")
        raise SpecError(f"--output {target.uri!r} is not empty ({shown}): export into a new or "
                        "empty folder, or pass --overwrite to replace the files an export "
                        "writes and keep the rest")
    return target


def export_hf(location: str | Path, out: str | Path, field: str = "RUN_DIR",
              check_texts: list[str] | None = None, overwrite: bool = False) -> Export:
    """Write the bundle of a run directory (or a bundle) as a Hugging Face model directory,
    local or in object storage, and check that transformers loads it to our logits on
    `check_texts` (default: the spec's serve.sample_requests).

    `out` must be empty or new: with `overwrite`, the files an export writes replace those of
    the same names and nothing else in `out` is touched."""
    target = _output(out, overwrite)
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    quiet_transformers()
    try:
        bundle = load_bundle(find_bundle(location).uri)
    except FileNotFoundError as error:
        raise SpecError(f"{field} = {str(location)!r}: {error}") from None
    model = bundle.model
    if bundle.compression and bundle.compression["variant"] == "int8":
        raise SpecError(f"{field} = {str(location)!r}: its bundle is the int8 variant (torch "
                        "dynamic quantization), which has no Hugging Face form; export the "
                        "winner (RUN_DIR/winner) or a pruned or distilled variant")
    if isinstance(model, GPT):
        hf_model = GPT2LMHeadModel(GPT2Config(**gpt2_config(model, bundle.info.eos_id)))
        hf_model.load_state_dict(gpt_state_to_hf(model.state_dict()))
        max_length = model.block_size
    elif isinstance(model, EncoderClassifier):
        hf_model, max_length = model.hf, model.max_length
    elif isinstance(model, Ensemble):
        raise SpecError(f"{field} = {str(location)!r}: its winner is an ensemble of "
                        f"{len(model.members)} trials (sweep.ensemble), which has no Hugging "
                        "Face form; run the job with sweep.ensemble 1 to export its best trial")
    else:
        spec = bundle.spec
        raise SpecError(f"{field} = {str(location)!r}: its winner is a {spec.model.task} of "
                        f"model.arch {spec.model.arch!r} ({type(model).__name__}), which has no "
                        "Hugging Face form; export writes GPT transformers and classifiers "
                        "fine-tuned from a Hugging Face checkpoint (model.pretrained)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bundle.tokenizer,
                                        model_max_length=max_length, **_special_tokens(bundle))
    texts = check_texts if check_texts is not None else bundle.spec.serve.sample_requests
    with tempfile.TemporaryDirectory(prefix="orchestrator-export-") as scratch:
        hf_model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        error = round_trip_error(bundle, scratch, texts) if texts else 0.0
        target.upload(scratch)  # adds and replaces files; removes none
    return Export(target.uri, error, len(texts))


def peft_adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    """The LoRA weights of our adapted GPT under peft's names for GPT2LMHeadModel (its adapter
    file's keys). The low-rank factors apply to the layer's input whatever the layout of the
    base weight, so they carry over unchanged across GPT-2's Conv1D transpose."""
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if ".lora_" not in name:
            continue
        _, index, rest = name.split(".", 2)  # blocks.I.attn.qkv.lora_A.default.weight
        module, factor = rest.split(".lora_")
        factor = factor.replace(".default.", ".")  # peft drops the adapter's name in its files
        state[f"base_model.model.transformer.h.{index}.{gpt2_module_name(module)}.lora_{factor}"] = \
            value.detach().clone().contiguous()
    return state


def export_peft(location: str | Path, out: str | Path, field: str = "RUN_DIR",
                check_texts: list[str] | None = None, overwrite: bool = False) -> Export:
    """Write the LoRA adapters of a GPT run's winner as a PEFT adapter directory, local or in
    object storage, and check that peft's model (the run's pretrained checkpoint with the
    adapters) gives the winner's logits on `check_texts` (default: serve.sample_requests)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import GPT2LMHeadModel

    target = _output(out, overwrite)
    quiet_transformers()
    try:
        latest = RunDir.of_job(location)  # runs/<job name>: that job's latest run
        run_dir = RunDir.open(latest.root if latest else location)
    except StorageError as error:
        raise SpecError(f"{field} = {str(location)!r}: {error} (a PEFT export reads the "
                        "winner's adapters from its run directory)") from None
    winner = load_bundle(run_dir.winner.uri)
    spec = winner.spec
    if spec.train.finetune != "lora" or not isinstance(winner.model, GPT):
        raise SpecError(f"{field} = {str(location)!r}: its winner is {spec.model.arch} "
                        f"{spec.model.task} with train.finetune {spec.train.finetune!r}; a PEFT "
                        "adapter comes from a GPT fine-tuned with train.finetune lora")
    provenance = json.loads(run_dir.winner.join(PROVENANCE_FILE).read_text())
    adapted = starting_model(spec, winner.info, run_dir.base)
    with resolve(provenance["checkpoint"]).local_copy() as checkpoint:
        load_model_weights(checkpoint, adapted)
    adapters = peft_adapter_state(adapted)
    modules = sorted({key.split(".")[-3] for key in adapters})  # c_attn, c_proj, c_fc
    lora = spec.train.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=modules, fan_in_fan_out=True, task_type="CAUSAL_LM")
    texts = check_texts if check_texts is not None else spec.serve.sample_requests
    with run_dir.base.local_copy() as base, \
            tempfile.TemporaryDirectory(prefix="orchestrator-export-") as scratch:
        peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), config)
        result = set_peft_model_state_dict(peft_model, adapters)
        if result.unexpected_keys:
            raise RuntimeError(f"peft does not know {result.unexpected_keys[:3]}")
        # The checkpoint the user named, not the run directory's staged copy of it.
        peft_model.peft_config["default"].base_model_name_or_path = spec.model.pretrained
        peft_model.save_pretrained(scratch)
        reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), scratch)
        worst = 0.0
        for text in texts:
            ids = torch.tensor([winner.tokenizer.encode(text).ids[: winner.info.context_length]])
            with torch.inference_mode():
                theirs = reloaded.eval()(input_ids=ids).logits
                worst = max(worst, float((theirs - winner.model(ids)).abs().max()))
        target.upload(scratch)
    return Export(target.uri, worst, len(texts))
