"""The FLOPs estimate, the peak FLOP/s table and MFU; the MFU benchmark refuses to run on CPU."""

from __future__ import annotations

import pytest
import torch

from orchestrator.models import GPT, TextClassifier
from orchestrator.train import flops
from orchestrator.train.flops import (
    flops_per_token,
    mfu,
    model_flops_per_token,
    non_embedding_params,
    peak_flops,
)


def _gpt() -> GPT:
    return GPT(vocab_size=20, block_size=4, n_layer=1, n_head=2, d_model=8, dropout=0.0)


def test_flops_per_token_by_hand():
    # 6 * 100 + 12 * 2 layers * 8 wide * 16 tokens = 600 + 3072
    assert flops_per_token(100, n_layer=2, d_model=8, seq_len=16) == 3672.0


def test_non_embedding_params_drops_wpe_and_counts_the_tied_head_once():
    model = _gpt()
    # wte 20*8; block: 2 LayerNorms 2*16, qkv 8*24+24, proj 8*8+8, fc 8*32+32, proj 32*8+8; ln_f 16
    by_hand = 160 + 32 + 216 + 72 + 288 + 264 + 16
    assert non_embedding_params(model) == by_hand == 1048
    unique = {p.data_ptr(): p.numel() for p in model.state_dict().values()}
    assert non_embedding_params(model) == sum(unique.values()) - model.wpe.weight.numel()
    with_tied_twice = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_tied_twice == by_hand + 32 + model.wte.weight.numel()  # the head is tied to wte


def test_model_flops_per_token_for_gpt_and_none_for_the_classifier():
    assert model_flops_per_token(_gpt(), seq_len=4) == 6 * 1048 + 12 * 1 * 8 * 4
    classifier = TextClassifier(vocab_size=20, num_classes=3, max_length=8, pad_id=0, n_layer=1,
                                n_head=2, d_model=8, dropout=0.0)
    assert model_flops_per_token(classifier, seq_len=8) is None


def test_peak_flops_is_none_on_cpu():
    for dtype in (torch.bfloat16, torch.float32):
        assert peak_flops(torch.device("cpu"), dtype) is None


@pytest.mark.parametrize("name, bf16, fp32, tf32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 66.9e12, 494.5e12),
    ("NVIDIA H100 PCIe", 756e12, 51.2e12, 378e12),
    ("NVIDIA H200", 989e12, 66.9e12, 494.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 19.5e12, 156e12),
    ("NVIDIA A10G", 125e12, 31.2e12, 62.5e12),
    ("NVIDIA L40S", 362e12, 91.6e12, 183e12),
    ("NVIDIA L4", 121e12, 30.3e12, 60e12),
])
def test_peak_flops_table_picks_the_most_specific_name(monkeypatch, name, bf16, fp32, tf32):
    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert peak_flops(cuda, torch.bfloat16) == peak_flops(cuda, torch.float16) == bf16
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot undo it
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert peak_flops(cuda, torch.float32) == fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        assert peak_flops(cuda, torch.float32) == tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_peak_flops_is_none_for_an_unknown_gpu(monkeypatch):
    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "Some New GPU")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) is None


def test_mfu_arithmetic_and_none_without_a_peak():
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    assert mfu(1000.0, 1e9, None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_mfu_bench_needs_cuda():
    from orchestrator.bench import mfu as bench_mfu

    with pytest.raises(RuntimeError, match="CUDA"):
        bench_mfu.run(quick=True)
