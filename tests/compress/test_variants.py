"""The compressed variants without Ray: int8 bundles that load and serve, global pruning and the
masks a recovery keeps, the distillation loss and the student's start, the selection rule, and
every compress setting that cannot work refused by the spec."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE, tiny_spec

from orchestrator.bench.bundles import initial_bundle
from orchestrator.bundle import write_bundle
from orchestrator.compress.distill import (
    distillation_objective,
    init_from_teacher,
    student_spec_and_info,
)
from orchestrator.compress.measure import size_bytes
from orchestrator.compress.prune import prune_globally, sparsity_of
from orchestrator.compress.stage import check_compression, choose, quality_loss
from orchestrator.inference.predictor import Predictor, SamplingParams
from orchestrator.models import build_model
from orchestrator.records import CompressedVariant
from orchestrator.spec import SpecError, Task, parse_spec
from orchestrator.tokenizer import TOKENIZER_FILE, save_tokenizer
from orchestrator.train.masks import apply_masks, zero_masks
from orchestrator.train.objectives import lm_loss
from orchestrator.weights.int8 import quantize_int8
from orchestrator.weights.model import load_bundle


@pytest.fixture(scope="module")
def gpt_bundle(tmp_path_factory):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:300]]
    spec = parse_spec(tiny_spec("gpt", model={"n_layer": 2, "d_model": 64}))
    return initial_bundle(tmp_path_factory.mktemp("gpt") / "winner", spec, rows)


def test_an_int8_bundle_is_smaller_loads_as_int8_and_serves_the_same_text(gpt_bundle, tmp_path):
    winner = load_bundle(gpt_bundle)
    model = quantize_int8(winner.model, clip_percentile=None)
    save_tokenizer(winner.tokenizer, tmp_path)
    int8_dir = tmp_path / "int8"
    write_bundle(int8_dir, winner.spec, winner.info, model.state_dict(),
                 tmp_path / TOKENIZER_FILE, {}, {}, compression={"variant": "int8"})
    assert size_bytes(int8_dir) <= 0.4 * size_bytes(gpt_bundle)
    loaded = load_bundle(int8_dir)
    assert loaded.compression == {"variant": "int8"}
    assert type(loaded.model.blocks[0].mlp.fc).__name__ == "Linear" and \
        type(loaded.model.blocks[0].mlp.fc).__module__.startswith("torch.ao.nn.quantized")
    ids = torch.randint(0, winner.info.vocab_size, (4, 33))
    with torch.no_grad():
        fp32, int8 = float(lm_loss(winner.model, ids)), float(lm_loss(loaded.model, ids))
    assert int8 == pytest.approx(fp32, rel=0.02)
    # The serving engine decodes it (greedy), next to a prompt of another length in its batch.
    prompts = [[5, 6, 7], [8]]
    out = Predictor(loaded).complete(prompts, [SamplingParams(max_tokens=6, temperature=0)] * 2)
    assert all(c.completion_tokens >= 1 for c in out)


def test_clipping_bounds_every_weight_at_its_percentile(gpt_bundle):
    model = load_bundle(gpt_bundle).model
    weight = model.blocks[0].mlp.fc.weight.detach().abs()
    bound = float(torch.quantile(weight.flatten(), 0.99))
    from orchestrator.weights.int8 import clip_weights

    clip_weights(model, 99.0)
    assert float(model.blocks[0].mlp.fc.weight.abs().max()) == pytest.approx(bound, rel=1e-5)


def test_global_pruning_reaches_the_sparsity_and_masks_keep_it(gpt_bundle):
    model = load_bundle(gpt_bundle).model
    embedding = model.wte.weight.detach().clone()
    assert prune_globally(model, 0.5) == pytest.approx(0.5, abs=0.01)
    assert torch.equal(model.wte.weight, embedding)  # embeddings and head are kept whole
    masks = zero_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lm_loss(model, torch.randint(0, 100, (2, 17))).backward()
    optimizer.step()
    assert sparsity_of(model) < 0.5  # the step moved pruned weights...
    apply_masks(model, masks)
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)  # ...and the masks put them back


def test_the_distillation_loss_mixes_soft_and_hard_targets(gpt_bundle):
    teacher = load_bundle(gpt_bundle).model.eval()
    spec = parse_spec(tiny_spec("gpt", model={"n_layer": 2, "d_model": 64}))
    student_spec, info = student_spec_and_info(spec, load_bundle(gpt_bundle).info)
    assert student_spec.model.n_layer == 1 and student_spec.compress.variants == []
    student = build_model(student_spec, info)
    assert init_from_teacher(student, teacher) > 0
    assert torch.equal(student.wte.weight, teacher.wte.weight)
    assert torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    batch = {"ids": torch.randint(0, info.vocab_size, (2, 17))}
    hard_only = distillation_objective(Task.LANGUAGE_MODEL, teacher, 2.0, alpha=0.0).loss(student, batch)
    assert float(hard_only) == pytest.approx(float(lm_loss(student, batch["ids"])), rel=1e-5)
    # The teacher distilled into itself: no soft loss left.
    soft_only = distillation_objective(Task.LANGUAGE_MODEL, teacher, 2.0, alpha=1.0).loss(teacher, batch)
    assert abs(float(soft_only)) < 1e-5


def _variant(name: str, loss: float, speed: float, size: int = 100, bound: float = 0.02):
    return CompressedVariant(name, f"/{name}", 1.0, loss, size, {"decode_tokens_per_s_batch1": speed},
                   within_bound=loss <= bound)


def test_the_fastest_variant_within_the_quality_bound_is_served():
    winner = _variant("winner", 0.0, 100.0)
    assert choose([winner, _variant("int8", 0.01, 150.0), _variant("distill", 0.10, 300.0)],
                  Task.LANGUAGE_MODEL).name == "int8"  # distill is faster but loses too much
    assert choose([winner, _variant("int8", 0.05, 150.0)], Task.LANGUAGE_MODEL).name == "winner"
    assert choose([winner, _variant("prune", 0.0, 100.0, size=50)], Task.LANGUAGE_MODEL).name == "prune"
    # 3 % slower is a tie with the fastest (measurement noise); the smaller bundle wins it.
    assert choose([winner, _variant("int8", 0.0, 97.0, size=30)], Task.LANGUAGE_MODEL).name == "int8"
    assert choose([winner, _variant("int8", 0.0, 90.0, size=30)], Task.LANGUAGE_MODEL).name == "winner"
    assert quality_loss(102.0, 100.0, Task.LANGUAGE_MODEL) == pytest.approx(0.02)  # perplexity up 2 %
    assert quality_loss(0.78, 0.80, Task.CLASSIFIER) == pytest.approx(0.025)  # accuracy down


@pytest.mark.parametrize(("family", "sections", "expected"), [
    ("gpt", {"compress": {"variants": ["int8"]}, "serve": {"replica_gpus": 1}},
     "compress.variants 'int8' is dynamic quantization for CPU serving and serve.replica_gpus"),
    ("classifier", {"compress": {"variants": ["prune"]}, "model": {"arch": "bow"}},
     "compress.variants 'prune' works on transformer blocks and model.arch 'bow'"),
    ("gpt", {"compress": {"variants": ["distill"]},
             "sweep": {"space": {"model.arch": {"grid": ["transformer", "lstm"]}}}},
     "compress.variants 'distill' works on transformer blocks and model.arch 'lstm'"),
    ("gpt", {"compress": {"variants": ["distill"], "distill": {"n_layer": 2}},
             "model": {"n_layer": 2}},
     "compress.distill.n_layer = 2 is not smaller than the teacher's model.n_layer = 2"),
    ("gpt", {"compress": {"variants": ["int8"], "max_quality_loss": -0.01}},
     "compress.max_quality_loss = -0.01: Input should be greater than or equal to 0"),
    ("gpt", {"compress": {"variants": ["int8", "int8"]}}, "each variant at most once"),
])
def test_a_compression_that_cannot_work_is_refused_naming_the_field(family, sections, expected):
    with pytest.raises(SpecError) as error:
        parse_spec(tiny_spec(family, **sections))
    assert expected in str(error.value)


def test_a_one_block_teacher_has_no_smaller_student(gpt_bundle):
    with pytest.raises(SpecError, match="needs a teacher of at least 2 blocks"):
        parse_spec(tiny_spec("gpt", compress={"variants": ["distill"]}))  # n_layer 1
    # A sweep over model.n_layer may still pick 1: refused when compress starts, before work.
    swept = parse_spec(tiny_spec("gpt", compress={"variants": ["distill"]}, model={"n_layer": 2},
                                 sweep={"space": {"model.n_layer": {"choice": [1, 2]}}}))
    winner = swept.model_copy(update={"model": swept.model.model_copy(update={"n_layer": 1})})
    with pytest.raises(SpecError, match="the winner has 1 transformer block"):
        check_compression(winner, load_bundle(gpt_bundle).info)


@pytest.mark.parametrize(("family", "arch"), [("gpt", "transformer"), ("gpt", "lstm"),
                                              ("classifier", "transformer"),
                                              ("classifier", "lstm"), ("classifier", "bow"),
                                              ("classifier", "linear")])
def test_every_architecture_quantizes_to_int8_with_nearly_the_same_outputs(family, arch):
    from orchestrator.records import DataInfo

    spec = parse_spec(tiny_spec(family, model={"arch": arch, "lstm": {"d_model": 32},
                                               "bow": {"d_model": 16, "buckets": 1024},
                                               "linear": {"buckets": 1024}}))
    info = DataInfo(family, 200, 0, 1, 16, labels=["a", "b", "c"])
    torch.manual_seed(0)
    model = build_model(spec, info).eval()
    if arch == "linear":  # it starts at zero: give it weights that answer something
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.1)
    ids = torch.randint(2, 200, (3, 16))
    ids[0, 9:] = info.pad_id  # a padded row beside full ones
    with torch.no_grad():
        expected, got = model(ids), quantize_int8(model)(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 0.05 * expected.abs().max() + 1e-3
