"""Many LoRA adapters of one base GPT: the engine decodes rows of different adapters (and of the
base) in one continuous batch, each giving what the adapter merged into the base gives alone;
adapters load into slots on demand and the least recently used idle one is evicted. Adapters
are made here with peft on a tiny GPT-2 (random weights) and saved as peft saves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from orchestrator.bench.checkpoints import tiny_gpt2
from orchestrator.inference.engine import Engine
from orchestrator.inference.sampling import SamplingParams
from orchestrator.models import GPT
from orchestrator.models.hf import gpt_from_config, gpt_state_from_hf
from orchestrator.weights.adapters import AdapterError, AdapterPool

PROMPTS = ["Return the", "A", "Return a new list of", "Create a new"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int = 4) -> Path:
    """A LoRA adapter of random (non-zero) factors, saved by peft as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, fan_in_fan_out=True,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    model.save_pretrained(out)
    return out


def our_gpt(hf_model) -> GPT:
    model = gpt_from_config(hf_model.config.to_dict(), 0.0)
    model.load_state_dict(gpt_state_from_hf(hf_model.state_dict()))
    return model.eval()


def base_gpt(base: Path) -> GPT:
    from transformers import GPT2LMHeadModel

    return our_gpt(GPT2LMHeadModel.from_pretrained(base))


def merged_gpt(base: Path, adapter: Path) -> GPT:
    """The adapter merged into the base by peft itself: what a run's merged winner is."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    return our_gpt(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter)
                   .merge_and_unload())


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 base and three adapters of it: on attention only, on every linear layer
    (rank 8), and on the MLP."""
    root = tmp_path_factory.mktemp("family")
    base = tiny_gpt2(root / "base")
    return {"base": base,
            "qkv": make_adapter(base, root / "qkv", 1, ["c_attn"]),
            "all": make_adapter(base, root / "all", 2, ["c_attn", "c_proj", "c_fc"], r=8),
            "mlp": make_adapter(base, root / "mlp", 3, ["c_fc"])}


@pytest.fixture(scope="module")
def tokenizer(family: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(family["base"] / "tokenizer.json"))


class Decoded:
    """Steps an engine to the end and gathers each request's text."""

    def __init__(self, engine: Engine):
        self.engine, self.text = engine, {}

    def add(self, rid, prompt: str, adapter: str | None) -> None:
        tokenizer = self.engine.tokenizer
        self.engine.add(rid, [tokenizer.encode(prompt).ids], [GREEDY], adapter)
        self.text[rid] = ""

    def step(self) -> None:
        for output in self.engine.step():
            assert output.error is None, output.error.message
            for _, update in output.updates:
                self.text[output.request_id] += update.text

    def run(self) -> dict:
        while self.engine.has_work:
            self.step()
        return dict(self.text)


def alone(model: GPT, tokenizer: Tokenizer, prompt: str) -> list[int]:
    decoded = Decoded(Engine(model, tokenizer, tokenizer.token_to_id("<|endoftext|>"), 1))
    decoded.add(0, prompt, None)
    return decoded.run()[0]


def test_one_batch_mixes_two_adapters_and_the_base_each_as_its_merged_model_alone(
        family: dict[str, Path], tokenizer: Tokenizer) -> None:
    model = base_gpt(family["base"])
    pool = AdapterPool(model, {"qkv": str(family["qkv"]), "all": str(family["all"])},
                       max_adapters=2)
    engine = Engine(model, tokenizer, tokenizer.token_to_id("<|endoftext|>"), max_batch_size=8,
                    adapters=pool)
    decoded = Decoded(engine)
    asked = [(i, prompt, adapter) for i, (prompt, adapter) in enumerate(
        (p, a) for a in ("qkv", None, "all") for p in PROMPTS[:2])]
    for rid, prompt, adapter in asked[:3]:
        decoded.add(rid, prompt, adapter)
    decoded.step()  # the first three run; the rest join the running batch a step later
    for rid, prompt, adapter in asked[3:]:
        decoded.add(rid, prompt, adapter)
    decoded.step()
    assert engine.last_batch_size == 6  # one batch: two adapters and the base
    got = decoded.run()

    references = {None: base_gpt(family["base"]),
                  "qkv": merged_gpt(family["base"], family["qkv"]),
                  "all": merged_gpt(family["base"], family["all"])}
    for rid, prompt, adapter in asked:
        assert got[rid] == alone(references[adapter], tokenizer, prompt), (prompt, adapter)
    # The adapters change what the base answers, and each differently.
    assert len({got[rid] for rid, prompt, _ in asked if prompt == PROMPTS[0]}) == 3


def test_adapters_load_on_demand_and_the_least_recently_used_idle_one_is_evicted(
        family: dict[str, Path], tokenizer: Tokenizer) -> None:
    model = base_gpt(family["base"])
    paths = {name: str(family[name]) for name in ("qkv", "all", "mlp")}
    pool = AdapterPool(model, paths, max_adapters=2)
    engine = Engine(model, tokenizer, tokenizer.token_to_id("<|endoftext|>"), max_batch_size=8,
                    adapters=pool)
    assert pool.loaded == []  # nothing is read before a request asks
    decoded = Decoded(engine)
    decoded.add("q", PROMPTS[0], "qkv")
    decoded.add("a", PROMPTS[0], "all")
    decoded.add("m", PROMPTS[0], "mlp")  # no free slot while qkv and all run: it waits
    decoded.step()
    assert sorted(pool.loaded) == ["all", "qkv"] and engine.num_waiting == 1
    got = decoded.run()
    assert pool.loaded == ["all", "mlp"]  # qkv, least recently used, made room
    decoded.add("q2", PROMPTS[0], "qkv")  # back again: evicts all, loaded again
    got.update(decoded.run())
    assert pool.loaded == ["mlp", "qkv"] and pool.loads == 4
    assert got["q"] == got["q2"] == alone(merged_gpt(family["base"], family["qkv"]), tokenizer,
                                          PROMPTS[0])
    assert got["m"] == alone(merged_gpt(family["base"], family["mlp"]), tokenizer, PROMPTS[0])


def test_an_unknown_adapter_and_a_pickled_one_are_refused_by_name(
        family: dict[str, Path], tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = base_gpt(family["base"])
    pool = AdapterPool(model, {"qkv": str(family["qkv"])}, max_adapters=1)
    engine = Engine(model, tokenizer, 0, adapters=pool)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; this engine serves \['qkv'\]"):
        engine.add(0, [[1, 2]], [GREEDY], "nope")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((family["qkv"] / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="serve.adapters.old = .*adapter_model.safetensors"):
        AdapterPool(base_gpt(family["base"]), {"old": str(pickled)}, max_adapters=1)
    config = json.loads((family["qkv"] / "adapter_config.json").read_text())
    (pickled / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (pickled / "adapter_model.safetensors").write_bytes(
        (family["qkv"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="use_dora True"):
        AdapterPool(base_gpt(family["base"]), {"dora": str(pickled)}, max_adapters=1)
