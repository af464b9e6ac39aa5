"""Int8 tensor-core GEMM (kernels/int8_gemm.py): Triton kernel (interpreter) vs torch reference.

The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set per test); the fixture
makes the reference fallback raise, so what is compared is the kernel. The integer products are
exact, so against a float64 reference the error is float32 rounding (~1e-7). Inputs are fresh
random values, never exact zeros: weight scales > 0, activations Gaussian quantized per token by
``quantize_per_token_reference``. Sizes are small (the interpreter runs every program in numpy)
but span several N tiles (N = 72 with 32-wide tiles: two full, one partial) and 3 groups of K.
"""

from __future__ import annotations

import pytest
import torch

from hq_vllm.format import WeightQuantSpec, pack_linear
from hq_vllm.kernels import int8_gemm as ig
from hq_vllm.kernels.hadamard_quant import quantize_per_token_reference
from hq_vllm.kernels.int8_gemm import int8_gemm, int8_gemm_reference, plan_int8_gemm, quantize_per_token

reference = int8_gemm_reference  # bound before the fixture replaces the module's name
N = 72


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton kernels under the interpreter; fail if a torch fallback is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to the reference")

    monkeypatch.setattr(ig, "int8_gemm_reference", no_fallback)
    monkeypatch.setattr(ig, "quantize_per_token_reference", no_fallback)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _linear(n: int, k: int, bits: int, group: int, symmetric: bool, seed: int):
    """(qweight, scales, qzeros or None) of a random quantized linear, via the format's packer."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, groups), generator=g, dtype=torch.uint8)
    t = pack_linear(codes, scales, zeros, WeightQuantSpec(bits=bits, group_size=group, symmetric=symmetric))
    return t["qweight"], t["scales"], t.get("qzeros")


def _acts(m: int, k: int, bits: int, seed: int):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    return quantize_per_token_reference(x, bits, 0.9)


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_kernel_matches_reference(bits, symmetric, group, interpreter):
    """M = 1, 16, 33, 64 (one partial M tile, two tiles, a full 64-row tile); activation bits
    3, 4 and 8 in turn, shifted per case so that every (M, activation bits) pair occurs."""
    k = (3 if group == 64 else 2) * group
    case = 4 * (bits - 3) + 2 * symmetric + (group == 128)
    seed = 1000 * bits + 100 * symmetric + group
    qw, s, z = _linear(N, k, bits, group, symmetric, seed)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1))
    for i, m in enumerate((1, 16, 33, 64)):
        act_bits = (3, 4, 8)[(i + case) % 3]
        codes, a_s = _acts(m, k, act_bits, seed + m)
        plan = plan_int8_gemm(m, N, k, group, block_n=32)
        assert plan.block_m >= 16 and plan.block_k >= 32  # the GPU's tensor-core minimum
        y = int8_gemm(codes, a_s, qw, s, z, bias, bits, group, torch.float32, plan=plan)
        want = reference(codes, a_s, qw, s, z, bias, bits, group, torch.float64)
        assert y.shape == (m, N) and y.dtype == torch.float32
        assert _rel(y, want) < 1e-6, (m, act_bits, _rel(y, want))


@pytest.mark.parametrize("bits, group, symmetric", [(3, -1, True), (4, -1, False), (3, 256, False), (4, 32, True)])
def test_per_channel_and_multi_tile_groups(bits, group, symmetric, interpreter):
    """Per-channel scales (the whole K in int32, scaled once), a group of two K tiles
    (tiles_per_group = 2) and 32-channel groups (the smallest K step)."""
    k = 512 if group in (-1, 256) else 192
    qw, s, z = _linear(N, k, bits, group, symmetric, 7 + bits)
    codes, a_s = _acts(40, k, 8, 11)
    plan = plan_int8_gemm(40, N, k, group, block_n=32)
    if group == 256:
        assert plan.tiles_per_group == 2
    y = int8_gemm(codes, a_s, qw, s, z, None, bits, group, torch.float32, plan=plan)
    assert _rel(y, reference(codes, a_s, qw, s, z, None, bits, group, torch.float64)) < 1e-6


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_integer_part_is_exact(symmetric, interpreter):
    """Power-of-two scales: every float operation is exact, so the kernel equals the integer
    product c_a @ (c_w - z).T bit for bit (the unpack, the zero point and the group sums)."""
    bits, group, k, m = 3, 64, 192, 20
    g = torch.Generator().manual_seed(5)
    qw, _, z = _linear(N, k, bits, group, symmetric, 3)
    s = torch.full((k // group, N), 0.25, dtype=torch.float16)
    codes = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    a_s = torch.full((m,), 2.0**-7)
    y = int8_gemm(codes, a_s, qw, s, z, None, bits, group, torch.float32, plan=plan_int8_gemm(m, N, k, group, block_n=32))
    c_w = ig.dequantize_packed_reference(qw, torch.ones_like(s), z, bits, group, k, torch.float64)  # c - z
    exact = (codes.double() @ c_w) * 0.25 * 2.0**-7
    assert torch.equal(y.double(), exact)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_half_output_and_strided_codes(out_dtype, interpreter):
    bits, group, k, m = 4, 128, 384, 70
    qw, s, z = _linear(N, k, bits, group, True, 21)
    codes, a_s = _acts(m, 2 * k, 4, 22)
    codes = codes[:, :k]  # rows with stride 2K
    a_s = a_s.contiguous()
    bias = torch.randn(N, generator=torch.Generator().manual_seed(23)).to(out_dtype)
    y = int8_gemm(codes, a_s, qw, s, z, bias, bits, group, out_dtype)  # default plan
    want = reference(codes, a_s, qw, s, z, bias, bits, group, torch.float64)
    assert y.dtype == out_dtype and _rel(y, want) < 4e-3  # the output's own rounding


def test_shape_errors_are_clear():
    qw, s, z = _linear(N, 192, 3, 64, False, 1)
    codes, a_s = _acts(4, 192, 4, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        int8_gemm(codes[:, :100], a_s, qw, s, z, None, 3, 64)
    with pytest.raises(ValueError, match="a_scales must be float32"):
        int8_gemm(codes, a_s[:3], qw, s, z, None, 3, 64)
    with pytest.raises(ValueError, match="a_codes must be int8"):
        int8_gemm(codes.float(), a_s, qw, s, z, None, 3, 64)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[bits\*K/32, N\] = \[24, N\]"):
        int8_gemm(codes, a_s, qw, s, z, None, 4, 64)
    with pytest.raises(ValueError, match="group_size must be"):
        int8_gemm(codes, a_s, qw, s, z, None, 3, 128)
    with pytest.raises(ValueError, match="w_zeros must be uint8"):
        int8_gemm(codes, a_s, qw, s, z.int(), None, 3, 64)
    with pytest.raises(ValueError, match="bias must be"):
        int8_gemm(codes, a_s, qw, s, z, torch.zeros(N + 1), 3, 64)
    with pytest.raises(ValueError, match="block_k = 128 must divide the weight group"):
        plan_int8_gemm(4, N, 192, 64, block_k=128)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 32"):
        plan_int8_gemm(4, N, 192, 64, block_k=16)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        plan_int8_gemm(4, N, 192, 64, block_m=8)
    with pytest.raises(TypeError, match="unknown plan fields"):
        plan_int8_gemm(4, N, 192, 64, split_k=2)


def test_falls_back_without_kernel(monkeypatch):
    """2-bit weights (no kernel) and CPU tensors without the interpreter take the reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(ig, "int8_gemm_reference", lambda *a, **kw: calls.append(a[6]) or reference(*a, **kw))
    qw, s, z = _linear(24, 64, 3, 32, True, 0)
    codes, a_s = _acts(2, 64, 8, 0)
    int8_gemm(codes, a_s, qw, s, z, None, 3, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qw2, s2, z2 = _linear(24, 64, 2, 32, True, 0)
    int8_gemm(codes, a_s, qw2, s2, z2, None, 2, 32)
    assert calls == [3, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantize_per_token_is_the_reference_bit_for_bit(dtype, bits, interpreter):
    """N = 1500: two row chunks, the second partial; outlier channels; leading dims."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 5, 1500, generator=g)
    x[..., torch.randint(0, 1500, (3,), generator=g)] *= 20.0
    x = x.to(dtype)
    codes, scales = quantize_per_token(x, bits, 0.85)
    want_codes, want_scales = quantize_per_token_reference(x, bits, 0.85)
    assert codes.shape == x.shape and scales.shape == x.shape[:-1]
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)


def test_custom_ops_compile_without_graph_breaks(interpreter):
    bits, group, k, m = 4, 64, 128, 17
    qw, s, z = _linear(N, k, bits, group, False, 41)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(42))

    def fn(x):
        codes, scales = torch.ops.hadaquant.quantize_per_token(x, 4, 0.9)
        return torch.ops.hadaquant.int8_gemm(codes, scales, qw, s, z, None, bits, group, torch.float32) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    codes, a_s = quantize_per_token_reference(x, 4, 0.9)
    want = reference(codes, a_s, qw, s, z, None, bits, group, torch.float64) * 2
    assert _rel(compiled(x), want) < 1e-6


@pytest.mark.parametrize("bits, symmetric, per_channel", [(3, True, False), (4, False, True)])
def test_builds_for_sm90(bits, symmetric, per_channel):
    """The GPU build (int8 wgmma, the register reshapes) compiles with Triton's bundled ptxas."""
    plan = plan_int8_gemm(2048, 4096, 4096, -1 if per_channel else 128)
    compiled = ig.compile_for_gpu(bits, symmetric, per_channel, plan)
    assert "wgmma" in compiled.asm["ptx"] or "mma.sync" in compiled.asm["ptx"]


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "r4"])
def test_plugin_prefill_path_is_the_simulators(rotate, interpreter, monkeypatch):
    """``hadaquant::packed_linear`` (the plugin's op for <= 8-bit symmetric activations): from
    INT8_GEMM_MIN_TOKENS tokens it runs the int8 GEMM on the simulator's codes, below that the
    dequant GEMM on the fake-quantized input; both are the simulator's result up to rounding."""
    pytest.importorskip("vllm")
    import hq_vllm

    hq_vllm.register()
    from hq_vllm import quant_method as qm
    from hq_vllm.kernels import gemm
    from hq_vllm.kernels.fwht import block_hadamard_transform

    bits, group, k, act_bits, clip, block = 3, 64, 256, 4, 0.9, 128
    qw, s, z = _linear(N, k, bits, group, False, 51)
    w = ig.dequantize_packed_reference(qw, s, z, bits, group, k, torch.float32)  # W.T
    ran = []
    monkeypatch.setattr(qm, "int8_gemm", lambda *a, **kw: ran.append("int8") or ig.int8_gemm(*a, **kw))
    monkeypatch.setattr(qm, "dequant_gemm", lambda *a, **kw: ran.append("dequant") or gemm.dequant_gemm(*a, **kw))
    for m in (qm.INT8_GEMM_MIN_TOKENS - 1, qm.INT8_GEMM_MIN_TOKENS):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        y = qm.packed_linear(x, qw, s, z, None, bits, group, rotate, act_bits, clip, block if rotate else 0)
        xr = block_hadamard_transform(x, block) if rotate else x
        sim = qm.fake_quantize_per_token(xr, act_bits, clip).float() @ w  # the simulator, float32
        assert y.dtype == torch.bfloat16 and y.shape == (m, N)
        assert _rel(y, sim) < 1e-2  # bf16 rounding of the input (dequant path) and of the output
    assert ran == ["dequant", "int8"]
    assert qm.int8_gemm_eligible(3, 4, True) and not qm.int8_gemm_eligible(3, 4, False)
    assert not qm.int8_gemm_eligible(3, 16, True) and not qm.int8_gemm_eligible(2, 8, True)


@pytest.mark.parametrize("act", [(4, True), (8, False)], ids=["a4sym", "a8asym"])
def test_linear_method_apply_routes_prefill_to_int8(act, interpreter, monkeypatch):
    """``HadaquantLinearMethod.apply`` on the packed-GEMM path (forced here: on the CPU platform
    it is ``F.linear``): a down_proj with an online R4 and symmetric 4-bit activations goes
    through ``packed_linear`` (int8 GEMM at prefill sizes); asymmetric activations, and every
    linear with HADAQUANT_INT8_GEMM=0, keep the dequant GEMM."""
    pytest.importorskip("vllm")
    import hq_vllm

    hq_vllm.register()
    from hq_vllm import quant_method as qm
    from hq_vllm.format import ActQuantSpec, HadaquantConfig, KVCacheSpec, RotationSpec
    from hq_vllm.kernels.fwht import block_hadamard_transform

    act_bits, act_sym = act
    k, n, group = 256, N, 64
    config = HadaquantConfig(weight=WeightQuantSpec(bits=4, group_size=group, symmetric=True),
                             activation=ActQuantSpec(bits=act_bits, clip_ratio=0.9, symmetric=act_sym),
                             kv_cache=KVCacheSpec(bits=16),
                             rotation=RotationSpec(r4={"kind": "hadamard", "size": k, "factor_k": 1}))
    method = qm.HadaquantLinearMethod(qm.HadaquantQuantizationConfig(config), "model.layers.0.mlp.down_proj")
    assert method.int8_gemm == act_sym
    layer = torch.nn.Module()
    layer.qweight, layer.scales, _ = _linear(n, k, 4, group, True, 61)
    layer.hq_packed_gemm = True
    ran = []
    monkeypatch.setattr(qm, "int8_gemm", lambda *a, **kw: ran.append("int8") or ig.int8_gemm(*a, **kw))
    x = torch.randn(2, 40, k, generator=torch.Generator().manual_seed(62)).to(torch.bfloat16)  # 80 tokens
    y = method.apply(layer, x)
    w = ig.dequantize_packed_reference(layer.qweight, layer.scales, None, 4, group, k, torch.float32)
    xq = qm.fake_quantize_per_token(block_hadamard_transform(x, k), act_bits, 0.9, act_sym)
    assert y.shape == (2, 40, n) and _rel(y, xq.float() @ w) < 1e-2
    assert ran == (["int8"] if act_sym else [])
    monkeypatch.setattr(qm, "_INT8_GEMM", False)  # what HADAQUANT_INT8_GEMM=0 sets at import
    assert not qm.int8_gemm_eligible(4, act_bits, act_sym)
