"""Fused Hadamard + per-token quantization (kernels/hadamard_quant.py): Triton kernel vs reference.

The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, read at call time, set per
test with monkeypatch as in test_fwht.py); the fixture makes the reference fallback raise, so
what is compared is the kernel. Inputs are fresh Gaussian rows with a few outlier channels (the
activations this quantizes have them), never exactly zero (one test feeds a zero row on purpose:
the zero-scale guard). Sizes: head-dim-like powers of two (64, 128: the [ROWS, N] layout),
SmolLM2 (576 = 36·16, 1536 = 12·128) and Qwen2.5-0.5B (4864 = 76·64) with a dense factor and
two accumulator segments; 4096 and 11008 (the Llama-2 sizes, 11008 also as 2 blocks) once.
Blocks 1 and 2 (the shard-local R4: blocks side by side as column groups of one tile), bits 3,
4 and 8, clip 0.9 and 1.0.

What must hold: the reference is the simulator's arithmetic bit for bit; the kernel's codes
equal the reference's except a small fraction one off (the tensor-core rotation sums in another
order, which moves a value across a 16-bit rounding or a code boundary now and then), its scales
equal the reference's except for the odd row whose largest element rounds to the neighbouring
16-bit value; its dequantized output is its codes times its scales, and lies within the
quantizer's error bound of the rotated input. Beside those: the plan's two tables compose to the
orthonormal Hadamard, the kernel's three-operation division is IEEE division bit for bit, the
CPU without the interpreter takes the reference, bad arguments are refused by name, and the
custom ops trace under torch.compile(fullgraph) and pass torch.library.opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton.language as tl

from hq_vllm.kernels import hadamard_quant as hq
from hq_vllm.kernels.fwht import block_hadamard_transform, hadamard_transform_reference
from hq_vllm.kernels.hadamard import UnsupportedHadamardSize
from hq_vllm.kernels.hadamard_quant import (
    dequantize_per_token,
    hadamard_quant,
    hadamard_quant_reference,
    quantize_per_token_reference,
)
from hq_vllm.offline.quantize import fake_quantize_per_token

reference = hadamard_quant_reference  # bound before the fixture replaces the module's name

CODES_OFF_MAX = 2e-3  # fraction of codes allowed one off the reference
SCALE_RTOL = 1e-5


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton kernel under the interpreter; fail if the torch fallback is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("hadamard_quant fell back to the reference")

    monkeypatch.setattr(hq, "hadamard_quant_reference", no_fallback)


def _activations(t: int, n: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g)
    outliers = torch.randperm(n, generator=g)[:3]
    x[:, outliers] *= 30.0
    x = x.to(dtype)
    assert bool((x != 0).all())
    return x


def _ulp_rel(dtype: torch.dtype) -> float:
    """Largest relative gap between neighbouring values of a float format."""
    return torch.finfo(dtype).eps


def _check_against_reference(x, codes, scales, bits, clip, blocks):
    ref_codes, ref_scales = reference(x, bits, clip, blocks)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    diff = (codes.int() - ref_codes.int()).abs()
    assert int(diff.max()) <= 1, f"codes off by {int(diff.max())}"
    assert float((diff > 0).float().mean()) <= CODES_OFF_MAX, float((diff > 0).float().mean())
    qmax = 2 ** (bits - 1) - 1
    assert int(codes.min()) >= -qmax - 1 and int(codes.max()) <= qmax
    rel = (scales - ref_scales).abs() / ref_scales
    off = rel > SCALE_RTOL
    # A row's scale may differ only where its largest element rounded to the neighbouring
    # value of x's format (one ulp of it, relative), and only in a few rows.
    assert int(off.sum()) <= max(1, int(0.05 * off.numel())), rel
    assert float(rel.max()) <= max(SCALE_RTOL, 1.01 * _ulp_rel(x.dtype))


def _check_error_bound(x, dq, scales, bits, clip, blocks):
    """Each dequantized value is within half a step of the rotated one, plus what clipping cuts
    off, plus its own rounding to x.dtype and one ulp of the rotated value (the kernel's rotation
    may round to the neighbouring 16-bit value); and the total relative error is what a uniform
    rounding error (variance step²/12) plus the clipped amounts predict."""
    y = block_hadamard_transform(x.float(), x.shape[-1] // blocks)  # float32 rotation (reference)
    y = y.to(x.dtype).float()
    qmax = 2 ** (bits - 1) - 1
    s = scales.unsqueeze(-1)
    clipped = torch.maximum(y - qmax * s, -(qmax + 1) * s - y).clamp(min=0)
    rounding = (dq.float().abs() + y.abs()) * _ulp_rel(x.dtype) if x.dtype != torch.float32 else 1e-6 * y.abs()
    bound = 0.5 * s * (1 + 1e-5) + clipped + rounding
    err = (dq.float() - y).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    rel = (err.norm() / y.norm()).item()
    expected = torch.sqrt((s.expand_as(y) ** 2 / 12 + clipped**2).sum()) / y.norm()
    assert rel <= 1.25 * expected.item() + 1e-3, (rel, expected.item())


# ---------------------------------------------------------------------------------------------
# The reference is the simulator's quantizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("bits,clip", [(3, 0.9), (4, 1.0), (8, 0.9)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_is_the_simulator(bits, clip, blocks, dtype):
    x = _activations(5, 1536, seed=bits + 10 * blocks, dtype=dtype)
    rotated = block_hadamard_transform(x, 1536 // blocks)  # CPU: the torch reference
    expected = fake_quantize_per_token(rotated, bits, clip)
    got = hadamard_quant_reference(x, bits, clip, blocks, dequantize=True)
    assert got.dtype == dtype and torch.equal(got, expected)
    codes, scales = quantize_per_token_reference(rotated, bits, clip)
    assert torch.equal(dequantize_per_token(codes, scales, dtype), expected)
    # scale convention: clip * absmax / qmax, in float32
    want = (clip * rotated.float().abs().amax(-1) / (2 ** (bits - 1) - 1))
    assert torch.equal(scales, want)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference
# ---------------------------------------------------------------------------------------------

# (n, blocks, tokens): tokens > ROWS for the [ROWS, N] layout (a ragged second tile)
CASES = [(64, 1, 70), (128, 1, 37), (128, 2, 37), (576, 1, 4), (1536, 1, 3), (1536, 2, 3), (4864, 1, 2)]


@pytest.mark.parametrize("bits,clip", [(3, 0.9), (4, 1.0), (8, 0.9), (8, 1.0)])
@pytest.mark.parametrize("n,blocks,t", CASES)
def test_kernel_matches_reference(n, blocks, t, bits, clip, interpreter):
    x = _activations(t, n, seed=n + 7 * bits + blocks)
    codes, scales = hadamard_quant(x, bits, clip, blocks)
    _check_against_reference(x, codes, scales, bits, clip, blocks)
    dq = hadamard_quant(x, bits, clip, blocks, dequantize=True)
    assert dq.dtype == x.dtype and torch.equal(dq, dequantize_per_token(codes, scales, x.dtype))
    _check_error_bound(x, dq, scales, bits, clip, blocks)


@pytest.mark.parametrize("n,blocks", [(4096, 1), (11008, 1), (11008, 2)])
def test_kernel_llama_sizes(n, blocks, interpreter):
    x = _activations(2, n, seed=n + blocks)
    codes, scales = hadamard_quant(x, 4, 0.9, blocks)
    _check_against_reference(x, codes, scales, 4, 0.9, blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,blocks", [(128, 2), (576, 1), (1536, 2)])
def test_kernel_other_dtypes(n, blocks, dtype, interpreter):
    x = _activations(4, n, seed=n + 3, dtype=dtype)
    codes, scales = hadamard_quant(x, 8, 0.9, blocks)
    _check_against_reference(x, codes, scales, 8, 0.9, blocks)
    dq = hadamard_quant(x, 8, 0.9, blocks, dequantize=True)
    assert dq.dtype == dtype and torch.equal(dq, dequantize_per_token(codes, scales, dtype))
    _check_error_bound(x, dq, scales, 8, 0.9, blocks)


@pytest.mark.parametrize("n", [576, 4864])
def test_kernel_fp16_second_product(n, interpreter, monkeypatch):
    """The opt-in single float16 pass (``_FP16_MAX_BITS``): within the same bounds at 3-4 bits."""
    monkeypatch.setattr(hq, "_FP16_MAX_BITS", 4)
    x = _activations(4, n, seed=n + 5)
    for bits in (3, 4):
        codes, scales = hadamard_quant(x, bits, 0.9)
        _check_against_reference(x, codes, scales, bits, 0.9, 1)


def test_kernel_zero_row_and_shapes(interpreter):
    """A zero row (the zero-scale guard: codes 0, scale float32's smallest normal), leading
    dims, and a row stride other than N (a slice of a wider tensor)."""
    wide = _activations(6, 2 * 576, seed=1)
    x = wide[:, :576].reshape(2, 3, 576)
    x[1, 2] = 0.0
    codes, scales = hadamard_quant(x, 4, 0.9)
    assert codes.shape == (2, 3, 576) and scales.shape == (2, 3)
    assert bool((codes[1, 2] == 0).all()) and float(scales[1, 2]) == torch.finfo(torch.float32).tiny
    ref_codes, ref_scales = reference(x, 4, 0.9)
    assert float((codes != ref_codes).float().mean()) <= CODES_OFF_MAX
    assert torch.allclose(scales, ref_scales, rtol=SCALE_RTOL, atol=0)


# ---------------------------------------------------------------------------------------------
# Plans, tables, dispatch, the custom ops
# ---------------------------------------------------------------------------------------------


def test_segments_are_minimal_and_larger_first():
    """Two power-of-two accumulator segments of least total, the larger first: a 32-row first
    segment before a 128-row one (148 rows, N = 18944) miscomputed on the H200 (docs/BENCHMARKS.md)."""
    pows = [0] + [1 << e for e in range(4, 12)]
    for r in range(1, 1025):
        need = -(-r // 16) * 16
        s0, s1 = hq._segments(r)
        best = min(a + b for a in pows[1:] for b in pows if a + b >= need)
        assert s0 + s1 == best and s0 >= s1 and s0 + s1 >= need, r
    assert hq._segments(148) == (128, 32) and hq._segments(172) == (128, 64)


@pytest.mark.parametrize("n,blocks", [(576, 1), (1536, 2), (4096, 1), (4864, 1), (11008, 1), (11008, 2),
                                      (14336, 1), (18944, 1)])
def test_plan_factors_the_rotation(n, blocks):
    """``Y = Lᵀ X H_B`` with the cached tables is the (block-diagonal) orthonormal Hadamard."""
    for split in (True, False):
        p = hq._plan(n, blocks, split)
        assert p.seg0 + p.seg1 >= p.r and p.nch * p.ch >= p.r
        assert all(s == 0 or (s >= 16 and s & (s - 1) == 0) for s in (p.seg0, p.seg1))
        assert p.cols == blocks * p.b and p.b_pad >= p.cols and p.r * p.b == n // blocks
    left = hq._left_table(p, torch.float32, torch.device("cpu"))[: p.r, : p.r].double()
    right = hq._right_table(p.cols, p.b_pad, p.b, torch.float32, torch.device("cpu"))[: p.cols, : p.cols].double()
    x = torch.randn(2, n, dtype=torch.float64)
    # the kernel's [r, blocks * b] tile: Hadamard block j of the row is column group j
    tile = x.reshape(2, blocks, p.r, p.b).permute(0, 2, 1, 3).reshape(2, p.r, p.cols)
    y = (left @ tile @ right).reshape(2, p.r, blocks, p.b).permute(0, 2, 1, 3).reshape(2, n)
    y = y / math.sqrt(n // blocks)
    want = hadamard_transform_reference(x.reshape(2, blocks, n // blocks)).reshape(2, n)
    assert ((y - want).norm() / want.norm()).item() < 1e-12


@pytest.mark.parametrize("n,bits,blocks,dtype,dequantize,fp16_max_bits", [
    (18944, 4, 1, torch.bfloat16, False, 0),  # two segments (wgmma + mma.sync), split second product
    (4864, 8, 1, torch.bfloat16, True, 0),  # small chunks: loads the pipeliner leaves plain
    (4864, 3, 1, torch.float16, False, 4),  # the float16 second product
    (4096, 4, 1, torch.bfloat16, True, 0),  # 1/sqrt(N) folded into the table
    (128, 8, 2, torch.float16, True, 0),  # [ROWS, N] layout, block-diagonal H_N
    (576, 4, 1, torch.float32, False, 0),  # float32 input: tf32x3 products
])
def test_kernel_compiles_for_hopper(n, bits, blocks, dtype, dequantize, fp16_max_bits, monkeypatch):
    """The GPU-only paths (libdevice rounding, native conversions, cache modifiers, wgmma) build
    for sm_90 with Triton's bundled ptxas, no GPU needed: the interpreter never runs them (this
    caught an L1 and L2 cache-hint pair ptxas refuses)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    monkeypatch.setattr(hq, "_FP16_MAX_BITS", fp16_max_bits)
    compiled = hq.compile_for_gpu(n, bits, blocks, dtype, dequantize)
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024
    ptx = compiled.asm["ptx"]
    assert "mma" in ptx  # both products on the tensor cores (wgmma or mma.sync)
    assert "cvt.rni" in ptx and "div.rn.f32" in ptx  # half-to-even codes, IEEE scale and 1/s


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    original = hq.hadamard_quant_reference

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(hq, "hadamard_quant_reference", spy)
    x = _activations(2, 576, seed=2)
    codes, scales = hadamard_quant(x, 4, 0.9)
    ref_codes, ref_scales = reference(x, 4, 0.9)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert calls == [x.shape]


def test_bad_arguments():
    x = _activations(2, 576, seed=3)
    for bits in (1, 16, True):
        with pytest.raises(ValueError, match="bits"):
            hadamard_quant(x, bits, 0.9)
    for clip in (0.0, 1.5):
        with pytest.raises(ValueError, match="clip"):
            hadamard_quant(x, 4, clip)
    with pytest.raises(ValueError, match="blocks"):
        hadamard_quant(x, 4, 0.9, blocks=5)
    with pytest.raises(UnsupportedHadamardSize):
        hadamard_quant(torch.randn(2, 14), 4, 0.9)


def test_custom_ops_trace_without_graph_breaks():
    """The ops' fake implementations let torch.compile(fullgraph) trace them; opcheck runs the
    schema / fake-tensor / dispatch checks (CPU: the reference path)."""
    x = _activations(3, 576, seed=4)
    codes, scales = torch.ops.hadaquant.hadamard_quant(x, 4, 0.9, 1)
    ref_codes, ref_scales = reference(x, 4, 0.9)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    dq = torch.compile(lambda v: torch.ops.hadaquant.hadamard_quant_dequant(v, 4, 0.9, 1) * 2,
                       fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(dq, 2 * reference(x, 4, 0.9, dequantize=True))
    torch.library.opcheck(torch.ops.hadaquant.hadamard_quant.default, (x, 4, 0.9, 1))
    torch.library.opcheck(torch.ops.hadaquant.hadamard_quant_dequant.default, (x, 4, 0.9, 2))


def _markstein_source(y_ptr, s_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y, s = tl.load(y_ptr + offs), tl.load(s_ptr + offs)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    q = y * inv
    tl.store(out_ptr + offs, tl.fma(tl.fma(-q, s, y), inv, q))


def test_three_operation_division_is_ieee_division():
    """The kernel's ``y / s`` (``q = y·r``, ``q + fma(-q, s, y)·r``, ``r = 1/s`` correctly
    rounded) is float32 division bit for bit, over magnitudes, significands and divisors with
    all-ones significands (the kernel's own arithmetic, run by the interpreter's true fma)."""
    from triton.runtime.interpreter import InterpretedFunction

    kernel = InterpretedFunction(_markstein_source)
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    y = torch.randn(n, generator=g) * torch.exp(torch.empty(n).uniform_(-20, 20, generator=g))
    y = y.bfloat16().float()  # the kernel divides bf16-rounded values
    s = y.abs() * torch.empty(n).uniform_(1e-3, 1, generator=g) / torch.tensor([1.0, 3.0, 7.0, 127.0])[
        torch.randint(0, 4, (n,), generator=g)]
    s[: n // 4] = (1.9999999 * 2.0 ** torch.randint(-20, 20, (n // 4,), generator=g)).float()
    s = s.clamp(min=torch.finfo(torch.float32).tiny)
    out = torch.empty_like(y)
    kernel[(n // 4096,)](y, s, out, BLOCK=4096)
    want = y / s
    finite = torch.isfinite(want)
    assert bool(finite.float().mean() > 0.99)
    assert torch.equal(out[finite], want[finite])


def test_plugin_input_step_routes_through_the_fused_kernel(interpreter, monkeypatch):
    """The vLLM linear's input step (``quantize_linear_input``: R4, then activation quant) with
    the fused-path switch forced on, on CPU (the kernel interpreted): the fused kernel's output,
    a small fraction of values one step off the torch path's; asymmetric stays on the torch
    path."""
    pytest.importorskip("vllm")
    from hq_vllm import quant_method

    x = _activations(3, 1536, seed=21)
    monkeypatch.delenv("TRITON_INTERPRET")  # the torch path as served on CPU
    torch_path = quant_method.quantize_linear_input(x, True, 4, 0.9, True, 768)
    assert torch.equal(torch_path, reference(x, 4, 0.9, blocks=2, dequantize=True))
    asym = quant_method.quantize_linear_input(x, True, 4, 0.9, False, 768)
    assert torch.equal(asym, fake_quantize_per_token(block_hadamard_transform(x, 768), 4, 0.9, symmetric=False))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    original = hq.hadamard_quant

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(quant_method, "hadamard_quant", spy)
    monkeypatch.setattr(quant_method, "_fused_input_path", lambda x, rotate, bits, symmetric: symmetric)
    fused = quant_method.quantize_linear_input(x, True, 4, 0.9, True, 768)
    assert calls == [(4, 0.9, 2)]
    assert fused.dtype == x.dtype and float((fused != torch_path).float().mean()) <= CODES_OFF_MAX
    quant_method.quantize_linear_input(x, True, 4, 0.9, False, 768)  # asymmetric: not fused
    assert len(calls) == 1
