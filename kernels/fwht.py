"""Fast Walsh–Hadamard transform over the last dimension: ``y = x @ H_n * scale``.

This is the online rotation (R3 on Q/K after RoPE, R4 on the down_proj input): every token pays
it, so it must run at memory speed. ``H_n = H_k ⊗ H_P`` (``hadamard.py``; P = 2^e, k the small
dense factor, k = 1 for powers of two). With one vector viewed as a k×P matrix X (row-major),

    y = vec(H_kᵀ · X · H_P).

Two implementations with the same signature:

* ``hadamard_transform_reference``: plain torch. Butterflies for H_P (n·log2 P adds) and one
  dense k×k product for H_k, in float32 (float64 for float64 input). The definition of the
  result, and the CPU path.
* ``hadamard_transform``: one Triton kernel. P is split as P = A·B and the vector is viewed as a
  [k·A, B] matrix, so the transform is two matrix products on tensor cores,

      Y = (H_k ⊗ H_A)ᵀ · X · H_B,

  the left factor a small cached ±1 matrix (zero-padded to the tile size), the right one
  generated in registers from popcount parity. A program owns BLOCK_M rows of Y for one vector:
  the vector is read from HBM once (the other row blocks of it hit L2), products accumulate in
  float32, and Y is written once. B = 64 (or P if smaller), from a sweep on H100 (see the
  tunables). Powers of two n <= 128 (head dims) have no left factor: a program then transforms
  64 whole vectors, Y = X · H_n.

Precision: the ±1 factors are exact in every float format. For bf16/fp16 input the left product
multiplies exact input values (one tensor-core pass, float32 accumulation); its float32 result
is split into bf16 hi + lo parts for the right product (two passes, ~16 mantissa bits, far below
the output's rounding; ``_SPLIT_16BIT_INTERMEDIATE`` trades that for speed). For float32 input
both products run in ``_FP32_DOT_PRECISION``. float64 input always takes the reference path.

Speed on one H100 (bf16, >= 8192 rows, GB/s read + written; a device copy reaches 2865): n = 64:
2850, 128: 2690, 896: 1755, 3584: 2308, 4096: 2519, 4864: 1723, 11008: 1404, 14336: 1641,
18944: 1004, 29568: 368. The large-k sizes are bound by the dense k×k product on tensor cores,
not by memory; ``_SPLIT_16BIT_INTERMEDIATE = False`` gives 4096: 2856, 3584: 2743, 14336: 1740.

Dispatch: the Triton kernel runs when ``x`` is on CUDA or when ``TRITON_INTERPRET=1`` is set
(read at call time, so the tests can use Triton's CPU interpreter whatever was imported first);
otherwise the reference runs.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .hadamard import hadamard_factor, hadamard_matrix, small_hadamard

__all__ = ["block_hadamard_transform", "hadamard_transform", "hadamard_transform_reference"]

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place. Values from a sweep on one H100 (Triton 3.6, bf16, 8192 rows):
# b = 64 was best or within 5% at n = 4096, 11008, 14336, 18944 (b = 16/32 are 2-8x slower);
# BLOCK_K = 64 beat 32 everywhere; 4 warps beat 8 (and 8 warps with BLOCK_M = 64 hit an illegal
# address in Triton 3.6: a Hopper warpgroup MMA wants 64 rows per 4 warps).
# ---------------------------------------------------------------------------------------------
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_RIGHT_WIDTH = 64  # b: width of the in-register right factor H_b (b = P when P is smaller)
_ROWS_PER_PROGRAM = 64  # P <= _MAX_ROWS_MODE_N with k = 1: whole vectors per program
_MAX_ROWS_MODE_N = 128
_BLOCK_M_CHOICES = (128, 64)  # rows of Y per program: least padding of ka, ties to the larger
_MAX_BLOCK_K = 64  # reduction tile of the left product
_NUM_WARPS = 4
_NUM_STAGES: int | None = None  # None: Triton's default software pipelining depth
#: 16-bit input: the float32 intermediate enters the right product as bf16 hi + lo (two passes,
#: ~16 mantissa bits) when True, as one bf16 rounding when False. False measured faster on H100
#: where the right product matters (4096: 2856 vs 2519 GB/s, 3584: 2743 vs 2308, 14336: 1740
#: vs 1641; no gain at 11008 or 18944, bound by the k×k product) for a ~1.4x larger error
#: (bf16 output: 2.4e-3 vs 1.7e-3 relative), which 3-4-bit quantization downstream won't see.
_SPLIT_16BIT_INTERMEDIATE = True
#: float32 input (not the serving path, untuned): "tf32x3" measured 217-1088 GB/s with errors
#: ~1e-7; "ieee" (CUDA-core FMA dots) was faster at some sizes but fell to 29-84 GB/s at others
#: (128-wide or 128-row tiles spill registers).
_FP32_DOT_PRECISION = "tf32x3"


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


@dataclass(frozen=True)
class _Plan:
    """How one size is laid out: the vector is a [ka, b] matrix, ka = k * a.

    ka == 1 (n <= _MAX_ROWS_MODE_N, a power of two) has no left factor: then a program transforms
    ``block_m`` whole vectors instead of ``block_m`` rows of one.
    """

    n: int
    k: int
    a: int
    b: int
    ka: int
    ka_pad: int  # rows/cols of the padded left matrix, a multiple of block_m and block_k
    b_pad: int
    block_m: int
    block_k: int
    num_warps: int


@functools.lru_cache(maxsize=256)
def _plan(n: int) -> _Plan:
    f = hadamard_factor(n)
    if f.k == 1 and f.pow2 <= _MAX_ROWS_MODE_N:  # no left factor: whole vectors per program
        return _make_plan(n, 1, 1, f.pow2)
    b = min(f.pow2, _RIGHT_WIDTH)
    if f.k == 1:  # keep at least _MIN_DOT rows (ka = a) so the left tile is not mostly padding
        b = min(b, max(_MIN_DOT, f.pow2 // _MIN_DOT))
    return _make_plan(n, f.k, f.pow2 // b, b)


def _make_plan(n: int, k: int, a: int, b: int) -> _Plan:
    ka = k * a
    if ka == 1:
        block_m = block_k = _ROWS_PER_PROGRAM
    elif ka <= min(_BLOCK_M_CHOICES):
        block_m = block_k = max(_MIN_DOT, _next_pow2(ka))
    else:
        block_m = min(_BLOCK_M_CHOICES, key=lambda m: (_round_up(ka, m), -m))
        block_k = _MAX_BLOCK_K
    ka_pad = _round_up(ka, max(block_m, block_k))
    return _Plan(n, k, a, b, ka, ka_pad, max(_MIN_DOT, b), block_m, block_k, _NUM_WARPS)


@functools.lru_cache(maxsize=64)
def _left_matrix(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H_k ⊗ H_A)ᵀ zero-padded to [ka_pad, ka_pad], on the kernel's device, cached."""
    p = _plan(n)
    left = torch.kron(small_hadamard(p.k), hadamard_matrix(p.a)).T
    padded = torch.zeros(p.ka_pad, p.ka_pad, dtype=torch.float32)
    padded[: p.ka, : p.ka] = left
    return padded.to(dtype=dtype, device=device).contiguous()


def _hadamard_kernel_source(
    x_ptr,
    y_ptr,
    left_ptr,
    n_rows,
    x_row_stride,
    y_row_stride,
    scale,
    KA: tl.constexpr,
    KA_PAD: tl.constexpr,
    B: tl.constexpr,
    B_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LEFT_PRECISION: tl.constexpr,
    RIGHT_MODE: tl.constexpr,
    RIGHT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Y[m-block, :] = scale * (Lᵀ[m-block, :] @ X) @ H_B for one vector (program (row, m)),
    or, when KA == 1, Y = scale * X @ H_B for BLOCK_M whole vectors (program (row block, 0)).

    RIGHT_MODE: 0 = the float32 intermediate goes to the right dot as is (RIGHT_PRECISION);
    1 = as bf16 hi + lo parts; 2 = as one bf16 rounding; 3 = no intermediate (KA == 1): X
    itself, in its own dtype, exact.
    """
    offs_j = tl.arange(0, B_PAD)
    j_valid = offs_j < B
    # H_B[i, j] = (-1)^popcount(i & j), zero outside the valid B x B block.
    bits = offs_j[:, None] & offs_j[None, :]
    bits = bits ^ (bits >> 8)
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    h_b = tl.where(j_valid[:, None] & j_valid[None, :], 1.0 - 2.0 * (bits & 1).to(tl.float32), 0.0)

    if KA == 1:
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_r < n_rows)[:, None] & j_valid[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * x_row_stride + offs_j[None, :], mask=mask, other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
        out = tl.dot(x, h_b.to(x.dtype), input_precision=RIGHT_PRECISION) * scale
        y_ptrs = y_ptr + offs_r[:, None] * y_row_stride + offs_j[None, :]
    else:
        row = tl.program_id(0).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        x_row = x_ptr + row * x_row_stride
        # tl.full, not tl.zeros: only core builtins here, no triton.language.standard @jit
        # helpers, which are compiled-or-interpreted as of `import triton` (see _kernel).
        acc = tl.full((BLOCK_M, B_PAD), 0.0, tl.float32)
        for k0 in range(0, KA, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_row + offs_k[:, None] * B + offs_j[None, :],
                mask=(offs_k < KA)[:, None] & j_valid[None, :],
                other=0.0,
            )
            left = tl.load(left_ptr + offs_m[:, None] * KA_PAD + offs_k[None, :])
            x = x.to(left.dtype)
            if DOT_IN_FP32:
                left, x = left.to(tl.float32), x.to(tl.float32)
            acc = tl.dot(left, x, acc, input_precision=LEFT_PRECISION)
        acc = acc * scale
        if RIGHT_MODE == 0:
            out = tl.dot(acc, h_b, input_precision=RIGHT_PRECISION)
        else:
            h_b = h_b.to(tl.bfloat16)
            hi = acc.to(tl.bfloat16)
            lo = (acc - hi.to(tl.float32)).to(tl.bfloat16)
            if DOT_IN_FP32:
                h_b, hi, lo = h_b.to(tl.float32), hi.to(tl.float32), lo.to(tl.float32)
            out = tl.dot(hi, h_b, input_precision=RIGHT_PRECISION)
            if RIGHT_MODE == 1:
                out = tl.dot(lo, h_b, out, input_precision=RIGHT_PRECISION)
        mask = (offs_m < KA)[:, None] & j_valid[None, :]
        y_ptrs = y_ptr + row * y_row_stride + offs_m[:, None] * B + offs_j[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The kernel, compiled (JITFunction) or interpreted (InterpretedFunction).

    ``triton.jit`` chooses between the two from TRITON_INTERPRET *when the decorator runs*, i.e.
    at import of this module. Building both explicitly and choosing per call makes the choice
    follow the environment at call time: a test that sets TRITON_INTERPRET=1 gets the
    interpreter even if another module imported this file first.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_hadamard_kernel_source)
    return triton.runtime.JITFunction(_hadamard_kernel_source)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _default_scale(n: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(n) if scale is None else float(scale)


def hadamard_transform_reference(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``(x @ hadamard_matrix(n)) * scale`` over the last dim (n = x.shape[-1]), computed fast.

    Default scale 1/sqrt(n) (orthonormal). Any leading shape; computed in float32 (float64 for
    float64 input), returned in x.dtype. Raises UnsupportedHadamardSize for unsupported n.
    """
    n = x.shape[-1]
    f = hadamard_factor(n)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.reshape(-1, f.k, f.pow2).to(compute)
    h = 1
    while h < f.pow2:  # butterflies: y @ H_P with H_P = H_2 ⊗ ... ⊗ H_2 (Sylvester order)
        y = y.reshape(y.shape[0], f.k, f.pow2 // (2 * h), 2, h)
        top, bottom = y[..., 0, :], y[..., 1, :]
        y = torch.stack((top + bottom, top - bottom), dim=-2)
        h *= 2
    y = y.reshape(-1, f.k, f.pow2)
    if f.k > 1:
        y = torch.matmul(small_hadamard(f.k).to(device=x.device, dtype=compute).T, y)
    return (y * _default_scale(n, scale)).reshape(x.shape).to(x.dtype)


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``(x @ hadamard_matrix(n)) * scale`` over the last dim, as one Triton kernel.

    Same contract as ``hadamard_transform_reference`` (default scale 1/sqrt(n), any leading
    shape, output in x.dtype). Runs the Triton kernel for float16/bfloat16/float32 input on CUDA,
    or anywhere when TRITON_INTERPRET=1 is set (Triton's CPU interpreter: slow, for tests);
    otherwise, and for float64, falls back to the reference.
    """
    n = x.shape[-1]
    plan = _plan(n)  # raises UnsupportedHadamardSize early, on every path
    interpret = _interpret_requested()
    supported_dtype = x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if not supported_dtype or not (x.is_cuda or interpret) or x.numel() == 0:
        return hadamard_transform_reference(x, scale)

    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    if plan.ka == 1:
        right_mode, grid = 3, (triton.cdiv(rows.shape[0], plan.block_m), 1)
    else:
        right_mode = 0 if fp32 else (1 if _SPLIT_16BIT_INTERMEDIATE else 2)
        grid = (rows.shape[0], plan.ka_pad // plan.block_m)
    extra = {} if _NUM_STAGES is None else {"num_stages": _NUM_STAGES}
    _kernel(interpret)[grid](
        rows,
        out,
        _left_matrix(n, x.dtype, x.device),
        rows.shape[0],
        rows.stride(0),
        out.stride(0),
        _default_scale(n, scale),
        KA=plan.ka,
        KA_PAD=plan.ka_pad,
        B=plan.b,
        B_PAD=plan.b_pad,
        BLOCK_M=plan.block_m,
        BLOCK_K=plan.block_k,
        LEFT_PRECISION=_FP32_DOT_PRECISION if fp32 else None,  # 16-bit operands: exact anyway
        RIGHT_MODE=right_mode,
        RIGHT_PRECISION=_FP32_DOT_PRECISION if fp32 or interpret else None,
        # Triton's interpreter multiplies bfloat16 tiles as raw uint16 bits (numpy has no
        # bfloat16), so there the 16-bit operands go to the dot as float32: same values, as the
        # products with ±1 are exact either way.
        DOT_IN_FP32=interpret,
        num_warps=plan.num_warps,
        **extra,
    )
    return out.reshape(x.shape)


def block_hadamard_transform(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Block-diagonal :func:`hadamard_transform`: the last dim is cut into equal blocks of
    ``block_size`` channels and each block is transformed on its own (orthonormal per block);
    ``None`` or the whole last dim is one block.

    This is the shard-local online R4 (``rotation.r4.blocks`` in ``hq_vllm/format.py``): a
    tensor-parallel rank holding whole blocks of the down_proj input rotates its own slice,
    without the other ranks' channels. Each block is one vector of ``block_size`` to the
    kernel; with the same dense factor k the multiply-adds per token are those of the whole
    size, but a block whose power-of-two part is below the right factor's width (64) makes
    narrower tiles: on H200 (bf16, 8192 rows) 4864 took 96 µs as one block, 127 µs as 2 blocks
    (76·32), 178 µs as 4 (76·16), while 14336 = 28·512 took 280 µs as one and 191 µs as 2.
    """
    n = x.shape[-1]
    if block_size is None or block_size == n:
        return hadamard_transform(x)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or n % block_size:
        raise ValueError(f"block size {block_size!r} does not divide the last dimension {n}")
    return hadamard_transform(x.unflatten(-1, (n // block_size, block_size))).flatten(-2)
