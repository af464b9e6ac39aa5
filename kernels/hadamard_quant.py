"""Online Hadamard rotation fused with dynamic per-token activation quantization, in one pass.

What the served model computes before a linear with an online input rotation (R4 on down_proj,
or the per-linear rotation of the plain-HF online mode) is, per token row ``x [N]``::

    y = block_hadamard_transform(x, N / blocks)    # in x.dtype: bf16 / fp16 / fp32
    s = max(clip * max|y| / qmax, tiny)            # float32, qmax = 2**(bits-1) - 1
    c = clamp(round(y / s), -qmax - 1, qmax)       # int8, round half to even

(``hq_vllm.offline.quantize.fake_quantize_per_token`` and the plugin's copy in
``hq_vllm/quant_method.py`` are ``c * s``; ``kernels/quant.py`` holds the weight grid, whose
conventions these follow: IEEE division, half-to-even rounding, float32 scale.) Unfused, that is
a rotation kernel (read x, write y) and a quantizer (read y twice, write codes): 4-5 passes over
the row. Fused, it is one read of ``x`` and one write of the codes (1 byte per channel) plus one
float32 scale per token, or, for the ``dequantize=True`` entry point, one write of ``c * s`` in
x.dtype (what the current dequant GEMM / ``F.linear`` consumes: the int8 GEMM that would read
the codes does not exist yet).

Two implementations with the same contract:

* ``hadamard_quant_reference``: plain torch, ``hadamard_transform_reference`` (per block) and
  then the quantizer, operation for operation as the simulator does it. The definition.
* ``hadamard_quant``: one Triton kernel (below). ``TRITON_INTERPRET=1`` runs it on the CPU.

Kernel design. The quantization scale needs the whole rotated row before the first code can be
written, so one program owns whole token rows and keeps them in registers from the load to the
store (the alternatives, a second pass over a stored rotated row or a cross-program absmax,
cost HBM bytes or a grid-wide dependency). With ``N / blocks = k · 2^m``
(``hadamard.hadamard_factor``: H = H_k ⊗ H_{2^m}) and ``2^m = A · B``, each Hadamard block of
the row is the row-major matrix ``X_j [R, B]``, ``R = k · A``, and the blocks sit side by side
as column groups of one tile ``X = [X_0 … X_{blocks-1}]  [R, blocks · B]``:

    Y = Lᵀ · X · (I_blocks ⊗ H_B),      L = H_k ⊗ H_A

so a block-diagonal rotation (``blocks`` > 1, the shard-local R4) costs what one block does per
channel. Two tensor-core products:

1. ``Z = Lᵀ X``, the dense factor first, on the exact 16-bit input (one pass, float32
   accumulation): ``Lᵀ`` is a cached ±1 table streamed with X in chunks of ``CH`` rows (a
   pipelined reduction loop, as a matmul's K loop; the table loads ask for L1 caching, since
   every program reads the same table), into one or two power-of-two row segments of
   accumulators, the larger first (148 rows → 128 + 32: Triton tiles are powers of two, and padding 148 to 256
   would nearly double the dominant product). For N = 4^j the 1/sqrt(N) scale is a power of
   two and sits in this table (exact), one multiply per channel less.
2. ``Y = Z (I_blocks ⊗ H_B)``, a second cached table (loaded after the loop, so it does not pin
   registers through it). Z is float32, so for 16-bit input it enters the tensor cores as bf16
   hi + lo parts (two passes, ~16 mantissa bits) or, opt-in (``_FP16_MAX_BITS``), as one
   float16 pass after scaling the row by the power of two that puts its largest |Z| just under
   2^15 (11 mantissa bits, exact scaling, no overflow).
3. Epilogue on the register tile: round Y to x.dtype (the reference rotates in x.dtype), |max|
   over the row, ``s`` and ``1/s`` with IEEE division (``div_rn``) once per row, then per
   channel ``y / s`` correctly rounded in three operations (``q = y·(1/s)``, then
   ``q + fma(-q, s, y)·(1/s)``: Markstein's correction; bit for bit torch's division on the
   2·10^7 random pairs tried, and re-checked by the tests), clamp, round half to even into int8 (``cvt.rni``; the interpreter,
   which has no libdevice, adds and subtracts 1.5·2^23), store the codes (or ``c * s`` in
   x.dtype) and the scale.

Rows of at most 128 channels whose blocks are powers of two (head-dim-like, tests) take a
second layout: a program holds ``ROWS`` tokens as ``[ROWS, N]`` and multiplies once by the
(block-diagonal) ``H_N``. Otherwise ``B`` (hence A, R) is chosen per size to minimise the
tensor-core work of both products, ``2·R_out·R_red / R + c·blocks·B`` FLOP per channel (R_out,
R_red: R padded to the segments and to the chunks; c = 4 split, 2 single pass; ties to the
smaller left table), within a register budget; warps by tile size. Tunables are in one place
below. ``compile_for_gpu`` builds the kernel for sm_90 on a machine without a GPU (the tests
do, since the interpreter never runs the GPU-only paths).

What bounds it (H200: ~4.3 TB/s copy, ~790 dense bf16 TFLOP/s, 132 SMs at ~1.98 GHz). At 80% of
the copy bandwidth with 3 bytes per channel (2 read, 1 written) an SM must finish ~4.4
channels per clock: ~29 CUDA-core instructions per channel in all, and the tensor work above
at ~1.15·10^12 channels/s. Per channel, by size (split mode): 4096 = 64·64: 128 + 256 = 384
FLOP (~56% of the dense rate at that speed); 14336 = 28·512 as [112, 128]: 256 + 512 = 768
(~110%); 11008 = 172·64: 393 + 256 = 649 (~95%); 18944 = 148·128: 346 + 512 = 858 (~125%).
So 80% is within reach at 4096 only if the tensor work overlaps the loads; the sizes with a
large dense factor (172, 148) or a 512-wide power of two are bound by the tensor cores — the
dense H_k product alone costs ~2k FLOP per channel, the "large k is a speed bug" of
``hadamard.py`` — and the float16 second pass (c = 2) is the first lever there. The CUDA-core
side, counted statically in the SASS of an sm_90a build (Triton 3.9, ptxas 12.9): ~24
instructions per channel at 4096, 26-37 at the other three (no spills at the chosen warps:
90 / 126 / 189 / 199 registers). Not yet timed on a GPU: ``benchmarks/hadamard_quant_bench.py``
measures it and sweeps the tunables (``--configs``).

Precision: the first product is exact up to float32 accumulation. The second adds ~2^-17
(split) or ~2^-12 (fp16) relative error before the x.dtype rounding the reference applies too,
so codes differ from the reference only where that error moves a value across a rounding
boundary (a 16-bit ulp or a code boundary): a small fraction, and never by more than one code
in split mode; scales differ only when the row's largest element rounds to a different 16-bit
value.

Dispatch: the kernel runs for float16/bfloat16/float32 input on CUDA, or anywhere with
``TRITON_INTERPRET=1`` (read at call time, as in ``fwht.py``); otherwise the reference runs.
Registered as ``torch.ops.hadaquant.hadamard_quant`` / ``hadamard_quant_dequant`` (opaque to
torch.compile, capturable in CUDA graphs: no host synchronisation).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fwht import hadamard_transform_reference
from .hadamard import hadamard_factor, hadamard_matrix, small_hadamard

__all__ = [
    "QUANT_BITS",
    "compile_for_gpu",
    "dequantize_per_token",
    "hadamard_quant",
    "hadamard_quant_dequant_op",
    "hadamard_quant_op",
    "hadamard_quant_reference",
    "quantize_per_token_reference",
]

#: Activation bit widths the fused op quantizes to (codes fit int8; 16 means "no quantization"
#: and is not this op's business).
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place.
# ---------------------------------------------------------------------------------------------
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_MAX_RIGHT = 128  # widest right factor H_B (its table is [B, B] per program)
_MAX_ROWS_MODE_N = 128  # powers of two up to this: [ROWS, N] tiles, one product
_ROWS_MODE_ELEMS = 4096  # elements per program in that layout (ROWS = this / N, >= 16)
_MAX_TILE_ELEMS = 32768  # register budget: padded row tile [R_pad, B_pad] per program
_CHUNK_CHOICES = (64, 32, 16)  # reduction chunk of the first product: least padding, then larger
#: 16-bit input: the float32 intermediate Z enters the second product as bf16 hi + lo (two passes,
#: ~2^-17 relative), or, for bit widths up to this, as one float16 pass after an exact
#: power-of-two row scaling (~2^-12; half the second product's tensor work). 0: always split.
#: Measured on the interpreter (bf16 input, 256 rows, N = 576 / 1536, clip 0.9): split mode
#: leaves 3e-6 - 4e-4 of the codes one off the reference (3-8 bits) and every scale equal; the
#: float16 pass 2e-4 - 8e-4 at 3-4 bits, ~1% at 8 bits (once two off), and 2-3% of the scales
#: one bf16 ulp off. Far below 3-4-bit quantization noise, but not the reference's values, so it
#: is opt-in until the GPU numbers say it is worth it.
_FP16_MAX_BITS = 0
_FP32_DOT_PRECISION = "tf32x3"  # float32 input (not the serving path)
_NUM_STAGES: int | None = None  # None: Triton's default pipelining depth
#: Cache operator of the left table's pipelined loads: ".ca" keeps the table (shared by every
#: program, up to ~70 KB) in L1; "" lets cp.async bypass L1 (.cg), re-reading it from L2 for
#: every token (~3x the row's own bytes at 11008).
_LEFT_TABLE_CACHE = ".ca"
_TINY = torch.finfo(torch.float32).tiny


def _warps_for(tile_elems: int) -> int:
    """Warps per program by the padded row tile [R_out, B_pad]: 4 up to 4096 elements, else 8
    (up to ~80 float32 accumulators per thread; 16 warps cap registers at 128, and the
    18944 = 148·128 tile then spills a little in the sm_90a build; the benchmark's
    ``{"num_warps": 16}`` config measures it)."""
    return 4 if tile_elems <= 4096 else 8


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _check_args(n: int, bits: int, clip: float, blocks: int) -> int:
    """Validate; return the block size n // blocks."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"activation bits must be one of {QUANT_BITS} for int8 codes, got {bits!r}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must lie in (0, 1], got {clip!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks <= 0 or n % blocks:
        raise ValueError(f"blocks = {blocks!r} must be a positive integer dividing the last dim {n}")
    return n // blocks


def quantize_per_token_reference(y: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token quantization of ``y [..., N]`` over the last dim.

    The float32 operations of ``fake_quantize_per_token`` (offline/quantize.py), in its order:
    ``s = clip * absmax / qmax`` clamped to float32's smallest normal, ``c = clamp(round(y / s),
    -qmax - 1, qmax)`` with round half to even. Returns int8 codes ``[..., N]`` and float32
    scales ``[...]``; ``c * s`` in y.dtype is the simulator's fake-quantized value bit for bit.
    """
    _check_args(y.shape[-1], bits, clip, 1)
    qmax = 2 ** (bits - 1) - 1
    yf = y.to(torch.float32)
    hi, lo = yf.amax(-1, keepdim=True), yf.amin(-1, keepdim=True)
    scale = (clip * torch.maximum(hi, -lo) / qmax).clamp(min=_TINY)
    codes = torch.round(yf / scale).clamp_(-qmax - 1, qmax)
    return codes.to(torch.int8), scale.squeeze(-1)


def dequantize_per_token(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``codes * scales`` (per token, float32 product) in ``dtype``: the fake-quantized value."""
    return (codes.to(torch.float32) * scales.unsqueeze(-1)).to(dtype)


def _rotate_reference(x: torch.Tensor, blocks: int) -> torch.Tensor:
    if blocks == 1:
        return hadamard_transform_reference(x)
    n = x.shape[-1]
    return hadamard_transform_reference(x.unflatten(-1, (blocks, n // blocks))).flatten(-2)


def hadamard_quant_reference(
    x: torch.Tensor, bits: int, clip: float = 1.0, blocks: int = 1, dequantize: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Rotate each row of ``x [..., N]`` by the orthonormal (block-diagonal, ``blocks`` equal
    blocks) Hadamard matrix, in x.dtype, then quantize it per token symmetrically.

    Returns ``(codes int8 [..., N], scales float32 [...])``, or with ``dequantize`` the
    fake-quantized ``codes * scales`` in x.dtype, which is
    ``fake_quantize_per_token(block_hadamard_transform(x, N // blocks), bits, clip)``.
    """
    _check_args(x.shape[-1], bits, clip, blocks)
    codes, scales = quantize_per_token_reference(_rotate_reference(x, blocks), bits, clip)
    return dequantize_per_token(codes, scales, x.dtype) if dequantize else (codes, scales)


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Layout of one size. Rows mode: ``rows`` tokens of ``n`` channels per program (``b`` = n).
    Row mode: one token as ``[r, blocks * b]`` (each Hadamard block an ``[r, b]`` column group),
    accumulators in segments ``seg0`` (+ ``seg1``) rows, reduction over ``nch`` chunks of ``ch``
    rows."""

    n: int
    blocks: int
    k: int
    a: int
    b: int  # columns per Hadamard block
    cols: int  # blocks * b (rows mode: n)
    b_pad: int
    r: int  # rows of one block
    rows_mode: bool
    rows: int
    seg0: int
    seg1: int  # 0: one segment
    ch: int
    nch: int
    num_warps: int

    @property
    def r_out(self) -> int:
        return self.seg0 + self.seg1


def _segments(r: int) -> tuple[int, int]:
    """Cover ``r`` rows (rounded up to 16) by one or two power-of-two segments, least total,
    the larger first.

    Larger first is a correctness matter, not taste: on the H200 (Triton 3.6, 8 warps, default
    pipelining) a 32-row first segment followed by a 128-row one (148 = 32 + 128 for N = 18944)
    left 1.8% of the codes and scales up to 2.4% off, while 128 + 32, 4 or 16 warps, one stage
    or one 256-row segment were all exact up to rounding (8e-5 of the codes one off:
    ``benchmarks/hadamard_quant_bench.py --diagnose``, 2026-12-02)."""
    need = _round_up(r, _MIN_DOT)
    best = (_next_pow2(need), 0)
    for s1 in (1 << e for e in range(4, 16)):
        if s1 >= need:
            break
        s0 = max(_MIN_DOT, _next_pow2(need - s1))
        if s0 + s1 < sum(best) and s0 >= s1:
            best = (s0, s1)
    return best


def _chunk(r: int) -> int:
    return min(_CHUNK_CHOICES, key=lambda c: (_round_up(r, c), -c))


@functools.lru_cache(maxsize=256)
def _plan(n: int, blocks: int, split: bool = True) -> _Plan:
    nb = n // blocks
    f = hadamard_factor(nb)
    if f.k == 1 and n <= _MAX_ROWS_MODE_N:
        rows = max(_MIN_DOT, _ROWS_MODE_ELEMS // max(n, _MIN_DOT))
        return _Plan(n, blocks, 1, 1, n, n, _next_pow2(max(_MIN_DOT, n)), 1, True, rows, 0, 0, 0, 0, 4)
    best = None
    widths = [w for w in (16, 32, 64, 128) if w <= f.pow2 and blocks * w <= _MAX_RIGHT]
    widths = widths or [min(f.pow2, _MIN_DOT)]
    for b in widths:
        a = f.pow2 // b
        r = f.k * a  # one block's rows; the blocks sit side by side as column groups
        seg0, seg1 = _segments(r)
        ch = _chunk(r)
        cols = blocks * b
        b_pad = _next_pow2(max(_MIN_DOT, cols))
        tile = (seg0 + seg1) * b_pad
        red = _round_up(r, ch)
        cost = 2 * (seg0 + seg1) * red / r + (4 if split else 2) * b_pad
        fits = tile <= _MAX_TILE_ELEMS
        # ties: the smaller left table (streamed from L2/L1 by every program)
        key = (not fits, cost if fits else tile, (seg0 + seg1) * red)
        if best is None or key < best[0]:
            plan = _Plan(n, blocks, f.k, a, b, cols, b_pad, r, False, 1, seg0, seg1, ch, red // ch,
                         _warps_for(tile))
            best = (key, plan)
    return best[1]


@functools.lru_cache(maxsize=64)
def _left_table(p: _Plan, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """``scale · Lᵀ = scale · (H_k ⊗ H_A)ᵀ`` (one block's) zero-padded to ``[r_out, nch * ch]``,
    cached per device (``scale`` a power of two: exact)."""
    left = torch.kron(small_hadamard(p.k), hadamard_matrix(p.a))
    padded = torch.zeros(p.r_out, p.nch * p.ch, dtype=torch.float32)
    padded[: p.r, : p.r] = left.T * scale
    return padded.to(dtype=dtype, device=device).contiguous()


@functools.lru_cache(maxsize=64)
def _right_table(b: int, b_pad: int, block: int, dtype: torch.dtype, device: torch.device,
                 scale: float = 1.0) -> torch.Tensor:
    """``scale · (I_{b/block} ⊗ H_block)`` (Sylvester, symmetric) zero-padded to ``[b_pad, b_pad]``.

    A table rather than popcount parity in registers: generating it costs every program ~6
    integer operations per matrix entry, i.e. per channel of its row, about a quarter of the
    per-channel instruction budget at memory speed; loading it is a few 16-byte loads (L1/L2).
    """
    h = torch.kron(torch.eye(b // block), hadamard_matrix(block)) if block < b else hadamard_matrix(b)
    padded = torch.zeros(b_pad, b_pad, dtype=torch.float32)
    padded[:b, :b] = h * scale
    return padded.to(dtype=dtype, device=device).contiguous()


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


def _hadamard_quant_kernel_source(
    x_ptr,
    out_ptr,
    scale_ptr,
    left_ptr,
    right_ptr,
    n_rows,
    x_row_stride,
    out_row_stride,
    rot_scale,
    clip,
    qmax,
    R: tl.constexpr,
    B: tl.constexpr,  # columns per Hadamard block (row mode: the right factor's width)
    COLS: tl.constexpr,  # valid columns: blocks * B (row mode), N (rows mode)
    B_PAD: tl.constexpr,  # COLS padded to a power of two >= 16
    NB: tl.constexpr,  # channels per Hadamard block (row mode: column block j // B starts at j // B * NB)
    ROWS_MODE: tl.constexpr,
    ROWS: tl.constexpr,
    SEG0: tl.constexpr,
    SEG1: tl.constexpr,  # 0: no second segment
    CH: tl.constexpr,
    NCH: tl.constexpr,
    RIGHT_MODE: tl.constexpr,  # 0 operands as loaded, 1 bf16 hi + lo, 2 fp16 single pass
    ROUND_TO_INPUT: tl.constexpr,  # round the rotated value to x.dtype (16-bit input)
    DEQUANT_OUT: tl.constexpr,  # write codes * scale in out dtype instead of int8 codes
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BF16_BITS_ROUND: tl.constexpr,  # round to bf16 with integer ops (the interpreter truncates)
    NATIVE_RINT: tl.constexpr,  # GPU: cvt.rni (libdevice); interpreter: the 1.5 * 2**23 trick
    SCALE_FOLDED: tl.constexpr,  # 1/sqrt(n) is a power of two and sits in the first table
    LEFT_CACHE: tl.constexpr,  # ".ca" for the pipelined table loads (cp.async keeps them in L1)
):
    """One program: ROWS tokens (rows mode) or one token (row mode); see the module docstring.

    Only core builtins (tl.full, tl.reduce with the standard max combiner, tl.math.div_rn,
    tl.fma): the source is built compiled or interpreted at call time (see ``fwht._kernel``).
    The segment code is written out twice (no helper functions, for the same reason).
    """
    TINY: tl.constexpr = 1.1754943508222875e-38  # float32's smallest normal
    MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2**23: (v + MAGIC) - MAGIC rounds half to even
    offs_j = tl.arange(0, B_PAD)
    j_valid = offs_j < COLS
    if ROWS_MODE:
        # ------------------------------------------------------------ ROWS tokens x [B]
        offs_r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        r_valid = offs_r < n_rows
        mask = r_valid[:, None] & j_valid[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * x_row_stride + offs_j[None, :], mask=mask, other=0.0)
        # H_N (block-diagonal for blocks > 1), zero-padded to B_PAD, in x's dtype.
        h_b = tl.load(right_ptr + offs_j[:, None] * B_PAD + offs_j[None, :])
        if DOT_IN_FP32:
            x, h_b = x.to(tl.float32), h_b.to(tl.float32)
        y = tl.dot(x, h_b, input_precision=DOT_PRECISION)
        if not SCALE_FOLDED:
            y = y * rot_scale
        if ROUND_TO_INPUT:
            if BF16_BITS_ROUND:
                y = ((y.to(tl.int32, bitcast=True) + 0x7FFF + ((y.to(tl.int32, bitcast=True) >> 16) & 1))
                     & -65536).to(tl.float32, bitcast=True)
            else:
                y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.reduce(tl.abs(y), 1, tl.standard._elementwise_max)  # [ROWS]
        s = tl.maximum(tl.math.div_rn(clip * amax, qmax), TINY)[:, None]
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        q = y * inv  # y / s correctly rounded in three operations (Markstein): see the docstring
        q = tl.fma(tl.fma(-q, s, y), inv, q)
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
        out_ptrs = out_ptr + offs_r[:, None] * out_row_stride + offs_j[None, :]
        if DEQUANT_OUT:
            if NATIVE_RINT:
                q = libdevice.rint(q)
            else:
                q = (q + MAGIC) - MAGIC
            dq = q * s
            if BF16_BITS_ROUND:
                dq = ((dq.to(tl.int32, bitcast=True) + 0x7FFF + ((dq.to(tl.int32, bitcast=True) >> 16) & 1))
                      & -65536).to(tl.float32, bitcast=True)
            tl.store(out_ptrs, dq.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if NATIVE_RINT:
                qi = libdevice.float2int_rn(q)
            else:
                qi = ((q + MAGIC) - MAGIC).to(tl.int32)
            tl.store(out_ptrs, qi.to(tl.int8), mask=mask)
        tl.store(scale_ptr + offs_r[:, None], s, mask=r_valid[:, None])
    else:
        # ------------------------------------------------------------ one token as [R, B]
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_row_stride
        # Column j of the [R, COLS] tile is column j % B of Hadamard block j // B: the blocks sit
        # side by side, so one block's L serves them all and H_B becomes I_blocks ⊗ H_B.
        col_off = (offs_j // B) * NB + offs_j % B
        LCOLS: tl.constexpr = NCH * CH
        offs_s0 = tl.arange(0, SEG0)
        acc0 = tl.full((SEG0, B_PAD), 0.0, tl.float32)
        if SEG1 > 0:
            offs_s1 = SEG0 + tl.arange(0, SEG1)
            acc1 = tl.full((SEG1, B_PAD), 0.0, tl.float32)
        # First product Z = Lᵀ X, streamed over chunks of CH rows of X (and columns of Lᵀ).
        for c in range(NCH):
            offs_k = c * CH + tl.arange(0, CH)
            xk = tl.load(
                x_row + offs_k[:, None] * B + col_off[None, :],
                mask=(offs_k < R)[:, None] & j_valid[None, :],
                other=0.0,
            )
            l0 = tl.load(left_ptr + offs_s0[:, None] * LCOLS + offs_k[None, :], cache_modifier=LEFT_CACHE)
            if DOT_IN_FP32:
                xk, l0 = xk.to(tl.float32), l0.to(tl.float32)
            acc0 = tl.dot(l0, xk, acc0, input_precision=DOT_PRECISION)
            if SEG1 > 0:
                l1 = tl.load(left_ptr + offs_s1[:, None] * LCOLS + offs_k[None, :], cache_modifier=LEFT_CACHE)
                if DOT_IN_FP32:
                    l1 = l1.to(tl.float32)
                acc1 = tl.dot(l1, xk, acc1, input_precision=DOT_PRECISION)

        # Second product Y = Z H_B per segment, Z = acc * rot_scale. H_B is loaded only now (in
        # the operand dtype, zero-padded): held from the start it would pin registers through
        # the whole first product.
        h_b = tl.load(right_ptr + offs_j[:, None] * B_PAD + offs_j[None, :])
        if DOT_IN_FP32:
            h_b = h_b.to(tl.float32)
        if RIGHT_MODE == 2:
            # float16 single pass: scale the row by 2^(141 - e), e the biased exponent of
            # max|acc|, so that |acc| * 2^(141 - e) < 2^15: exact, and far from fp16's overflow.
            zmax = tl.reduce(tl.reduce(tl.abs(acc0), 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max)
            if SEG1 > 0:
                zmax = tl.maximum(zmax, tl.reduce(tl.reduce(tl.abs(acc1), 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max))
            e = tl.minimum(tl.maximum((zmax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15), 254)
            pw = ((268 - e) << 23).to(tl.float32, bitcast=True)
            back = ((e - 14) << 23).to(tl.float32, bitcast=True)
            if not SCALE_FOLDED:
                back = back * rot_scale
            z = (acc0 * pw).to(tl.float16)
            if DOT_IN_FP32:
                z = z.to(tl.float32)
            y0 = tl.dot(z, h_b, input_precision=DOT_PRECISION) * back
            if SEG1 > 0:
                z = (acc1 * pw).to(tl.float16)
                if DOT_IN_FP32:
                    z = z.to(tl.float32)
                y1 = tl.dot(z, h_b, input_precision=DOT_PRECISION) * back
        elif RIGHT_MODE == 1:
            z = acc0
            if not SCALE_FOLDED:
                z = z * rot_scale
            hi = z.to(tl.bfloat16)
            if DOT_IN_FP32:  # the interpreter (whatever x's dtype): bf16 hi rounded as the GPU does
                hi = ((z.to(tl.int32, bitcast=True) + 0x7FFF + ((z.to(tl.int32, bitcast=True) >> 16) & 1))
                      & -65536).to(tl.float32, bitcast=True)
            lo = (z - hi.to(tl.float32)).to(tl.bfloat16)
            if DOT_IN_FP32:
                hi, lo = hi.to(tl.float32), lo.to(tl.float32)
            y0 = tl.dot(hi, h_b, input_precision=DOT_PRECISION)
            y0 = tl.dot(lo, h_b, y0, input_precision=DOT_PRECISION)
            if SEG1 > 0:
                z = acc1
                if not SCALE_FOLDED:
                    z = z * rot_scale
                hi = z.to(tl.bfloat16)
                if DOT_IN_FP32:
                    hi = ((z.to(tl.int32, bitcast=True) + 0x7FFF + ((z.to(tl.int32, bitcast=True) >> 16) & 1))
                          & -65536).to(tl.float32, bitcast=True)
                lo = (z - hi.to(tl.float32)).to(tl.bfloat16)
                if DOT_IN_FP32:
                    hi, lo = hi.to(tl.float32), lo.to(tl.float32)
                y1 = tl.dot(hi, h_b, input_precision=DOT_PRECISION)
                y1 = tl.dot(lo, h_b, y1, input_precision=DOT_PRECISION)
        else:
            if not SCALE_FOLDED:
                acc0 = acc0 * rot_scale
            y0 = tl.dot(acc0, h_b, input_precision=DOT_PRECISION)
            if SEG1 > 0:
                if not SCALE_FOLDED:
                    acc1 = acc1 * rot_scale
                y1 = tl.dot(acc1, h_b, input_precision=DOT_PRECISION)

        # Epilogue: round to x.dtype, row absmax, scale, codes.
        if ROUND_TO_INPUT:
            if BF16_BITS_ROUND:
                y0 = ((y0.to(tl.int32, bitcast=True) + 0x7FFF + ((y0.to(tl.int32, bitcast=True) >> 16) & 1))
                      & -65536).to(tl.float32, bitcast=True)
            else:
                y0 = y0.to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.reduce(tl.reduce(tl.abs(y0), 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max)
        if SEG1 > 0:
            if ROUND_TO_INPUT:
                if BF16_BITS_ROUND:
                    y1 = ((y1.to(tl.int32, bitcast=True) + 0x7FFF + ((y1.to(tl.int32, bitcast=True) >> 16) & 1))
                          & -65536).to(tl.float32, bitcast=True)
                else:
                    y1 = y1.to(x_ptr.dtype.element_ty).to(tl.float32)
            amax = tl.maximum(amax, tl.reduce(tl.reduce(tl.abs(y1), 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max))
        s = tl.maximum(tl.math.div_rn(clip * amax, qmax), TINY)
        inv = tl.math.div_rn(1.0, s)
        out_row = out_ptr + row * out_row_stride

        q = y0 * inv  # y / s correctly rounded in three operations (Markstein): see the docstring
        q = tl.fma(tl.fma(-q, s, y0), inv, q)
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
        mask0 = (offs_s0 < R)[:, None] & j_valid[None, :]
        ptrs0 = out_row + offs_s0[:, None] * B + col_off[None, :]
        if DEQUANT_OUT:
            if NATIVE_RINT:
                q = libdevice.rint(q)
            else:
                q = (q + MAGIC) - MAGIC
            dq = q * s
            if BF16_BITS_ROUND:
                dq = ((dq.to(tl.int32, bitcast=True) + 0x7FFF + ((dq.to(tl.int32, bitcast=True) >> 16) & 1))
                      & -65536).to(tl.float32, bitcast=True)
            tl.store(ptrs0, dq.to(out_ptr.dtype.element_ty), mask=mask0)
        else:
            if NATIVE_RINT:
                qi = libdevice.float2int_rn(q)
            else:
                qi = ((q + MAGIC) - MAGIC).to(tl.int32)
            tl.store(ptrs0, qi.to(tl.int8), mask=mask0)
        if SEG1 > 0:
            q = y1 * inv
            q = tl.fma(tl.fma(-q, s, y1), inv, q)
            q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
            mask1 = (offs_s1 < R)[:, None] & j_valid[None, :]
            ptrs1 = out_row + offs_s1[:, None] * B + col_off[None, :]
            if DEQUANT_OUT:
                if NATIVE_RINT:
                    q = libdevice.rint(q)
                else:
                    q = (q + MAGIC) - MAGIC
                dq = q * s
                if BF16_BITS_ROUND:
                    dq = ((dq.to(tl.int32, bitcast=True) + 0x7FFF + ((dq.to(tl.int32, bitcast=True) >> 16) & 1))
                          & -65536).to(tl.float32, bitcast=True)
                tl.store(ptrs1, dq.to(out_ptr.dtype.element_ty), mask=mask1)
            else:
                if NATIVE_RINT:
                    qi = libdevice.float2int_rn(q)
                else:
                    qi = ((q + MAGIC) - MAGIC).to(tl.int32)
                tl.store(ptrs1, qi.to(tl.int8), mask=mask1)
        tl.store(scale_ptr + row, s)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """Compiled (JITFunction) or interpreted (InterpretedFunction), chosen per call."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_hadamard_quant_kernel_source)
    return triton.runtime.JITFunction(_hadamard_quant_kernel_source)


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    """Everything about one launch but the tensors: plan, tables' dtypes, constexprs."""

    plan: _Plan
    rot_scale: float
    fold: float  # the power-of-two 1/sqrt(N) carried by a table, or 1.0
    right_dtype: torch.dtype
    constexprs: dict


def _launch_config(n: int, blocks: int, bits: int, dtype: torch.dtype, dequantize: bool,
                   interpret: bool) -> _Launch:
    nb = n // blocks
    split = bits > _FP16_MAX_BITS
    plan = _plan(n, blocks, split)  # raises UnsupportedHadamardSize
    fp32 = dtype == torch.float32
    right_mode = 0 if (fp32 or plan.rows_mode) else (1 if split else 2)
    rot_scale = 1.0 / math.sqrt(nb)
    # nb = 4^j: 1/sqrt(nb) = 2^-j multiplies the first product's ±1 table exactly (one multiply
    # per channel less); otherwise the kernel multiplies.
    folded = nb & (nb - 1) == 0 and (nb.bit_length() - 1) % 2 == 0
    constexprs = dict(
        R=plan.r, B=plan.b, COLS=plan.cols, B_PAD=plan.b_pad, NB=nb,
        ROWS_MODE=plan.rows_mode, ROWS=plan.rows, SEG0=max(plan.seg0, 16), SEG1=plan.seg1,
        CH=max(plan.ch, 16), NCH=max(plan.nch, 1), RIGHT_MODE=right_mode,
        ROUND_TO_INPUT=not fp32, DEQUANT_OUT=dequantize,
        # Triton's interpreter multiplies 16-bit tiles as raw bits (numpy has no bfloat16): there
        # the operands go to the dot as float32 (same values: the ±1 products are exact).
        DOT_IN_FP32=interpret,
        DOT_PRECISION="ieee" if interpret else (_FP32_DOT_PRECISION if fp32 else None),
        # The interpreter converts float32 to bfloat16 by truncation; the GPU rounds to nearest
        # even, which the integer form computes exactly (same values, so the tests see the
        # GPU's arithmetic).
        BF16_BITS_ROUND=interpret and dtype == torch.bfloat16,
        NATIVE_RINT=not interpret,  # libdevice is not interpretable; both round half to even
        SCALE_FOLDED=folded,
        # Every program streams the same left table: cp.async would bypass L1 for it by default
        # (.cg); a plain load (one chunk, no pipelining) caches in L1 anyway, and an explicit
        # .ca there only makes it a "strong" load.
        LEFT_CACHE=_LEFT_TABLE_CACHE if plan.nch > 1 else "",
    )
    # the second product's operand dtype: x's (rows mode, float32), bf16 (split), fp16 (single)
    right_dtype = {0: dtype, 1: torch.bfloat16, 2: torch.float16}[right_mode]
    return _Launch(plan, rot_scale, rot_scale if folded else 1.0, right_dtype, constexprs)


def hadamard_quant(
    x: torch.Tensor, bits: int, clip: float = 1.0, blocks: int = 1, dequantize: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Fused :func:`hadamard_quant_reference`: same arguments and results, one Triton kernel.

    ``x [..., N]`` bf16/fp16/fp32 on CUDA (or anywhere with TRITON_INTERPRET=1); other inputs
    take the reference. Returns ``(codes int8 [..., N], scales float32 [...])``, or with
    ``dequantize`` the fake-quantized values in x.dtype (written by the kernel directly).
    """
    n = x.shape[-1]
    nb = _check_args(n, bits, clip, blocks)
    interpret = _interpret_requested()
    cfg = _launch_config(n, blocks, bits, x.dtype, dequantize, interpret)  # checks the size
    supported = x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if not supported or not (x.is_cuda or interpret) or x.numel() == 0:
        return hadamard_quant_reference(x, bits, clip, blocks, dequantize)
    plan = cfg.plan
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    t = rows.shape[0]
    out = torch.empty((t, n), dtype=x.dtype if dequantize else torch.int8, device=x.device)
    scales = torch.empty((t,), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(t, plan.rows),) if plan.rows_mode else (t,)
    left = scales if plan.rows_mode else _left_table(plan, x.dtype, x.device, cfg.fold)
    right = _right_table(plan.cols, plan.b_pad, nb if plan.rows_mode else plan.b, cfg.right_dtype, x.device,
                         cfg.fold if plan.rows_mode else 1.0)
    extra = {} if _NUM_STAGES is None else {"num_stages": _NUM_STAGES}
    _kernel(interpret)[grid](
        rows, out, scales, left, right, t, rows.stride(0), out.stride(0),
        cfg.rot_scale, float(clip), float(2 ** (bits - 1) - 1),
        **cfg.constexprs, num_warps=plan.num_warps, **extra,
    )
    lead = x.shape[:-1]
    if dequantize:
        return out.reshape(*lead, n)
    return out.reshape(*lead, n), scales.reshape(lead)


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for_gpu(n: int, bits: int = 4, blocks: int = 1, dtype: torch.dtype = torch.bfloat16,
                    dequantize: bool = False, arch: int = 90):
    """Compile the kernel for ``sm_<arch>`` without a GPU (Triton's bundled ptxas), as the JIT
    would for this size: returns Triton's compiled kernel (``asm["ptx"]``, ``asm["cubin"]``,
    ``metadata.shared``). For checking, on a CPU machine, that the GPU-only code paths
    (libdevice, native conversions, cache modifiers) build, and for reading the SASS."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _launch_config(n, blocks, bits, dtype, dequantize, interpret=False)
    ty = _TRITON_TYPES[dtype]
    sig = {
        "x_ptr": f"*{ty}", "out_ptr": f"*{ty}" if dequantize else "*i8", "scale_ptr": "*fp32",
        "left_ptr": f"*{ty}", "right_ptr": f"*{_TRITON_TYPES[cfg.right_dtype]}", "n_rows": "i32",
        "x_row_stride": "i32", "out_row_stride": "i32", "rot_scale": "fp32", "clip": "fp32", "qmax": "fp32",
    }
    names = list(sig) + list(cfg.constexprs)
    sig.update({k: "constexpr" for k in cfg.constexprs})
    # what the JIT's specialisation assumes for 16-byte-aligned tensors and strides
    aligned = ("x_ptr", "out_ptr", "scale_ptr", "left_ptr", "right_ptr", "x_row_stride", "out_row_stride")
    src = ASTSource(
        _kernel(False), sig,
        constexprs={(names.index(k),): v for k, v in cfg.constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    options = {"num_warps": cfg.plan.num_warps}
    if _NUM_STAGES is not None:
        options["num_stages"] = _NUM_STAGES
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile / CUDA graphs
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hadaquant::hadamard_quant", mutates_args=())
def hadamard_quant_op(x: torch.Tensor, bits: int, clip: float, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hadamard_quant` as ``torch.ops.hadaquant.hadamard_quant``: (codes, scales)."""
    return hadamard_quant(x, bits, clip, blocks)


@hadamard_quant_op.register_fake
def _(x, bits, clip, blocks):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hadaquant::hadamard_quant_dequant", mutates_args=())
def hadamard_quant_dequant_op(x: torch.Tensor, bits: int, clip: float, blocks: int) -> torch.Tensor:
    """``hadamard_quant(..., dequantize=True)`` as ``torch.ops.hadaquant.hadamard_quant_dequant``:
    the rotated, fake-quantized activation in x.dtype."""
    return hadamard_quant(x, bits, clip, blocks, dequantize=True)


@hadamard_quant_dequant_op.register_fake
def _(x, bits, clip, blocks):
    return torch.empty_like(x)
