"""Weight-only dequant GEMM (kernels/gemm.py): Triton kernel vs torch reference vs the format.

The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, read at call time, set per
test with monkeypatch as in test_fwht.py); the fixture makes the reference fallback raise, so what
is compared is the kernel. Sizes are small (the interpreter executes every program in numpy) but
keep the shapes that matter: K a multiple of 32 that is not a power of two (576, 384 = 3·128,
1536 = 3·512), N not a multiple of the tile, M = 1 (GEMV path), 3 and 17 (dot path, a partial
and more than one M tile), split-K with a ragged last split. Inputs are fresh random values with
no exact zeros (scales > 0, activations Gaussian).
"""

from __future__ import annotations

import pytest
import torch

from hq_vllm.format import WeightQuantSpec, pack_linear, unpack_linear
from hq_vllm.kernels import gemm
from hq_vllm.kernels.gemm import dequant_gemm, dequant_gemm_reference, plan_dequant_gemm

reference = dequant_gemm_reference  # bound before the fixture replaces the module's name

# Group size -> K (multiple of the group, not a power of two).
K_FOR_GROUP = {32: 576, 64: 576, 128: 384, -1: 576}


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton kernel under the interpreter; fail if the torch fallback is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("dequant_gemm fell back to the reference")

    monkeypatch.setattr(gemm, "dequant_gemm_reference", no_fallback)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _linear(n: int, k: int, bits: int, group: int, symmetric: bool, seed: int):
    """Checkpoint tensors (qweight, scales, qzeros or None) of a random quantized linear."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    spec = WeightQuantSpec(bits=bits, group_size=group, symmetric=symmetric)
    t = pack_linear(codes, scales, zeros, spec)
    return t["qweight"], t["scales"], t.get("qzeros"), spec, t


def _x(m: int, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_kernel_matches_reference(bits, symmetric, group, m, interpreter):
    k, n = K_FOR_GROUP[group], 72
    seed = 1000 * bits + 100 * symmetric + group + m
    qw, s, z, _, _ = _linear(n, k, bits, group, symmetric, seed)
    x = _x(m, k, seed)
    # Tiles of 32 columns: N = 72 is two full tiles and a partial one.
    plan = plan_dequant_gemm(m, n, k, x.device, block_n=32)
    assert plan.use_dot == (m > gemm._GEMV_MAX_M)
    y = dequant_gemm(x, qw, s, z, bits, group, plan=plan)
    want = reference(x, qw, s, z, bits, group)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert _rel(y, want) < 2e-4


@pytest.mark.parametrize("group", [64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gemv_matches_reference(bits, symmetric, group, interpreter):
    """The GEMV path with multi-group, multi-warp tiles, forced for M = 1..8: N = 160 is one
    full 128-column group and a partial one; K = 384 (12 blocks) in tiles of 4 blocks over
    4 warps (the heuristic's split-K on the interpreter's 4 SMs) or of 2 blocks with a pinned
    ragged split of 5 x 2 + 1 x 2 (M cycles through 1..8 over the parameter grid)."""
    k, n = 384, 160
    m = 1 + (3 * bits + 2 * symmetric + {64: 0, 128: 1, -1: 2}[group]) % 8
    seed = 2000 * bits + 100 * symmetric + group
    qw, s, z, _, _ = _linear(n, k, bits, group, symmetric, seed)
    x = _x(m, k, seed)
    want = reference(x, qw, s, z, bits, group)
    for block_n, block_k, warps, split in ((256, 128, 4, None), (64, 64, 2, 5)):
        plan = plan_dequant_gemm(m, n, k, x.device, use_dot=False, block_n=block_n, block_k=block_k,
                                 num_warps=warps, split_k=split)
        y = dequant_gemm(x, qw, s, z, bits, group, plan=plan)
        assert y.shape == (m, n) and torch.isfinite(y).all()
        assert _rel(y, want) < 2e-4, (plan, _rel(y, want))
    if m == 1:  # the default plan takes it too
        assert _rel(dequant_gemm(x[:1], qw, s, z, bits, group), want[:1]) < 2e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dot_whole_tiles(dtype, interpreter):
    """Dot path with K a whole number of tiles (no padding of the field-major activations)."""
    bits, group, m, n, k = 3, 128, 3, 40, 1024
    qw, s, z, _, _ = _linear(n, k, bits, group, True, 81)
    x = _x(m, k, 82, dtype)
    for split in (1, 2):
        plan = plan_dequant_gemm(m, n, k, x.device, use_dot=True, split_k=split)
        y = dequant_gemm(x, qw, s, z, bits, group, out_dtype=torch.float32, plan=plan)
        want = reference(x, qw, s, z, bits, group, out_dtype=torch.float32)
        assert _rel(y, want) < 2e-4


@pytest.mark.parametrize("use_dot", [False, True], ids=["gemv", "dot"])
@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_split_k(use_dot, split_k, interpreter):
    """K = 1600 (50 blocks: the last tile partial); splits of whole tiles, the last split shorter
    where they don't divide, and never an empty split."""
    bits, group, m, n, k = 3, 64, 1 if not use_dot else 2, 40, 1600
    qw, s, z, _, _ = _linear(n, k, bits, group, True, 7 + split_k)
    x = _x(m, k, 11 + split_k)
    plan = plan_dequant_gemm(m, n, k, x.device, use_dot=use_dot, block_k=256 if not use_dot else 512,
                             split_k=split_k)
    k_tiles = -(-k // plan.block_k)
    assert plan.split_k == -(-k_tiles // plan.tiles_per_split) <= split_k
    assert (plan.split_k - 1) * plan.tiles_per_split < k_tiles
    y = dequant_gemm(x, qw, s, z, bits, group, plan=plan)
    assert _rel(y, reference(x, qw, s, z, bits, group)) < 2e-4
    assert torch.equal(y, dequant_gemm(x, qw, s, z, bits, group, plan=plan))  # deterministic
    if plan.split_k > 1:
        assert int(gemm._TICKETS[x.device].abs().sum()) == 0  # tickets left ready


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4])
def test_half_precision_bias_and_out_dtype(dtype, m, interpreter):
    bits, group, n, k = 4, 64, 48, 576
    qw, s, z, _, _ = _linear(n, k, bits, group, False, 3 + m)
    x = _x(m, k, 5 + m, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9)).to(dtype)
    y = dequant_gemm(x, qw, s, z, bits, group, bias=bias)
    want = reference(x, qw, s, z, bits, group, out_dtype=torch.float32, bias=bias)
    assert y.dtype == dtype and _rel(y, want) < 1e-2  # the output's own rounding
    y32 = dequant_gemm(x, qw, s, z, bits, group, out_dtype=torch.float32, bias=bias)
    assert y32.dtype == torch.float32 and _rel(y32, want) < 2e-4


def test_leading_dims_and_strided_rows(interpreter):
    bits, group, n, k = 3, 32, 40, 576
    qw, s, z, _, _ = _linear(n, k, bits, group, True, 21)
    x = _x(6, 2 * k, 22)[:, :k].reshape(2, 3, k)  # rows with stride 2K
    y = dequant_gemm(x, qw, s, z, bits, group)
    assert y.shape == (2, 3, n)
    assert _rel(y, reference(x.reshape(6, k), qw, s, z, bits, group).reshape(2, 3, n)) < 2e-4


@pytest.mark.parametrize("bits, group, symmetric", [(3, 64, True), (4, -1, False), (3, 32, False)])
def test_reference_matches_format(bits, group, symmetric):
    """The reference is x @ unpack_linear(...).T: the checkpoint format's own dequantization."""
    n, k = 56, 576
    _, _, _, spec, tensors = _linear(n, k, bits, group, symmetric, 31)
    x = _x(5, k, 32)
    w = unpack_linear({f"lin.{name}": t for name, t in tensors.items()}, "lin", spec, k)
    y = reference(x, tensors["qweight"], tensors["scales"], tensors.get("qzeros"), bits, group)
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    x64 = x.double()
    y64 = reference(x64, tensors["qweight"], tensors["scales"], tensors.get("qzeros"), bits, group)
    assert y64.dtype == torch.float64 and _rel(y64, x64 @ w.double().T) < 1e-12


def test_other_bits_fall_back(monkeypatch):
    """bits 2 and 8 (no kernel yet), float64, and CPU without the interpreter take the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    original = gemm.dequant_gemm_reference

    def spy(*args, **kwargs):
        calls.append(args[4])
        return original(*args, **kwargs)

    monkeypatch.setattr(gemm, "dequant_gemm_reference", spy)
    for bits in (2, 8):
        qw, s, z, _, _ = _linear(24, 64, bits, 32, True, bits)
        x = _x(2, 64, bits)
        assert _rel(dequant_gemm(x, qw, s, z, bits, 32), original(x, qw, s, z, bits, 32)) < 1e-6
    qw, s, z, _, _ = _linear(24, 64, 3, 32, True, 0)
    dequant_gemm(_x(2, 64, 0).double(), qw, s, z, 3, 32)
    monkeypatch.delenv("TRITON_INTERPRET")
    dequant_gemm(_x(2, 64, 0), qw, s, z, 3, 32)
    assert calls == [2, 8, 3, 3]


def test_bad_arguments_are_clear_errors():
    qw, s, z, _, _ = _linear(24, 64, 3, 32, True, 0)
    x = _x(2, 64, 0)
    with pytest.raises(ValueError, match="qweight must be int32"):
        dequant_gemm(x, qw, s, z, 4, 32)
    with pytest.raises(ValueError, match="group_size"):
        dequant_gemm(x, qw, s, z, 3, 48)
    with pytest.raises(ValueError, match="scales must be"):
        dequant_gemm(x, qw, s[:1], z, 3, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequant_gemm(_x(2, 48, 0), qw, s, z, 3, 32)
    with pytest.raises(ValueError, match="block_k"):
        plan_dequant_gemm(1, 24, 64, x.device, block_k=48)


def test_custom_op(interpreter):
    """torch.ops.hadaquant.dequant_gemm: the op vLLM's GPU path calls; fake kernel for compile."""
    bits, group, n, k = 3, 64, 40, 576
    qw, s, z, _, _ = _linear(n, k, bits, group, False, 41)
    x = _x(2, k, 42)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(43))
    y = torch.ops.hadaquant.dequant_gemm(x, qw, s, z, bias, bits, group)
    assert _rel(y, reference(x, qw, s, z, bits, group, bias=bias)) < 2e-4
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = torch.ops.hadaquant.dequant_gemm(fx, mode.from_tensor(qw), mode.from_tensor(s), None,
                                               None, bits, group)
        assert out.shape == (2, n) and out.dtype == x.dtype


@pytest.mark.parametrize("spec", [WeightQuantSpec(bits=3, group_size=64, symmetric=True),
                                  WeightQuantSpec(bits=4, group_size=-1, symmetric=False)],
                         ids=lambda s: f"w{s.bits}g{s.group_size}")
def test_plugin_packed_path(spec, interpreter, monkeypatch):
    """The vLLM linear method's GPU path, run on CPU: with the packed-GEMM switch forced on (and
    the kernel interpreted) it keeps no dequantized weight and matches the reference path."""
    pytest.importorskip("vllm")
    import hq_vllm
    from hq_vllm.format import HadaquantConfig, KVCacheSpec

    hq_vllm.register()
    from hq_vllm import quant_method

    n, k = 40, 576
    qw, s, z, _, _ = _linear(n, k, spec.bits, spec.group_size, spec.symmetric, 51)
    qc = quant_method.HadaquantQuantizationConfig(HadaquantConfig(weight=spec, kv_cache=KVCacheSpec(bits=16)))
    prefix = "model.layers.0.mlp.gate_proj"

    def layer_with_weights():
        layer = torch.nn.Module()
        for name, t in (("qweight", qw), ("scales", s), ("qzeros", z)):
            if t is not None:
                layer.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
        layer.hq_input_size_per_partition = k
        layer.params_dtype = torch.float32
        return layer

    reference_layer, packed_layer = layer_with_weights(), layer_with_weights()
    method = quant_method.HadaquantLinearMethod(qc, prefix)
    method.process_weights_after_loading(reference_layer)
    assert reference_layer.hq_packed_gemm is False and hasattr(reference_layer, "hq_weight")
    monkeypatch.setattr(quant_method.HadaquantLinearMethod, "uses_packed_gemm", lambda self, layer: True)
    method.process_weights_after_loading(packed_layer)
    assert packed_layer.hq_packed_gemm is True and not hasattr(packed_layer, "hq_weight")
    x = _x(3, k, 52)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(53))
    want = method.apply(reference_layer, x, bias)
    got = method.apply(packed_layer, x, bias)
    assert _rel(got, want) < 2e-4


@pytest.mark.parametrize("bits, group, symmetric", [(3, 128, True), (4, 32, False), (3, -1, False)])
def test_dequantize_packed(bits, group, symmetric, interpreter):
    """The one-pass dequantization (large-M path) gives the format's weight, transposed."""
    n, k = 150, 640 if group != 128 else 768  # N and K past whole 128 x 512 tiles
    qw, s, z, spec, tensors = _linear(n, k, bits, group, symmetric, 61)
    w = unpack_linear({f"lin.{name}": t for name, t in tensors.items()}, "lin", spec, k)
    got = gemm.dequantize_packed(qw, s, z, bits, group, k, torch.float32)
    assert got.shape == (k, n) and torch.equal(got, w.T)  # (c - z) * s is exact in float32
    assert torch.equal(gemm.dequantize_packed_reference(qw, s, z, bits, group, k), w.T)
    bf = gemm.dequantize_packed(qw, s, z, bits, group, k, torch.bfloat16)
    assert bf.dtype == torch.bfloat16  # one rounding (the interpreter's may differ from RNE)
    assert torch.allclose(bf.float(), w.T, rtol=2**-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_m_dequantizes_then_multiplies(dtype, interpreter):
    """M > 16 without a pinned plan: dequantize once, then torch.matmul (prefill)."""
    bits, group, m, n, k = 3, 64, 40, 72, 576
    qw, s, z, _, _ = _linear(n, k, bits, group, False, 71)
    x = _x(m, k, 72, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(73)).to(dtype)
    y = dequant_gemm(x, qw, s, z, bits, group, bias=bias)
    want = reference(x, qw, s, z, bits, group, out_dtype=torch.float32, bias=bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, want) < (2e-4 if dtype == torch.float32 else 1e-2)
    y32 = dequant_gemm(x, qw, s, z, bits, group, out_dtype=torch.float32, bias=bias)
    assert y32.dtype == torch.float32 and _rel(y32, want) < 2e-4
