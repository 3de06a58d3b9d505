"""Many LoRA adapters of one base GPT: the engine decodes rows of different adapters (and of the
base) in one continuous batch, each giving what the adapter merged into the base gives alone;
adapters load into slots on demand and the least recently used idle one is evicted. Then on a
real Serve: one app serves the base and two adapters, picked by `model` on its own route and
through the front. Adapters are made with peft on a tiny GPT-2 (random weights) and saved as
peft saves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from orchestrator.bench.adapters import lora_family, make_adapter
from orchestrator.bench.checkpoints import tiny_gpt2
from orchestrator.inference.engine import Engine
from orchestrator.inference.sampling import SamplingParams
from orchestrator.models import GPT
from orchestrator.models.hf import gpt_from_config, gpt_state_from_hf
from orchestrator.weights.adapters import AdapterError, AdapterPool

PROMPTS = ["Return the", "A", "Return a new list of", "Create a new"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


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
            "qkv": make_adapter(base, root / "qkv", 1, ["c_attn"], r=4),
            "all": make_adapter(base, root / "all", 2, ["c_attn", "c_proj", "c_fc"], r=8),
            "mlp": make_adapter(base, root / "mlp", 3, ["c_fc"], r=4)}


@pytest.fixture(scope="module")
def tokenizer(family: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(family["base"] / "tokenizer.json"))


class Decoded:
    """Steps an engine to the end and gathers each request's text."""

    def __init__(self, engine: Engine, params: SamplingParams = GREEDY):
        self.engine, self.params, self.text = engine, params, {}

    def add(self, rid, prompt: str, adapter: str | None) -> None:
        tokenizer = self.engine.tokenizer
        self.engine.add(rid, [tokenizer.encode(prompt).ids], [self.params], adapter)
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


def alone(model: GPT, tokenizer: Tokenizer, prompt: str, params: SamplingParams = GREEDY) -> str:
    decoded = Decoded(Engine(model, tokenizer, tokenizer.token_to_id("<|endoftext|>"), 1), params)
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
    decoded.step()
    assert sorted(pool.loaded) == ["all", "qkv"] and engine.num_waiting == 1
    assert pool.loads == 2  # waiting for a slot reads nothing
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


def test_one_app_serves_a_base_and_two_adapters_by_model_on_its_route_and_through_the_front(
        serving: int, tmp_path: Path) -> None:
    import requests

    from orchestrator.bundle import read_spec_and_info
    from orchestrator.serve import DeployError, deploy, endpoint_url, services
    from orchestrator.spec import ServeSpec

    family = lora_family(tmp_path, 2, name="fam", targets=("c_attn", "c_proj", "c_fc"))
    winner = family.run_dir / "winner"
    spec, _ = read_spec_and_info(winner)
    adapters = {name: str(path) for name, path in family.adapters.items()}
    serve = ServeSpec.model_validate({**spec.serve.model_dump(), "port": serving,
                                      "adapters": adapters, "max_adapters": 2})
    spec = spec.model_copy(update={"serve": serve})
    wrong = spec.model_copy(update={"serve": serve.model_copy(update={
        "adapters": {**adapters, "fam": adapters["a0"]}})})
    with pytest.raises(DeployError, match="serve.adapters.fam: an adapter cannot have the "
                                          "model's own name"):
        deploy(wrong, winner)
    own = deploy(spec, winner)
    front = endpoint_url(spec)

    def completion(url: str, model: str) -> requests.Response:
        return requests.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})

    tokenizer = Tokenizer.from_file(str(family.base / "tokenizer.json"))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = {name: alone(model, tokenizer, PROMPTS[0], params) for name, model in (
        ("fam", base_gpt(family.base)),
        *((n, merged_gpt(family.base, p)) for n, p in family.adapters.items()))}
    assert len(set(expected.values())) == 3
    for url, model, answers in ((own, "a0", "a0"), (front, "a1", "a1"), (front, "fam:a0", "a0"),
                                (own, "fam", "fam"), (front, "fam", "fam")):
        answer = completion(url, model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected[answers], (url, model)
        assert answer.json()["model"] == model.removeprefix("fam:")

    listed = {card["id"]: card for card in requests.get(f"{front}/v1/models", timeout=60)
              .json()["data"]}
    assert listed["fam"]["adapters"] == ["a0", "a1"]
    assert listed["a0"]["parent"] == listed["a1"]["parent"] == "fam"
    unknown = completion(own, "fam:a9")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == ("model 'fam:a9' does not exist; this service "
                                                  "serves 'fam', 'a0', 'a1'")
    assert completion(front, "fam:a9").json()["error"]["code"] == "model_not_found"
    assert completion(front, "a9").json()["error"]["code"] == "model_not_found"
    [served] = [s.served for s in services() if s.served and s.served.model == "fam"]
    assert served.adapters == ("a0", "a1")


def test_an_adapter_name_that_a_model_field_could_not_carry_is_refused_by_the_spec() -> None:
    from orchestrator.spec import ServeSpec

    with pytest.raises(ValueError, match=r"adapter name 'fam:a0': letters, digits"):
        ServeSpec(adapters={"fam:a0": "adapters/a0"})
    assert ServeSpec(adapters={"support-v2": "adapters/s"}).max_adapters == 8
