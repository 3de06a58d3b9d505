"""Pretrained checkpoints in and winners out, without Ray: tiny GPT-2 and BERT-family
checkpoints made here with save_pretrained, loaded into the models a job trains, adapted with
LoRA, merged, and exported back to what transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.bench.checkpoints import tiny_encoder, tiny_gpt2
from orchestrator.bundle import write_bundle
from orchestrator.export import export_hf
from orchestrator.models import GPT, EncoderClassifier
from orchestrator.pretrained import inspect_base, stage_base
from orchestrator.records import DataInfo
from orchestrator.spec import SpecError, Task, parse_spec
from orchestrator.storage import resolve
from orchestrator.train.optim import build_optimizer
from orchestrator.weights.checkpoint import load_checkpoint, save_checkpoint
from orchestrator.weights.lora import merge_adapters, trainable_share
from orchestrator.weights.model import load_bundle, starting_model

TEXTS = ["The event loop runs the tasks", "Return the number of items in the queue."]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    made = {"gpt2": tiny_gpt2(root / "gpt2")}
    for kind in ("bert", "roberta", "distilbert"):
        made[kind] = tiny_encoder(root / kind, kind)
    return made


def _spec(family: str, pretrained: Path | str, **train):
    raw = tiny_spec(family, train=train)
    raw["model"] = {"family": family, "pretrained": str(pretrained), "dropout": 0.0}
    return parse_spec(raw)


def _staged(spec, tmp_path: Path) -> tuple[DataInfo, Path]:
    """What the data stage hands on: the checkpoint copied into base/ and the DataInfo."""
    base = stage_base(spec, resolve(tmp_path / "base"))
    labels = ["asyncio", "email", "logging"] if spec.model.task == Task.CLASSIFIER else []
    info = DataInfo(spec.model.task, base.config["vocab_size"], base.eos_id, base.pad_id,
                    spec.data.block_size if spec.model.task == Task.LANGUAGE_MODEL else spec.data.max_length,
                    labels=labels, special_tokens=base.special_tokens, architecture=base.config)
    return info, tmp_path / "base"


def _ids(tokenizer_dir: Path, text: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"]])


def test_a_gpt2_checkpoint_loads_into_our_gpt_with_its_logits(checkpoints, tmp_path):
    from transformers import GPT2LMHeadModel

    info, base = _staged(_spec("gpt", checkpoints["gpt2"]), tmp_path)
    ours = starting_model(_spec("gpt", checkpoints["gpt2"]), info, base).eval()
    theirs = GPT2LMHeadModel.from_pretrained(checkpoints["gpt2"]).eval()
    assert isinstance(ours, GPT) and ours.block_size == theirs.config.n_positions
    ids = _ids(checkpoints["gpt2"], TEXTS[0])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-5
    assert info.eos_id == info.pad_id == theirs.config.eos_token_id  # GPT-2 has no padding


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_an_encoder_checkpoint_becomes_a_classifier_with_its_encoder_weights(
        kind, checkpoints, tmp_path):
    from transformers import AutoModel

    spec = _spec("classifier", checkpoints[kind])
    info, base = _staged(spec, tmp_path)
    model = starting_model(spec, info, base).eval()
    encoder = AutoModel.from_pretrained(checkpoints[kind]).eval()
    ours, theirs = model.hf.base_model.state_dict(), encoder.state_dict()
    assert ours.keys() <= theirs.keys()  # RoBERTa's classifier has no pooler
    assert all(torch.equal(value, theirs[key]) for key, value in ours.items())
    assert len(model.blocks) == 2  # what FSDP shards and activation checkpointing wraps
    ids = _ids(checkpoints[kind], TEXTS[0])
    padded = torch.cat([ids, torch.full((1, 5), info.pad_id)], dim=1)
    with torch.no_grad():  # padding changes nothing; 3 labels come out
        assert model(ids).shape == (1, 3)
        assert torch.allclose(model(ids), model(padded), atol=1e-5)


def test_lora_trains_a_few_percent_and_its_checkpoint_holds_only_that(checkpoints, tmp_path):
    full_spec = _spec("gpt", checkpoints["gpt2"])
    lora_spec = _spec("gpt", checkpoints["gpt2"], finetune="lora")
    info, base = _staged(full_spec, tmp_path)
    sizes = {}
    for name, spec in (("full", full_spec), ("lora", lora_spec)):
        model = starting_model(spec, info, base)
        optimizer = build_optimizer(model, spec.train)
        model(torch.randint(0, 100, (2, 8))).sum().backward()
        optimizer.step()
        save_checkpoint(tmp_path / name, model, optimizer, {"step": 1}, rank=0)
        sizes[name] = sum(f.stat().st_size for f in (tmp_path / name).glob("*.distcp"))
        if name == "lora":
            share = trainable_share(model)
            adapted = model
    assert share <= 0.05
    assert sizes["full"] >= 10 * sizes["lora"]
    # The adapters come back from the checkpoint, over the pretrained weights.
    restored = starting_model(lora_spec, info, base)
    load_checkpoint(tmp_path / "lora", restored, build_optimizer(restored, lora_spec.train), 0)
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(restored.eval()(ids), adapted.eval()(ids))


def test_merged_adapters_give_the_adapted_model_as_a_plain_one(checkpoints, tmp_path):
    spec = _spec("gpt", checkpoints["gpt2"], finetune="lora")
    info, base = _staged(spec, tmp_path)
    model = starting_model(spec, info, base).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapters an effect
                param.normal_(std=0.5)
        ids = torch.randint(0, 100, (2, 10))
        adapted = model(ids)
        plain = starting_model(spec.model_copy(update={"train": spec.train.model_copy(
            update={"finetune": "full"})}), info, base).eval()
        assert (plain(ids) - adapted).abs().max() > 1e-3
        merged = merge_adapters(model)
        assert (merged(ids) - adapted).abs().max() < 1e-5
    assert merged.state_dict().keys() == plain.state_dict().keys()


def test_every_bad_pretrained_setting_is_refused_naming_the_field(checkpoints, tmp_path,
                                                                 monkeypatch):
    # No network here: the Hub answers at once that it is offline instead of after retries.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    def refused(raw_model: dict, data: dict | None = None, train: dict | None = None,
                family: str = "gpt") -> str:
        raw = tiny_spec(family, data=data or {}, train=train or {})
        raw["model"] = {"family": family, **raw_model}
        with pytest.raises(SpecError) as error:
            inspect_base(parse_spec(raw))
        return str(error.value)

    gpt2, bert = str(checkpoints["gpt2"]), str(checkpoints["bert"])
    assert "model.pretrained = '/nowhere/gpt2' does not exist" in refused(
        {"pretrained": "/nowhere/gpt2"})
    message = refused({"pretrained": "no-such-org/no-such-model"})
    assert "model.pretrained = 'no-such-org/no-such-model'" in message
    (tmp_path / "empty").mkdir()
    assert "neither a Hugging Face model directory" in refused({"pretrained": str(tmp_path / "empty")})
    assert "is a 'bert' model; model.task 'language_model' supports gpt2" in refused({"pretrained": bert})
    assert "supports bert, roberta, distilbert" in refused({"pretrained": gpt2},
                                                           family="classifier")
    assert "data.block_size = 256 is past the 128 positions" in refused(
        {"pretrained": gpt2}, data={"block_size": 256})
    assert "data.max_length = 200 is past the 128 positions" in refused(
        {"pretrained": bert}, data={"max_length": 200}, family="classifier")
    assert "train.lora.target_modules: 'c_attn' names no linear layer" in refused(
        {"pretrained": gpt2}, train={"finetune": "lora", "lora": {"target_modules": ["c_attn"]}})
    for raw_model, train, expected in (
            ({"pretrained": gpt2, "n_layer": 4}, {}, "model.n_layer = 4 is fixed by model.pretrained"),
            ({}, {"finetune": "lora"}, "train.finetune = 'lora' .* adapts a pretrained model")):
        raw = tiny_spec("gpt", train=train)
        raw["model"] = {"family": "gpt", **raw_model}
        with pytest.raises(SpecError, match=expected):
            parse_spec(raw)


def _rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def test_a_from_scratch_gpt_exports_to_what_transformers_loads_with_our_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(tiny_spec("gpt"))
    bundle_dir = initial_bundle(tmp_path / "bundle", spec, _rows()[:200])
    export = export_hf(bundle_dir, tmp_path / "hf", check_texts=TEXTS)
    assert export.max_logit_difference <= 1e-4 and export.texts_checked == 2
    # Loaded here too, as a user would: the same ids and logits as our bundle's.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_bundle(bundle_dir)
    ids = tokenizer(TEXTS[1], return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ours.tokenizer.encode(TEXTS[1]).ids
    with torch.no_grad():
        assert (model(ids).logits - ours.model(ids)).abs().max() <= 1e-4
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<pad>"


def test_a_fine_tuned_encoder_classifier_exports_with_its_labels(checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification

    spec = _spec("classifier", checkpoints["roberta"])
    info, base = _staged(spec, tmp_path)
    model = starting_model(spec, info, base)
    bundle_dir = tmp_path / "bundle"
    write_bundle(bundle_dir, spec, info, model.state_dict(), base / "tokenizer.json", {}, {})
    export = export_hf(bundle_dir, tmp_path / "hf", check_texts=TEXTS)
    assert export.max_logit_difference <= 1e-4
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert list(loaded.config.id2label.values()) == info.labels
    assert isinstance(load_bundle(bundle_dir).model, EncoderClassifier)


def test_export_refuses_an_architecture_without_a_hugging_face_form(tmp_path):
    spec = parse_spec(tiny_spec("classifier", model={"arch": "bow"}))
    bundle_dir = initial_bundle(tmp_path / "bundle", spec, _rows()[:200])
    with pytest.raises(SpecError, match="model.arch 'bow' .* has no Hugging Face form"):
        export_hf(bundle_dir, tmp_path / "hf")


def test_an_earlier_run_of_ours_is_a_starting_point_with_its_weights(tmp_path):
    """model.pretrained = runs/<job name>: the new job starts from exactly the job's latest
    winner's model and tokenizer."""
    spec = parse_spec(tiny_spec("gpt"))
    runs = tmp_path / "runs"
    initial_bundle(runs / "pretrain-20261130-080000" / "winner", spec, _rows()[:100])
    latest = runs / "pretrain-20261130-090000" / "winner"
    earlier = load_bundle(initial_bundle(latest, spec, _rows()[:200]))
    follow_up = _spec("gpt", runs / "pretrain")
    info, base = _staged(follow_up, tmp_path)
    model = starting_model(follow_up, info, base).eval()
    ids = torch.tensor([earlier.tokenizer.encode(TEXTS[0]).ids])
    with torch.no_grad():
        assert (model(ids) - earlier.model(ids)).abs().max() < 1e-6
    assert (info.eos_id, info.pad_id) == (earlier.info.eos_id, earlier.info.pad_id)
