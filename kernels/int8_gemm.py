"""Int8 tensor-core GEMM for prefill: per-token int8 activation codes x packed int3/int4 weights.

What a quantized linear computes when its activations are quantized symmetrically per token
(``a = c_a * s_a``, ``c_a`` int8 in ``[-2**(b_a-1), 2**(b_a-1) - 1]``, ``s_a`` float32 per token)
and its weight is ``w[n, k] = (c_w - z) * s_w`` per group of G input channels::

    y[m, n] = s_a[m] * sum_g s_w[g, n] * sum_{k in g} c_a[m, k] * (c_w[n, k] - z[g, n])  (+ bias)

The inner sum is an integer product: ``tl.dot(int8, int8) -> int32`` on the tensor cores, exact.
Only the outer sum (one float32 multiply-add per group and output) and the epilogue round.

Operands:

* ``a_codes`` int8 ``[M, K]`` and ``a_scales`` float32 ``[M]``: what
  ``kernels/hadamard_quant.py`` (``hadamard_quant``, rotated inputs) or :func:`quantize_per_token`
  (plain inputs) return; their ``codes * scales`` is the simulator's fake-quantized activation
  before its rounding to the activation dtype.
* ``qweight`` int32 ``[b*K/32, N]``, ``w_scales`` ``[K/G, N]``, ``w_zeros`` uint8 ``[K/G, N]`` or
  ``None`` (symmetric, ``z = 2**(b-1)``): the checkpoint's packed layout (``kernels/packing.py``),
  read as it is, as ``kernels/gemm.py`` reads it.

Kernel (one program per ``[BLOCK_M, BLOCK_N]`` output tile, a K loop of BLOCK_K channels):

1. **Unpack in registers.** A tile's packed words are loaded once (``b/8`` bytes per weight) and
   widened to int8 in channel order, so the activation tile is loaded as it lies. b = 4: word
   ``w`` of a 32-channel block holds channels ``8w + j`` at bits ``4j``. b = 3: the three bit
   planes are first merged into four nibble words (``W_r`` holds lane ``4i + r`` at bits
   ``4i .. 4i+2``: ``((P_p >> r) << p) & (0x11111111 << p)``, ~1.4 operations per weight), then
   both widths are a shift pair per weight. Symmetric weights come out signed, ``c - z``
   directly: flipping each field's top bit (once per word) turns the field into the two's
   complement of ``c - 2**(b-1)``, and a left shift plus an arithmetic right shift sign-extends
   it. Asymmetric weights subtract the group's zero point from the unsigned field in registers
   (``c - z`` in ``[-15, 15]``): one integer op per weight, cheaper than the equivalent
   ``z * rowsum(a)`` correction after the product (counted in the sm_90a SASS: 711 vs 868
   instructions per 128x128x128 step and thread, and no register spills), because the
   activation tile never leaves shared memory otherwise (the MMA reads it there).
   The tile is built transposed, ``[BLOCK_N, BLOCK_K]``, from ``tl.join``-ed fields, so each
   thread holds runs of 8 consecutive K values in registers and writes the K-major shared tile
   (the layout int8 MMA reads) with 8-byte stores rather than one store per byte; the dot takes
   its transpose.
2. **Per group**: the int32 partial of the group's ``G / BLOCK_K`` tiles is converted to float32
   and accumulated with that group's weight scale, ``acc += s_w[g] * partial``. Per output channel
   (``group_size = -1``) the whole K sum stays in int32 and is scaled once (|sum| < 2**31 for
   K < 2**20 at 8-bit activations).
3. **Epilogue**: ``acc * s_a[m] (+ bias)``, rounded once to ``out_dtype``.

Precision: the integer products are exact, so the result is the float32 reference's up to
float32 summation order (~1e-7 relative), and the simulator's (bf16-rounded fake-quantized
activations into a float GEMM) up to the activation dtype's rounding.

Tiles: every ``tl.dot`` dimension is >= 16 (the GPU requires it; the interpreter does not check)
and BLOCK_K >= 32 (int8 MMA's K step); BLOCK_K divides the group. Tunables are below, all in one
place; ``benchmarks/int8_gemm_bench.py`` times them (``--configs``). Not yet timed on a GPU.

What bounds it (counted statically in the sm_90a SASS of Triton 3.9's build, per thread and
128-channel K step): 555 instructions for W3 symmetric at 128x128 / 8 warps (487 for W4, 711
for W3 asymmetric; 220 registers, no spills), of which 160 are the per-group scaling
(int-to-float, FFMA, fp16 scale conversion per accumulator) and ~200 the unpack. At 4 warp
instructions issued per clock and SM that is ~0.53 clocks of issue per 1000 MACs against ~0.25
clocks of int8 tensor-core time (H200: ~4096 dense int8 MAC/clock/SM), so the kernel should be
bound by instruction issue, not by the tensor cores (at best ~45% of the int8 peak where the MMA
of one CTA overlaps the unpack of another, ~30% where nothing overlaps); the per-group scaling
alone costs about half the MMA time at G = 128. 256x64 tiles amortize the unpack over more rows (427 instructions per step for the same
MACs); two CTAs per SM (4 warps, 128x64) let one CTA's MMA overlap another's unpack.

Also here: :func:`quantize_per_token`, the no-rotation activation quantizer (one Triton program
per token, two passes over the row) with ``hadamard_quant.quantize_per_token_reference`` as its
reference, for the linears whose input has no online rotation.

Dispatch: the kernels run when the tensors are on CUDA or when ``TRITON_INTERPRET=1`` is set
(read at call time, as in ``fwht.py``); otherwise the torch references run. Registered as
``torch.ops.hadaquant.int8_gemm`` and ``torch.ops.hadaquant.quantize_per_token`` (opaque to
torch.compile, no host synchronisation: capturable in CUDA graphs).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .gemm import check_packed_weight, dequantize_packed_reference
from .hadamard_quant import QUANT_BITS, quantize_per_token_reference

__all__ = [
    "INT8_GEMM_BITS",
    "compile_for_gpu",
    "Int8GemmPlan",
    "int8_gemm",
    "int8_gemm_op",
    "int8_gemm_reference",
    "plan_int8_gemm",
    "quantize_per_token",
    "quantize_per_token_op",
]

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place (benchmarks/int8_gemm_bench.py --configs sweeps them).
# ---------------------------------------------------------------------------------------------
INT8_GEMM_BITS = (3, 4)  # weight bit widths the kernel unpacks
_BLOCK_M_CHOICES = (16, 32, 64, 128)  # the smallest >= M (tensor-core minimum 16), capped
_BLOCK_N = 128
_BLOCK_N_SMALL_M = 64  # M <= 64: narrower N tiles so that the grid still fills the GPU
_MAX_BLOCK_K = 128  # BLOCK_K = the group (<= this), else this with several tiles per group
_WARPS_BY_BLOCK_M = {16: 4, 32: 4, 64: 4, 128: 8}
_NUM_STAGES = 3
_GROUP_M = 8  # programs along M sharing an N band (L2 reuse of the weight tiles)
_MIN_DOT = 16  # every tl.dot dimension
_MIN_DOT_K_INT8 = 32  # int8 MMA consumes K in steps of 32
_QUANT_BLOCK = 1024  # quantize_per_token: channels per step of its row loops
_QUANT_WARPS = 4


@dataclass(frozen=True)
class Int8GemmPlan:
    """One launch: output tile, K step (``tiles_per_group`` steps per scale group), warps."""

    block_m: int
    block_n: int
    block_k: int
    tiles_per_group: int
    num_warps: int
    num_stages: int
    group_m: int = _GROUP_M


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def plan_int8_gemm(m: int, n: int, k: int, group_size: int, **override) -> Int8GemmPlan:
    """The launch for an ``[m, k] x [k, n]`` product with weight groups of ``group_size``
    (``-1``: per output channel). ``override`` pins fields (``block_n=...``); the result is
    checked against the tensor-core and group constraints, so a bad override is a clear error."""
    group = k if group_size == -1 else group_size
    block_m = next((b for b in _BLOCK_M_CHOICES if b >= m), _BLOCK_M_CHOICES[-1])
    if group_size == -1:  # one group: any K step dividing K
        block_k = next(b for b in (_MAX_BLOCK_K, 64, 32) if k % b == 0)
    else:
        block_k = min(group, _MAX_BLOCK_K)
        while group % block_k:
            block_k //= 2
    base = dict(block_m=block_m, block_n=_BLOCK_N if m > 64 else _BLOCK_N_SMALL_M, block_k=block_k,
                num_warps=None, num_stages=_NUM_STAGES, group_m=_GROUP_M)
    unknown = override.keys() - base.keys()
    if unknown:
        raise TypeError(f"unknown plan fields {sorted(unknown)}")
    base.update(override)
    if base["num_warps"] is None:
        base["num_warps"] = _WARPS_BY_BLOCK_M.get(base["block_m"], 8)
    bm, bn, bk = base["block_m"], base["block_n"], base["block_k"]
    if not (_is_pow2(bm) and _is_pow2(bn) and bm >= _MIN_DOT and bn >= _MIN_DOT):
        raise ValueError(f"block_m and block_n must be powers of two >= {_MIN_DOT}, got {bm}, {bn}")
    if not (_is_pow2(bk) and bk >= _MIN_DOT_K_INT8):
        raise ValueError(f"block_k must be a power of two >= {_MIN_DOT_K_INT8} (int8 MMA K), got {bk}")
    if group % bk:
        raise ValueError(f"block_k = {bk} must divide the weight group ({group} channels)")
    tiles_per_group = 1 if group_size == -1 else group // bk
    return Int8GemmPlan(bm, bn, bk, tiles_per_group, base["num_warps"], base["num_stages"], base["group_m"])


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _int8_gemm_kernel_source(
    a_ptr, as_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_am, stride_om,
    BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,  # one scale (and zero) per output channel: scale after the K loop
    SYMMETRIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILES_PER_GROUP: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile; see the module docstring for the arithmetic.

    Core builtins only (tl.join / tl.reshape / tl.permute / tl.trans, no
    triton.language.standard @jit helpers such as tl.cdiv): the source is built compiled or
    interpreted at call time (see ``_kernel``).
    """
    NBLK: tl.constexpr = BLOCK_K // 32  # packing blocks per K step
    FMASK: tl.constexpr = (1 << BITS) - 1
    # each field's top bit in every nibble (0x44444444, 0x88888888) as an int32 bit pattern
    FLIP: tl.constexpr = ((0x88888888 >> (4 - BITS)) ^ (1 << 31)) - (1 << 31)

    # Grouped launch order: GROUP_M M tiles walk one band of N tiles together (L2 reuse).
    pid = tl.program_id(0)
    m_tiles = (M + BLOCK_M - 1) // BLOCK_M
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    in_group = GROUP_M * n_tiles
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, NBLK)
    offs_r = tl.arange(0, 4 * NBLK)  # 4-bit word rows of a K step
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    iacc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    if not SYMMETRIC and PER_CHANNEL:
        z_g = tl.load(z_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)
    n_steps = K // (BLOCK_K * TILES_PER_GROUP)
    for step in range(0, n_steps):
        if not PER_CHANNEL:
            iacc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
            if not SYMMETRIC:
                z_g = tl.load(z_ptr + step * N + offs_n, mask=n_mask, other=0).to(tl.int32)
        for t in tl.static_range(TILES_PER_GROUP):
            k0 = (step * TILES_PER_GROUP + t) * BLOCK_K
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0)
            # The weight tile is built transposed, [BLOCK_N, BLOCK_K] with K the fastest dim and
            # each thread's K values in its registers (tl.join stacks in registers), so that it
            # goes to shared memory in K-major rows (what int8 MMA reads) with wide stores.
            if BITS == 4:
                x = tl.load(qw_ptr + offs_n[:, None] + (k0 // 8 + offs_r)[None, :] * N,
                            mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K / 8]: 8w + j
            else:
                p_ptrs = qw_ptr + offs_n[:, None] + ((k0 // 32 + offs_b) * 3)[None, :] * N
                p0 = tl.load(p_ptrs, mask=n_mask[:, None], other=0)  # [BLOCK_N, NBLK] bit planes
                p1 = tl.load(p_ptrs + N, mask=n_mask[:, None], other=0)
                p2 = tl.load(p_ptrs + 2 * N, mask=n_mask[:, None], other=0)
                # nibble word r: lane 4i + r at bits 4i + p (arithmetic >> is safe: the sign
                # fill lands outside each plane's mask)
                n0 = (p0 & 0x11111111) | ((p1 << 1) & 0x22222222) | ((p2 << 2) & 0x44444444)
                n1 = ((p0 >> 1) & 0x11111111) | (p1 & 0x22222222) | ((p2 << 1) & 0x44444444)
                n2 = ((p0 >> 2) & 0x11111111) | ((p1 >> 1) & 0x22222222) | (p2 & 0x44444444)
                n3 = ((p0 >> 3) & 0x11111111) | ((p1 >> 2) & 0x22222222) | ((p2 >> 1) & 0x44444444)
                x = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [BLOCK_N, NBLK, 2, 2]: r = 2a + b
            if not SYMMETRIC:  # the group's zero points, broadcast over x's minor dims
                if BITS == 4:
                    zb = z_g[:, None]
                else:
                    zb = z_g[:, None, None, None]
            if SYMMETRIC:  # c - 2**(b-1): flip the field's top bit, sign-extend the field
                x = x ^ FLIP
                f0 = (x << (32 - BITS)) >> (32 - BITS)
                f1 = (x << (28 - BITS)) >> (32 - BITS)
                f2 = (x << (24 - BITS)) >> (32 - BITS)
                f3 = (x << (20 - BITS)) >> (32 - BITS)
                f4 = (x << (16 - BITS)) >> (32 - BITS)
                f5 = (x << (12 - BITS)) >> (32 - BITS)
                f6 = (x << (8 - BITS)) >> (32 - BITS)
                f7 = (x << (4 - BITS)) >> (32 - BITS)
            else:  # c - z, in [-15, 15]
                f0 = (x & FMASK) - zb
                f1 = ((x >> 4) & FMASK) - zb
                f2 = ((x >> 8) & FMASK) - zb
                f3 = ((x >> 12) & FMASK) - zb
                f4 = ((x >> 16) & FMASK) - zb
                f5 = ((x >> 20) & FMASK) - zb
                f6 = ((x >> 24) & FMASK) - zb
                f7 = ((x >> 28) & FMASK) - zb
            # fields as three new minor dims (c2, c1, c0), field 4 c2 + 2 c1 + c0
            f = tl.join(tl.join(tl.join(f0, f4), tl.join(f2, f6)), tl.join(tl.join(f1, f5), tl.join(f3, f7)))
            if BITS == 4:
                wt = tl.reshape(f, (BLOCK_N, BLOCK_K))  # K = 8 * row + field: channel order
            else:  # [N, block, r, field] -> [N, block, field, r]: K = 32 b + 4 i + r = channel
                wt = tl.reshape(tl.permute(tl.reshape(f, (BLOCK_N, NBLK, 4, 8)), (0, 1, 3, 2)),
                                (BLOCK_N, BLOCK_K))
            w = tl.trans(wt.to(tl.int8))  # [BLOCK_K, BLOCK_N]
            iacc = tl.dot(a, w, iacc)
        if not PER_CHANNEL:
            s_g = tl.load(s_ptr + step * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += iacc.to(tl.float32) * s_g[None, :]
    if PER_CHANNEL:
        s_g = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = iacc.to(tl.float32) * s_g[None, :]

    a_s = tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)
    res = acc * a_s[:, None]
    if HAS_BIAS:
        res += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _quantize_per_token_kernel_source(
    x_ptr, codes_ptr, scale_ptr, N, x_row_stride, c_row_stride, clip, qmax,
    BLOCK: tl.constexpr,
    NATIVE_RINT: tl.constexpr,  # GPU: cvt.rni (libdevice); interpreter: the 1.5 * 2**23 trick
):
    """One token row: absmax pass, then codes ``clamp(rint(x / s))`` with IEEE division, in the
    float32 operations of ``quantize_per_token_reference`` (bit for bit)."""
    TINY: tl.constexpr = 1.1754943508222875e-38
    MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2**23
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    c_row = codes_ptr + row * c_row_stride
    offs = tl.arange(0, BLOCK)
    amax = tl.full((BLOCK,), 0.0, tl.float32)
    for c0 in range(0, N, BLOCK):
        x = tl.load(x_row + c0 + offs, mask=c0 + offs < N, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax_row = tl.reduce(amax, 0, tl.standard._elementwise_max)
    s = tl.maximum(tl.math.div_rn(clip * amax_row, qmax), TINY)
    for c0 in range(0, N, BLOCK):
        mask = c0 + offs < N
        x = tl.load(x_row + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.math.div_rn(x, tl.full((BLOCK,), 1.0, tl.float32) * s)
        q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
        if NATIVE_RINT:
            qi = libdevice.float2int_rn(q)
        else:
            qi = ((q + MAGIC) - MAGIC).to(tl.int32)
        tl.store(c_row + c0 + offs, qi.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, s)


@functools.lru_cache(maxsize=4)
def _kernel(source_name: str, interpret: bool):
    """The kernel, compiled (JITFunction) or interpreted (InterpretedFunction), chosen per call
    from TRITON_INTERPRET (``triton.jit`` would fix the choice at import; see ``fwht._kernel``)."""
    source = globals()[source_name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(source)
    return triton.runtime.JITFunction(source)


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------


def _check_args(a_codes, a_scales, qweight, w_scales, w_zeros, bias, bits, group_size) -> tuple[int, int, int]:
    """(M, K, N) after checking every tensor; errors name the tensor and the expected shape."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"weight bits must be an integer in [1, 8], got {bits!r}")
    if a_codes.dtype != torch.int8 or a_codes.dim() != 2:
        raise ValueError(f"a_codes must be int8 [M, K], got {a_codes.dtype} {tuple(a_codes.shape)}")
    m, k = a_codes.shape
    if a_scales.dtype != torch.float32 or tuple(a_scales.shape) != (m,):
        raise ValueError(f"a_scales must be float32 [M] = [{m}], got {a_scales.dtype} {tuple(a_scales.shape)}")
    n, _ = check_packed_weight(k, qweight, w_scales, w_zeros, bits, group_size, names=("w_scales", "w_zeros"))
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")
    return m, k, n


def int8_gemm_reference(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    w_zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``(a_codes * a_scales[:, None]) @ W.T (+ bias)`` with ``W`` dequantized as
    ``hq_vllm.format.unpack_linear`` does, computed in float32 (float64 when ``out_dtype`` is
    float64), rounded once to ``out_dtype``. ``a_codes`` int8 ``[M, K]``, ``a_scales`` float32
    ``[M]``; result ``[M, N]``."""
    _, k, _ = _check_args(a_codes, a_scales, qweight, w_scales, w_zeros, bias, bits, group_size)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    w_t = dequantize_packed_reference(qweight, w_scales, w_zeros, bits, group_size, k, torch.float32)
    a = a_codes.to(compute) * a_scales.to(compute)[:, None]
    y = a @ w_t.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype)


def int8_gemm(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    w_zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_dtype: torch.dtype = torch.bfloat16,
    plan: Int8GemmPlan | None = None,
) -> torch.Tensor:
    """:func:`int8_gemm_reference` on the tensor cores, reading the packed weight directly.

    Runs the Triton kernel for 3- and 4-bit weights with the tensors on CUDA (or anywhere with
    TRITON_INTERPRET=1) and ``out_dtype`` bf16/fp16/fp32; other bit widths and plain CPU tensors
    take the reference. ``plan`` pins a launch (:func:`plan_int8_gemm`).
    """
    m, k, n = _check_args(a_codes, a_scales, qweight, w_scales, w_zeros, bias, bits, group_size)
    interpret = _interpret_requested()
    if (bits not in INT8_GEMM_BITS or out_dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or not (a_codes.is_cuda or interpret)):
        return int8_gemm_reference(a_codes, a_scales, qweight, w_scales, w_zeros, bias, bits, group_size,
                                   out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=a_codes.device)
    if m == 0 or n == 0:
        return out
    if plan is None:
        plan = plan_int8_gemm(m, n, k, group_size)
    else:  # re-check a pinned plan against this shape
        plan = plan_int8_gemm(m, n, k, group_size, **{f: getattr(plan, f) for f in (
            "block_m", "block_n", "block_k", "num_warps", "num_stages", "group_m")})
    if a_codes.stride(-1) != 1:
        a_codes = a_codes.contiguous()
    qweight, w_scales, a_scales = qweight.contiguous(), w_scales.contiguous(), a_scales.contiguous()
    w_zeros = None if w_zeros is None else w_zeros.contiguous()
    grid = (triton.cdiv(m, plan.block_m) * triton.cdiv(n, plan.block_n),)
    _kernel("_int8_gemm_kernel_source", interpret)[grid](
        a_codes, a_scales, qweight, w_scales, w_scales if w_zeros is None else w_zeros,
        out if bias is None else bias, out,
        m, n, k, a_codes.stride(0), out.stride(0),
        BITS=bits, PER_CHANNEL=group_size == -1 or group_size == k, SYMMETRIC=w_zeros is None,
        HAS_BIAS=bias is not None, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        TILES_PER_GROUP=plan.tiles_per_group, GROUP_M=plan.group_m,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out


def quantize_per_token(x: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token quantization of ``x [..., N]`` (no rotation): int8 codes
    ``[..., N]`` and float32 scales ``[...]``, bit for bit
    ``hadamard_quant.quantize_per_token_reference`` (which runs for CPU tensors without the
    interpreter and for dtypes other than bf16/fp16/fp32)."""
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"activation bits must be one of {QUANT_BITS} for int8 codes, got {bits!r}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must lie in (0, 1], got {clip!r}")
    interpret = _interpret_requested()
    n = x.shape[-1]
    if (x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (x.is_cuda or interpret)
            or x.numel() == 0):
        return quantize_per_token_reference(x, bits, clip)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    t = rows.shape[0]
    codes = torch.empty((t, n), dtype=torch.int8, device=x.device)
    scales = torch.empty((t,), dtype=torch.float32, device=x.device)
    block = min(_QUANT_BLOCK, triton.next_power_of_2(n))
    _kernel("_quantize_per_token_kernel_source", interpret)[(t,)](
        rows, codes, scales, n, rows.stride(0), codes.stride(0), float(clip), float(2 ** (bits - 1) - 1),
        BLOCK=block, NATIVE_RINT=not interpret, num_warps=_QUANT_WARPS,
    )
    return codes.reshape(x.shape), scales.reshape(x.shape[:-1])


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for_gpu(bits: int, symmetric: bool, per_channel: bool, plan: Int8GemmPlan,
                    out_dtype: torch.dtype = torch.bfloat16, has_bias: bool = True, arch: int = 90):
    """Compile the GEMM for ``sm_<arch>`` without a GPU (Triton's bundled ptxas), with the
    alignment the JIT assumes for 16-byte-aligned tensors and strides: Triton's compiled kernel
    (``asm["ptx"]``, ``metadata.shared``; ``n_regs`` / ``n_spills`` after ``_init_handles()`` on
    a GPU). For checking on a CPU machine that the GPU build (tensor-core dot, reshapes) works."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(BITS=bits, PER_CHANNEL=per_channel, SYMMETRIC=symmetric, HAS_BIAS=has_bias,
                      BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                      TILES_PER_GROUP=plan.tiles_per_group, GROUP_M=plan.group_m)
    out_ty = _TRITON_TYPES[out_dtype]
    sig = {"a_ptr": "*i8", "as_ptr": "*fp32", "qw_ptr": "*i32", "s_ptr": "*fp16",
           "z_ptr": "*fp16" if symmetric else "*u8", "bias_ptr": f"*{out_ty}", "out_ptr": f"*{out_ty}",
           "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_om": "i32"}
    names = list(sig) + list(constexprs)
    sig.update({k: "constexpr" for k in constexprs})
    aligned = ("a_ptr", "as_ptr", "qw_ptr", "s_ptr", "z_ptr", "bias_ptr", "out_ptr", "N", "K",
               "stride_am", "stride_om")
    src = ASTSource(
        _kernel("_int8_gemm_kernel_source", False), sig,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile / CUDA graphs
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hadaquant::int8_gemm", mutates_args=())
def int8_gemm_op(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    w_zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`int8_gemm` as ``torch.ops.hadaquant.int8_gemm``."""
    return int8_gemm(a_codes, a_scales, qweight, w_scales, w_zeros, bias, bits, group_size, out_dtype)


@int8_gemm_op.register_fake
def _(a_codes, a_scales, qweight, w_scales, w_zeros, bias, bits, group_size, out_dtype):
    return a_codes.new_empty((a_codes.shape[0], qweight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("hadaquant::quantize_per_token", mutates_args=())
def quantize_per_token_op(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_per_token` as ``torch.ops.hadaquant.quantize_per_token``: (codes, scales)."""
    return quantize_per_token(x, bits, clip)


@quantize_per_token_op.register_fake
def _(x, bits, clip):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)
