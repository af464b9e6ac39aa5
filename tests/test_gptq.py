"""GPTQ: lower output error than RTN on correlated inputs, same grid and format, and the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hq_vllm.format import HadaquantConfig, WeightQuantSpec, pack_linear, unpack_linear
from hq_vllm.offline.gptq import gptq_quantize, gptq_quantize_model
from hq_vllm.offline.pipeline import (
    QuantizeOptions,
    load_checkpoint_simulated,
    quantize_to_checkpoint,
    simulated_model,
)
from hq_vllm.offline.quantize import dequantize_weight, quantize_weight
from tests.tiny_models import TINY_ARCHS, tiny_model

N, K, T = 96, 256, 2048


def correlated_inputs(seed: int = 0, k: int = K, t: int = T) -> torch.Tensor:
    """``X = Z·A``: fresh Gaussian ``Z`` mixed by a random ``A`` (correlated channels, no zeros),
    plus a few loud channels, like the normalized residual stream."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen) @ torch.randn(k, k, generator=gen) / k**0.5
    x[:, :4] *= 8.0
    return x


def weight(seed: int = 1, n: int = N, k: int = K) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2.0 * x.T @ x / x.shape[0]


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, symmetric):
    spec = WeightQuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, mse_clip=True)
    x, w = correlated_inputs(), weight()
    rtn = quantize_weight(w, spec)
    gptq = gptq_quantize(w, hessian(x), spec)
    err_rtn = output_error(x, w, dequantize_weight(rtn, spec))
    err_gptq = output_error(x, w, dequantize_weight(gptq, spec))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    # Static groups: RTN's grid exactly, only the codes differ.
    assert torch.equal(gptq.scales, rtn.scales)
    assert (gptq.zeros is None) == symmetric
    if not symmetric:
        assert torch.equal(gptq.zeros, rtn.zeros)
    assert gptq.codes.dtype == torch.uint8 and gptq.codes.shape == w.shape
    assert int(gptq.codes.max()) < 2**bits


def test_act_order_keeps_codes_in_the_original_column_order():
    spec = WeightQuantSpec(bits=3, group_size=32, symmetric=True)
    x, w = correlated_inputs(), weight()
    x = x * torch.linspace(0.2, 3.0, K)[torch.randperm(K, generator=torch.Generator().manual_seed(3))]
    plain = gptq_quantize(w, hessian(x), spec)
    ordered = gptq_quantize(w, hessian(x), spec, act_order=True)
    err_rtn = output_error(x, w, dequantize_weight(quantize_weight(w, spec), spec))
    err_plain = output_error(x, w, dequantize_weight(plain, spec))
    err_ordered = output_error(x, w, dequantize_weight(ordered, spec))
    # Codes left in the permuted order would be a scrambled weight, far worse than RTN.
    assert err_ordered < 0.8 * err_rtn and err_ordered < 1.1 * err_plain
    assert torch.equal(ordered.scales, plain.scales)
    # With a diagonal Hessian no error propagates: both orders must give RTN's codes, column by column.
    h = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(4)) + 0.1).double()
    rtn = quantize_weight(w, spec)
    assert torch.equal(gptq_quantize(w, h, spec, act_order=True).codes, rtn.codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_result_round_trips_through_the_checkpoint_format(symmetric):
    spec = WeightQuantSpec(bits=3, group_size=64, symmetric=symmetric)
    x, w = correlated_inputs(), weight()
    qw = gptq_quantize(w, hessian(x), spec, act_order=True)
    tensors = pack_linear(qw.codes, qw.scales, qw.zeros, spec, prefix="lin")
    assert torch.equal(unpack_linear(tensors, "lin", spec, K), dequantize_weight(qw, spec))


def test_uncorrelated_inputs_give_rtn_or_better():
    spec = WeightQuantSpec(bits=4, group_size=32, symmetric=True)
    w = weight()
    assert torch.equal(gptq_quantize(w, torch.eye(K, dtype=torch.float64), spec).codes, quantize_weight(w, spec).codes)
    x = torch.randn(8 * K, K, generator=torch.Generator().manual_seed(5))
    err_rtn = output_error(x, w, dequantize_weight(quantize_weight(w, spec), spec))
    err_gptq = output_error(x, w, dequantize_weight(gptq_quantize(w, hessian(x), spec), spec))
    assert err_gptq <= 1.01 * err_rtn


def test_dead_column_gets_rtn_and_no_nan():
    spec = WeightQuantSpec(bits=3, group_size=32, symmetric=False)
    x, w = correlated_inputs(), weight()
    x[:, 7] = 0.0
    qw = gptq_quantize(w, hessian(x), spec)
    w_hat = dequantize_weight(qw, spec)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(qw.codes[:, 7], quantize_weight(w, spec).codes[:, 7])
    assert output_error(x, w, w_hat) < 0.8 * output_error(x, w, dequantize_weight(quantize_weight(w, spec), spec))


def test_deterministic_and_independent_of_block_size():
    spec = WeightQuantSpec(bits=3, group_size=32, symmetric=True)
    x, w = correlated_inputs(), weight()
    a = gptq_quantize(w, hessian(x), spec, act_order=True)
    b = gptq_quantize(w, hessian(x), spec, act_order=True)
    assert torch.equal(a.codes, b.codes)
    c = gptq_quantize(w, hessian(x), spec, act_order=True, block_size=32)
    assert float((a.codes != c.codes).float().mean()) < 0.01  # the same algorithm up to float rounding


def test_singular_hessian_without_damping_is_a_clear_error():
    spec = WeightQuantSpec(bits=4, group_size=32)
    x = correlated_inputs(t=K // 2)  # fewer tokens than channels: rank-deficient H
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(weight(), hessian(x), spec, damp=0.0)


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------


def logits_error(model, ref, ids) -> float:
    with torch.no_grad():
        out, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    return float((out - want).norm() / want.norm())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gptq_model_beats_rtn_on_calibration_text(arch):
    """Every architecture's layer fits the staged calibration, and GPTQ lowers the output error."""
    spec = WeightQuantSpec(bits=3, group_size=32, symmetric=True)
    config = HadaquantConfig(weight=spec)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    ref = tiny_model(arch)
    gptq = tiny_model(arch)
    quantized = gptq_quantize_model(gptq, config, ids, micro_batch=3, progress=False)
    assert len(quantized) == 2 * 7
    rtn = tiny_model(arch)
    with torch.no_grad():
        for name, lin in rtn.named_modules():
            if name in quantized:
                lin.weight.copy_(dequantize_weight(quantize_weight(lin.weight, spec), spec))
                # the model's weights are the dequantized GPTQ codes
                w = dict(gptq.named_modules())[name].weight
                assert torch.equal(w, dequantize_weight(quantized[name], spec))
    assert logits_error(gptq, ref, ids) < 0.9 * logits_error(rtn, ref, ids)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama whose vocabulary covers SmolLM2's tokenizer (calibration text is real)."""
    path = tmp_path_factory.mktemp("tiny-gptq") / "llama"
    model = tiny_model("llama", tied=True, hidden=64, intermediate=128)
    model.resize_token_embeddings(49152, mean_resizing=False)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / name, path / name)
    return path


def test_pipeline_gptq_checkpoint_reads_back(tiny_llama_dir, tmp_path):
    options = QuantizeOptions(recipe="w3a16", group_size=32, weight_method="gptq", calib_sequences=4,
                              calib_seq_len=64, act_order=True)  # rotated, with online R4
    summary = quantize_to_checkpoint(tiny_llama_dir, tmp_path / "ckpt", options, progress=False)
    assert summary.num_quantized == 2 * 7 and "GPTQ" in summary.render()
    qconfig = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qconfig["rotation"]["r4"] is not None
    assert qconfig["calibration"] == {
        "weight_method": "gptq", "seed": 0, "dataset": "boolq-calibration", "n_samples": 4, "seq_len": 64,
        "damp": 0.01, "act_order": True, "static_groups": True, "block_size": 128, "dtype": "bfloat16",
    }
    from_ckpt, _, _, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    in_memory, _, _, _ = simulated_model(tiny_llama_dir, options, progress=False)
    ids = torch.randint(3, 49152, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (m(input_ids=ids).logits for m in (from_ckpt, in_memory))
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5  # the checkpoint is the simulated model


def test_unknown_weight_method_is_a_clear_error():
    with pytest.raises(ValueError, match="gptq"):
        QuantizeOptions(weight_method="awq")
