"""Weight-only dequantizing GEMM for decode: ``y = x @ dequant(qweight, scales, qzeros).T``.

Decode reads every weight once per token, so this GEMM is bound by memory: the packed weights
(3 or 4 bits each), their group scales and the activations are the bytes that matter, and the
kernel reads the checkpoint's layout (``kernels/packing.py``, ``hq_vllm/format.py``) as it is,
with no repacking at load time: ``qweight`` int32 ``[b*K/32, N]`` (blocks of 32 input channels;
bit planes for b = 3, nibbles for b = 4), ``scales`` ``[K/G, N]``, ``qzeros`` uint8 ``[K/G, N]``
or the symmetric zero ``2**(b-1)``; ``w[n, k] = (c - z) * s``.

Two implementations with the same signature:

* ``dequant_gemm_reference``: plain torch. Unpacks the codes (``packing.unpack_codes``),
  dequantizes in float32 with the operations of ``hq_vllm.format.unpack_linear`` (so its weight is
  that one bit for bit) and multiplies in float32. The definition of the result, and the CPU path.
* ``dequant_gemm``: Triton, one launch (split-K included) for M <= 16; for larger M one Triton
  pass dequantizes into a transient 16-bit ``W.T`` and torch.matmul multiplies (see below).
  Supports bits 3 and 4, symmetric and asymmetric, any group size that is a multiple of 32, or
  -1 (per output channel); other bit widths (2, 5-8), float64 and plain CPU tensors fall back to
  the reference.

Why the kernel is shaped the way it is: at 4.3 TB/s an H200 SM must retire ~44 three-bit weights
per clock, i.e. ~3 instructions per weight including the multiply-add, so codes are never
unpacked one by one:

1. **Nibble words.** The 32 codes of a block come as 4 words of 8 fields each, field ``i`` at bit
   ``4i + d`` (d in {0, 1}). For b = 4 these are the packed words themselves. For b = 3 each is
   built from the three bit planes with 2 bit-selects (LOP3) after 4 shared shifts (P1 << 1,
   P2 << 2, P0 >> 2, P1 >> 1): word ``r`` holds lanes ``r, r+4, ..., r+28`` (bits a field does
   not use hold garbage, which the field mask drops). 12 instructions for 32 weights.
2. **Magic floats.** ``bitcast((field at bits t..t+b-1) | 0x3F800000) = 1 + c * 2**(t-23)``: one
   mask-and-or turns a field into a float with no int-to-float conversion.
   *GEMV* (M = 1, CUDA-core FMAs): a field may sit anywhere in ``[t_lo, 23 - b]`` (8 positions),
   so one shift serves two fields; the activation is pre-scaled by ``2**(23 - b - t)`` instead
   (exact), and per 32-channel block ``sum_j x_j f_j = X' + 2**-b * sum_j x_j c_j`` with
   ``X' = sum_j x'_j``, recovered with the group scale once per block and column:
   ``s * (2**b * (S - X') - z * X)``. Per weight: ~3/8 shift + 1 LOP3 + 1 FFMA.
   *Dot* (2 <= M <= 16, tensor cores): every field goes to bits 16.. (``1 + c/128``) and is
   scaled in place with one FFMA, ``fma(1 + c/128, 128 s, -(128 + z) s) = (c - z) s`` exactly in
   float32, then rounded to the activation dtype; one dot per field over the tile's BLOCK_K/32
   blocks (dot K = 16 at BLOCK_K = 512), the activations gathered at that field's lane. With
   per-channel scales the unscaled ``1 + c/128`` (exact in bf16/fp16) is multiplied and
   ``s * (128 * D - (128 + z) * X)`` applied once at the end.
   Accumulation is float32 everywhere. The GEMV's pre-scaling (by at most 2**7) costs ~2**-14
   relative accuracy in float32 accumulation (~3e-5 measured with float32 activations), far below
   a bf16 output's rounding.
3. **Split-K** for small M: N / BLOCK_N programs alone would leave most SMs idle at decode, so K
   is split until the grid fills the GPU. Each program writes its float32 partial tile; the last
   program of a tile to arrive (an atomic ticket per tile) adds all partials *in split order*,
   so the result is deterministic (independent of arrival order), and resets the ticket for the
   next launch. One launch, no memset, no host synchronisation: safe in CUDA graphs. The tickets
   live in one cached int32 buffer per device, so two split-K launches must not run concurrently
   on different streams (vLLM runs the model on one stream).

4. **Large M** (prefill, batches > 16): the dot path re-gathers the activations for every N tile,
   so its cost grows with M (measured: 0.6x of bf16 cuBLAS at M = 16, 0.15x at M = 64). There
   ``dequantize_packed`` writes ``W.T`` once (0.375 + 2 bytes per weight) and cuBLAS multiplies:
   memory at rest stays packed; the int8 prefill GEMM is to replace this.

5. **The GEMV launch** (``_gemv_kernel_source``, M <= ``_GEMV_MAX_M``; redesigned after the
   2026-12-01 H200 run, which reached 14-35% of HBM with one-warp programs, 4-8 per SM, and a
   last-arriver that summed up to 74 partials one dependent load at a time). A program is
   BLOCK_N columns x its K split, ``num_warps`` warps; the tile is ``[BLOCK_N/128, BLOCK_K/32,
   128]`` (column groups, 32-channel blocks, columns), which Triton lays out as 8 consecutive
   columns of one block per thread (two LDG.E.128 per bit plane) with the warps over column
   groups and blocks, so a program streams ``BLOCK_N * BLOCK_K * b / 8`` bytes per tile from
   all its warps at once, and the next tile's loads are issued before the current tile's
   arithmetic (register prefetch). The blocks are summed across warps once, after the K loop.
   Split-K is sized by *resident warps*: splits are added until the grid holds
   ``_GEMV_WARPS_PER_SM`` warps per SM (none where N alone fills the GPU), never fewer than
   ``_GEMV_MIN_TILES`` tiles per split. The last program of a column tile sums the float32
   partials ``_GEMV_RED_ROWS`` splits per step with one 2-D load (all in flight together), in
   a fixed order: deterministic, no atomics on data, no memset, graph-safe (tickets as in 3).
   M > 1 (up to ``_GEMV_MAX_M``) runs one program row per activation row (W is re-read, mostly
   from L2, and every row costs its own FMAs; the sweep decides whether it beats the dot path).
   The W3 nibble words use inline-PTX bit-selects on the GPU (one LOP3 each; LLVM compiles the
   and/or form the interpreter runs into three per word).
   Static cost (sm_90 SASS, Triton 3.9, ``benchmarks/gemm_bench.py --sass``), W3 symmetric
   group 128, bf16 x, per weight in the K loop: 256 x 256 x 8 warps (default): 80 registers,
   no spills, 3.49 instructions (LOP3 1.25, FFMA 1.19, shifts ~0.5, activation load + convert
   0.25, 16-byte weight loads 0.02), 24 warps/SM by registers; 512 x 128 x 4: 168 registers,
   3.31 (the activation work shared by 16 columns), 12 warps/SM. W4: 3.2 / 3.0. The
   2026-12-01 256 x 32 one-warp program: 96 registers, 3.62, launched at 8 warps/SM.
   **What the GPU sweep decides** (``benchmarks/gemm_bench.py --sweep``; every value is read
   at import from ``HQ_GEMM_GEMV_<NAME>``, no code edit needed): BLOCK_N / BLOCK_K / WARPS (the
   tile: 8 vs 16 columns per thread, blocks per warp), WARPS_PER_SM (split-K depth against
   bytes in flight and reduction cost), MIN_TILES, MAX_REGISTERS (the 16-column tile capped at
   128 registers for 16 warps/SM), ASM_BITSEL (inline-PTX vs plain unpack), RED_ROWS, STAGES
   (Triton num_stages), and MAX_M (GEMV vs dot for M = 2..8). Expected from the static count: ~3.5 instructions per
   weight is about what the H200's issue rate allows at 85% of HBM (~3.7 at 100% issue), so
   the target needs near-perfect latency hiding; the 16-column tile is the lever on issue.

Measured (H200, docs/BENCHMARKS.md, before the GEMV redesign): 14-35% of HBM bandwidth for W3
at M = 1, 17-42% for W4 (1.4-1.9x cuBLAS bf16 on the large projections). Not yet timed on the
GPU: the redesigned GEMV and the large-M path.

Dispatch: the Triton kernel runs when ``x`` is on CUDA or when ``TRITON_INTERPRET=1`` is set
(read at call time, as in ``fwht.py``); otherwise the reference runs. Tile sizes, warps and the
split heuristic are the tunables below, all in one place; ``benchmarks/gemm_bench.py`` measures
them against the device's copy bandwidth.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .packing import unpack_codes

__all__ = [
    "KERNEL_BITS",
    "GemmPlan",
    "compile_for_gpu",
    "dequant_gemm",
    "dequant_gemm_op",
    "dequant_gemm_reference",
    "dequantize_packed",
    "dequantize_packed_reference",
    "plan_dequant_gemm",
]

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place (see benchmarks/gemm_bench.py for how they were chosen).
# ---------------------------------------------------------------------------------------------
KERNEL_BITS = (3, 4)  # bit widths the kernel implements; others fall back to the reference


def _env_int(name: str, default: int) -> int:
    """A tunable's default, replaceable without code edits by ``HQ_GEMM_<NAME>`` (read at import)."""
    value = os.environ.get(f"HQ_GEMM_{name}")
    return default if value is None or not value.strip() else int(value)


#: M up to this runs the CUDA-core GEMV (one program row per activation row: each extra row
#: re-reads W, mostly from L2, and costs a full row of FMAs); larger M the tensor-core dot.
_GEMV_MAX_M = _env_int("GEMV_MAX_M", 1)
#: M from this up dequantizes the weight into a transient 16-bit ``[K, N]`` (one Triton pass) and
#: multiplies with torch.matmul: the dot path gathers activations per N tile, which grows with
#: M (measured on H200: 0.6x bf16 at M = 16, 0.15x at M = 64; see docs/BENCHMARKS.md).
_DEQUANT_MIN_M = 17
#: GEMV (M <= _GEMV_MAX_M) launch, see ``_gemv_kernel_source`` and the module docstring:
#: BLOCK_N columns x BLOCK_K channels per tile, WARPS warps per program. Triton lays the
#: [BLOCK_N / 128, BLOCK_K / 32, 128] tile out as 8 consecutive columns per thread (two 16-byte
#: loads per bit plane), 2 x 16 threads per warp over (blocks, columns), warps over column
#: groups and blocks: a thread does BLOCK_N * BLOCK_K / (32 * 32 * WARPS) column-blocks per tile
#: (8 at the default 256 x 256 x 8 warps; 16 at 512 x 128 x 4: fewer activation instructions
#: per weight, 168 instead of 80 registers). Split-K fills the GPU: splits are added until the grid holds
#: WARPS_PER_SM resident warps per SM (bytes in flight: ~3 KB per warp per tile, plus one tile
#: of prefetch), keeping at least MIN_TILES tiles per split; none where N alone fills it.
#: All are set from HQ_GEMM_GEMV_* at import (the GPU sweep, benchmarks/gemm_bench.py --sweep,
#: decides them).
_GEMV_BLOCK_N = _env_int("GEMV_BLOCK_N", 256)
_GEMV_BLOCK_K = _env_int("GEMV_BLOCK_K", 256)
_GEMV_WARPS = _env_int("GEMV_WARPS", 8)
_GEMV_WARPS_PER_SM = _env_int("GEMV_WARPS_PER_SM", 24)
_GEMV_MIN_TILES = _env_int("GEMV_MIN_TILES", 1)  # fewer tiles: more splits, shorter loops
_GEMV_STAGES = _env_int("GEMV_STAGES", 0) or None  # Triton num_stages for the GEMV (0: default)
#: ptxas register cap for the GEMV (0: none). 512 x 128 x 4 warps needs 168 registers (12 warps
#: per SM); capped at 128 it spills 72 bytes (18 local loads per tile, 3.38 instead of 3.31
#: instructions per weight) for 16 warps per SM. The sweep times that pair.
_GEMV_MAX_REGISTERS = _env_int("GEMV_MAX_REGISTERS", 0) or None
#: Split-K partials the last program of a column tile sums per step (one 2-D load of
#: RED_ROWS x BLOCK_N floats, all in flight together; deterministic order).
_GEMV_RED_ROWS = _env_int("GEMV_RED_ROWS", 16)
#: W3 nibble words by inline-PTX LOP3 bit-selects on the GPU (8 instead of 12 LOP3 per 32
#: weights in the SASS); 0 uses the plain and/or form the interpreter tests.
_GEMV_ASM_BITSEL = bool(_env_int("GEMV_ASM_BITSEL", 1))
#: Dot tile for M >= 2 (BLOCK_M rows padded to at least 16, the tensor-core minimum).
_DOT_BLOCK_M_CHOICES = (16, 32, 64)
_DOT_BLOCK_N = 128
_DOT_BLOCK_K = 512  # dot K = BLOCK_K / 32 blocks must be >= 16
_DOT_WARPS = 4
_NUM_STAGES: int | None = None  # None: Triton's default
#: Split-K (dot path): split until the grid has this many programs per SM.
_PROGRAMS_PER_SM = 4
#: Dequantize-only launches: BLOCK_N columns x BLOCK_K channels per program.
_DEQUANT_BLOCK_N = 128
_DEQUANT_BLOCK_K = 128
_INTERPRET_SM_COUNT = 4  # the interpreter has no SMs; small, so tests exercise split-K
_TICKETS_MIN = 1 << 14  # initial size of the per-device ticket buffer (int32)

_PACK_BLOCK = 32
#: Bits of float32 1.0, passed as a kernel argument rather than a constant: a mask-and-or with
#: two immediates does not fit one LOP3, and ptxas then re-materializes the mask before every
#: use (an extra instruction per weight); from a register the magic costs nothing.
_MAGIC_ONE = 0x3F800000
# Bit-select masks (bits 4i, 4i+1, 4i+2 of every nibble) and their complements.
_M0, _M1, _M2 = tl.constexpr(0x11111111), tl.constexpr(0x22222222), tl.constexpr(0x44444444)
_N0, _N1, _N2 = tl.constexpr(0xEEEEEEEE), tl.constexpr(0xDDDDDDDD), tl.constexpr(0xBBBBBBBB)


@dataclass(frozen=True)
class GemmPlan:
    """One launch: tile sizes, warps, and the K split (``tiles_per_split`` BLOCK_K tiles each)."""

    use_dot: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    split_k: int
    tiles_per_split: int
    num_stages: int | None = None
    max_registers: int | None = None  # GEMV: ptxas register cap (maxnreg), None = no cap


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def plan_dequant_gemm(m: int, n: int, k: int, device: torch.device, **override) -> GemmPlan:
    """The launch the heuristic picks for an ``[m, k] x [k, n]`` product on ``device``.

    ``override`` replaces fields (``block_n=...``, ``split_k=...``); ``split_k`` is then rounded so
    that no split is empty. Used by the tests and the benchmark to pin or sweep configurations.
    """
    use_dot = override.pop("use_dot", m > _GEMV_MAX_M)
    if use_dot:
        block_m = next((b for b in _DOT_BLOCK_M_CHOICES if b >= m), _DOT_BLOCK_M_CHOICES[-1])
        base = dict(block_m=block_m, block_n=_DOT_BLOCK_N, block_k=_DOT_BLOCK_K, num_warps=_DOT_WARPS)
    else:
        base = dict(block_m=1, block_n=_GEMV_BLOCK_N, block_k=_GEMV_BLOCK_K, num_warps=_GEMV_WARPS)
    split = override.pop("split_k", None)
    base.update({key: override.pop(key) for key in list(override) if key in base})
    if override.keys() - {"num_stages", "max_registers"}:
        raise TypeError(f"unknown plan fields {sorted(override)}")
    bk, bn = base["block_k"], base["block_n"]
    if bk < _PACK_BLOCK or bk & (bk - 1):
        raise ValueError(f"block_k must be a power of two >= 32, got {bk}")
    if use_dot and bk < 32 * 16:
        raise ValueError(f"the dot path needs block_k >= 512 (dot K = block_k / 32 >= 16), got {bk}")
    if not use_dot and (bn < 16 or bn & (bn - 1)):
        raise ValueError(f"the GEMV needs block_n a power of two >= 16, got {bn}")
    k_tiles = -(-k // bk)
    tiles = -(-m // base["block_m"]) * -(-n // bn)
    if split is None:
        sms = _INTERPRET_SM_COUNT if device.type != "cuda" else _sm_count(device.index or 0)
        if use_dot:
            split = max(1, min(k_tiles, -(-_PROGRAMS_PER_SM * sms // tiles)))
        else:  # enough resident warps per SM, but no split shorter than _GEMV_MIN_TILES tiles
            # (rounded down: a grid past what is resident runs a second, mostly idle wave)
            want = max(1, _GEMV_WARPS_PER_SM * sms // (tiles * base["num_warps"]))
            split = -(-k_tiles // max(_GEMV_MIN_TILES, -(-k_tiles // want)))
    split = max(1, min(int(split), k_tiles))
    tiles_per_split = -(-k_tiles // split)
    split = -(-k_tiles // tiles_per_split)  # no empty split
    stages = override.get("num_stages", _NUM_STAGES if use_dot else _GEMV_STAGES)
    max_registers = override.get("max_registers", None if use_dot else _GEMV_MAX_REGISTERS)
    return GemmPlan(use_dot, split_k=split, tiles_per_split=tiles_per_split, num_stages=stages,
                    max_registers=max_registers, **base)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


def _dequant_gemm_kernel_source(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, tiles_per_split, split_k, magic_one, x_lane_stride,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,  # group size in channels; 0 = one group per output channel
    SYMMETRIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DEQUANT_ONLY: tl.constexpr = False,  # write W^T [K, N] to out_ptr instead (dot path layout)
    X_FIELD_MAJOR: tl.constexpr = False,  # x as [M, 32 lanes, x_lane_stride blocks] (zero-padded)
):
    """One (M tile, N tile, K split) program; see the module docstring for the arithmetic.

    Only core builtins (tl.full, tl.reduce with the standard sum combiner), no
    triton.language.standard @jit helpers: they are bound compiled-or-interpreted at
    ``import triton``, and this source is built both ways at call time (see ``_kernel``).
    """
    BK32: tl.constexpr = BLOCK_K // 32  # 32-channel blocks per tile
    FMASK: tl.constexpr = (1 << BITS) - 1
    HI: tl.constexpr = 23 - BITS  # GEMV: highest field position inside the float32 mantissa
    LO: tl.constexpr = HI - 7  # GEMV: 8 field positions [LO, HI], pre-scale <= 2**7
    ZSYM: tl.constexpr = 1 << (BITS - 1)

    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid_mn // n_tiles
    pid_n = pid_mn % n_tiles
    n_blocks = K // 32

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_b = tl.arange(0, BK32)
    blk_first = pid_k * tiles_per_split * BK32

    # Prologue of the manual prefetch: the words, scales (and zeros) of the first tile.
    blk = blk_first + offs_b
    b_mask = blk < n_blocks
    w_mask = b_mask[:, None] & n_mask[None, :]
    w_ptrs = qw_ptr + (blk * BITS)[:, None] * N + offs_n[None, :]
    q0 = tl.load(w_ptrs, mask=w_mask, other=0)
    q1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
    q2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
    if BITS == 4:
        q3 = tl.load(w_ptrs + 3 * N, mask=w_mask, other=0)
    else:
        q3 = q2
    if GROUP == 0:
        g_rows = blk * 0
    else:
        g_rows = blk * 32 // GROUP
    sz_ptrs = g_rows[:, None] * N + offs_n[None, :]
    sc = tl.load(s_ptr + sz_ptrs, mask=w_mask, other=0.0)
    if SYMMETRIC:
        zc = sc
    else:
        zc = tl.load(z_ptr + sz_ptrs, mask=w_mask, other=0)

    if USE_DOT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        x_part = tl.full((BLOCK_M, BK32), 0.0, tl.float32)  # per-channel scales: sums of x
        x_rows = x_ptr + offs_m[:, None] * stride_xm
    else:
        acc = tl.full((BK32, BLOCK_N), 0.0, tl.float32)
        x_row = x_ptr + pid_m * stride_xm

    for t in range(0, tiles_per_split):
        # Current tile's data; issue the next tile's loads before computing on it.
        p0 = q0.to(tl.uint32, bitcast=True)
        p1 = q1.to(tl.uint32, bitcast=True)
        p2 = q2.to(tl.uint32, bitcast=True)
        p3 = q3.to(tl.uint32, bitcast=True)
        s_cur = sc.to(tl.float32)
        if SYMMETRIC:
            z_cur = ZSYM
        else:
            z_cur = zc.to(tl.float32)
        cur_blk = blk
        cur_b_mask = b_mask

        blk = blk + BK32
        b_mask = blk < tl.where(t + 1 < tiles_per_split, n_blocks, 0)
        w_mask = b_mask[:, None] & n_mask[None, :]
        w_ptrs = qw_ptr + (blk * BITS)[:, None] * N + offs_n[None, :]
        q0 = tl.load(w_ptrs, mask=w_mask, other=0)
        q1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
        q2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
        if BITS == 4:
            q3 = tl.load(w_ptrs + 3 * N, mask=w_mask, other=0)
        else:
            q3 = q2
        if GROUP == 0:
            g_rows = blk * 0
        else:
            g_rows = blk * 32 // GROUP
        sz_ptrs = g_rows[:, None] * N + offs_n[None, :]
        sc = tl.load(s_ptr + sz_ptrs, mask=w_mask, other=0.0)
        if not SYMMETRIC:
            zc = tl.load(z_ptr + sz_ptrs, mask=w_mask, other=0)

        # Nibble words u0..u3: field i of word r at bit 4i + (r % 2) (see module docstring).
        if BITS == 4:
            u0 = p0
            u1 = p1
            u2 = p2
            u3 = p3
        else:
            a = p1 << 1
            b = p2 << 2
            c = p0 >> 2
            d = p1 >> 1
            u0 = (p0 & _M0) | (((a & _M1) | (b & _N1)) & _N0)
            u1 = (p0 & _M1) | (((a & _M2) | (b & _N2)) & _N1)
            u2 = (c & _M0) | (((d & _M1) | (p2 & _N1)) & _N0)
            u3 = (c & _M1) | (((d & _M2) | (p2 & _N2)) & _N1)

        if USE_DOT:
            if GROUP != 0 or DEQUANT_ONLY:  # (c - z) s = fma(1 + c/128, 128 s, -(128 + z) s), exact
                s128 = s_cur * 128.0
                off128 = -(128.0 + z_cur) * s_cur
            # Unmasked, in-bounds activation loads (rows past M are clamped, their results are
            # not stored); a block past the split or K has zero weight, as above.
            if X_FIELD_MAJOR:  # a field's blocks are contiguous; the pad covers the last tile
                x_ptrs = x_rows + cur_blk[None, :] - tl.where(m_mask, 0, offs_m - (M - 1))[:, None] * stride_xm
            else:
                x_ptrs = (x_rows + (tl.minimum(cur_blk, n_blocks - 1) * 32)[None, :]
                          - tl.where(m_mask, 0, offs_m - (M - 1))[:, None] * stride_xm)
            for r in tl.static_range(4):
                if r == 0:
                    u = u0
                elif r == 1:
                    u = u1
                elif r == 2:
                    u = u2
                else:
                    u = u3
                for i in tl.static_range(8):
                    off = 4 * i + (r % 2) * (BITS == 3)
                    if off < 16:
                        v = u << (16 - off)
                    elif off > 16:
                        v = u >> (off - 16)
                    else:
                        v = u
                    f = ((v & (FMASK << 16)) | magic_one).to(tl.float32, bitcast=True)  # 1 + c/128
                    if GROUP != 0 or DEQUANT_ONLY:
                        f = f * s128 + off128
                    if BITS == 3:
                        lane = r + 4 * i
                    else:
                        lane = 8 * r + i
                    if X_FIELD_MAJOR:
                        lane = lane * x_lane_stride
                    if DEQUANT_ONLY:
                        wt_ptrs = out_ptr + (cur_blk * 32 + lane)[:, None] * N + offs_n[None, :]
                        tl.store(wt_ptrs, f.to(out_ptr.dtype.element_ty),
                                 mask=cur_b_mask[:, None] & n_mask[None, :])
                    elif GROUP == 0:  # unscaled f: blocks past the split must read x = 0
                        xr = tl.load(x_ptrs + lane, mask=cur_b_mask[None, :], other=0.0)
                        x_part += xr.to(tl.float32)
                    else:
                        xr = tl.load(x_ptrs + lane)  # [BLOCK_M, BK32]
                    if DEQUANT_ONLY:
                        pass
                    elif DOT_IN_FP32:
                        acc = tl.dot(xr.to(tl.float32), f, acc, input_precision=DOT_PRECISION)
                    else:
                        acc = tl.dot(xr, f.to(xr.dtype), acc, input_precision=DOT_PRECISION)
        else:
            s_acc = tl.full((BK32, BLOCK_N), 0.0, tl.float32)
            xq = tl.full((BK32,), 0.0, tl.float32)  # sym: sum x' (2**b + z 2**(t-HI)); asym: X'
            xs = tl.full((BK32,), 0.0, tl.float32)  # asym: sum x = sum x' 2**(t-HI)
            # Unmasked, in-bounds activation loads: a block past the split or K has zero
            # scales (masked loads above), so its finite x adds nothing.
            x_base = x_row + tl.minimum(cur_blk, n_blocks - 1) * 32
            for r in tl.static_range(4):
                if r == 0:
                    u = u0
                elif r == 1:
                    u = u1
                elif r == 2:
                    u = u2
                else:
                    u = u3
                for i in tl.static_range(8):
                    off = 4 * i + (r % 2) * (BITS == 3)
                    tpos = LO + (off - LO + 64) % 8  # (+64: C and Python % agree)
                    if tpos > off:
                        v = u << (tpos - off)
                    elif tpos < off:
                        v = u >> (off - tpos)
                    else:
                        v = u
                    f = ((v & (FMASK << tpos)) | magic_one).to(tl.float32, bitcast=True)
                    if BITS == 3:
                        lane = r + 4 * i
                    else:
                        lane = 8 * r + i
                    xv = tl.load(x_base + lane)
                    if x_ptr.dtype.element_ty == tl.bfloat16:
                        # x' = x * 2**(HI - t) straight from the bf16 bits: widen to float32 and
                        # add the exponent in one integer multiply-add (exact for normal x; a
                        # zero becomes 2**(HI-t-127), which is nothing next to real values).
                        xp = ((xv.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
                              + ((HI - tpos) << 23)).to(tl.float32, bitcast=True)
                    else:
                        xp = xv.to(tl.float32) * (1 << (HI - tpos))
                    s_acc += xp[:, None] * f
                    if SYMMETRIC:
                        xq += xp * ((1 << BITS) + ZSYM / (1 << (HI - tpos)))
                    else:
                        xq += xp
                        xs += xp * (1.0 / (1 << (HI - tpos)))
            if SYMMETRIC:
                acc += s_cur * (s_acc * (1 << BITS) - xq[:, None])
            else:
                acc += s_cur * ((s_acc - xq[:, None]) * (1 << BITS) - z_cur * xs[:, None])

    if not DEQUANT_ONLY:  # the product's epilogue
        # Epilogue: the program's [BLOCK_M, BLOCK_N] float32 result.
        if USE_DOT:
            if GROUP == 0:
                s_row = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                x_sum = tl.reduce(x_part, 1, tl.standard._sum_combine)
                if SYMMETRIC:
                    corr = (128.0 + ZSYM) * x_sum[:, None]
                else:
                    z_row = tl.load(z_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
                    corr = (128.0 + z_row)[None, :] * x_sum[:, None]
                res = s_row[None, :] * (128.0 * acc - corr)
            else:
                res = acc
        else:
            res = tl.reduce(acc, 0, tl.standard._sum_combine)[None, :]  # [1, BLOCK_N]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        mn_mask = m_mask[:, None] & n_mask[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        if split_k == 1:
            if HAS_BIAS:
                res += bias[None, :]
            tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mn_mask)
        else:
            mn = offs_m[:, None] * N + offs_n[None, :]
            tl.store(part_ptr + pid_k * M * N + mn, res, mask=mn_mask)
            tl.debug_barrier()  # every thread's partial is written before the ticket is taken
            ticket = tl.atomic_add(ticket_ptr + pid_mn, 1, sem="acq_rel")
            if ticket == split_k - 1:  # the last split to arrive adds all, in split order
                total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for s in range(0, split_k):
                    total += tl.load(part_ptr + s * M * N + mn, mask=mn_mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += bias[None, :]
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mn_mask)
                tl.atomic_xchg(ticket_ptr + pid_mn, 0)  # ready for the next launch


def _gemv_kernel_source(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, ticket_ptr,
    M, N, K, stride_xm, stride_om, tiles_per_split, split_k, magic_one,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,  # group size in channels; 0 = one group per output channel
    SYMMETRIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COLW: tl.constexpr,  # columns per column group: 4 per thread x 32 threads (<= 128)
    CG: tl.constexpr,  # column groups per program: BLOCK_N = CG * COLW, 4 * CG columns per thread
    BK32: tl.constexpr,  # 32-channel blocks per tile, spread over the warps (BK32 >= num_warps)
    RED_ROWS: tl.constexpr,  # split-K partials summed per step by the last program of a tile
    ASM_BITSEL: tl.constexpr = False,  # nibble words by inline-PTX bit-selects (compiled only)
):
    """M = 1 GEMV: one (BLOCK_N columns, K split) program; see the module docstring.

    The tile is ``[CG, BK32, COLW]``: Triton gives each thread 4 consecutive columns (one
    16-byte load per bit plane) of every column group, the 32 lanes of a warp 128 consecutive
    columns, and the warps different blocks (K), so the per-channel activation work is shared
    by 4 * CG columns and the warps of a program each stream their own rows; the blocks are
    summed across warps once, after the K loop.
    """
    FMASK: tl.constexpr = (1 << BITS) - 1
    HI: tl.constexpr = 23 - BITS
    LO: tl.constexpr = HI - 7
    ZSYM: tl.constexpr = 1 << (BITS - 1)
    BLOCK_N: tl.constexpr = CG * COLW

    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)  # one activation row per program (M > 1 re-reads W, from L2)
    x_ptr += pid_m * stride_xm
    out_ptr += pid_m * stride_om
    n_blocks = K // 32
    offs_n = (pid_n * BLOCK_N + tl.arange(0, CG)[:, None, None] * COLW
              + tl.arange(0, COLW)[None, None, :])  # [CG, 1, COLW]
    n_mask = offs_n < N
    blk = pid_k * tiles_per_split * BK32 + tl.arange(0, BK32)[None, :, None]  # [1, BK32, 1]
    b_mask = blk < n_blocks
    w_mask = b_mask & n_mask
    w_ptrs = qw_ptr + blk * (BITS * N) + offs_n
    q0 = tl.load(w_ptrs, mask=w_mask, other=0)
    q1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
    q2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
    if BITS == 4:
        q3 = tl.load(w_ptrs + 3 * N, mask=w_mask, other=0)
    else:
        q3 = q2
    if GROUP == 0:
        sz_ptrs = offs_n + blk * 0
    else:
        sz_ptrs = (blk * 32 // GROUP) * N + offs_n
    sc = tl.load(s_ptr + sz_ptrs, mask=w_mask, other=0.0)
    if SYMMETRIC:
        zc = sc
    else:
        zc = tl.load(z_ptr + sz_ptrs, mask=w_mask, other=0)
    acc = tl.full((CG, BK32, COLW), 0.0, tl.float32)

    for t in range(0, tiles_per_split):
        p0 = q0.to(tl.uint32, bitcast=True)
        p1 = q1.to(tl.uint32, bitcast=True)
        p2 = q2.to(tl.uint32, bitcast=True)
        p3 = q3.to(tl.uint32, bitcast=True)
        s_cur = sc.to(tl.float32)
        if SYMMETRIC:
            z_cur = ZSYM
        else:
            z_cur = zc.to(tl.float32)
        cur_blk = blk

        # Next tile's loads, issued before this tile's arithmetic.
        blk = blk + BK32
        b_mask = blk < tl.where(t + 1 < tiles_per_split, n_blocks, 0)
        w_mask = b_mask & n_mask
        w_ptrs = qw_ptr + blk * (BITS * N) + offs_n
        q0 = tl.load(w_ptrs, mask=w_mask, other=0)
        q1 = tl.load(w_ptrs + N, mask=w_mask, other=0)
        q2 = tl.load(w_ptrs + 2 * N, mask=w_mask, other=0)
        if BITS == 4:
            q3 = tl.load(w_ptrs + 3 * N, mask=w_mask, other=0)
        else:
            q3 = q2
        if GROUP == 0:
            sz_ptrs = offs_n + blk * 0
        else:
            sz_ptrs = (blk * 32 // GROUP) * N + offs_n
        sc = tl.load(s_ptr + sz_ptrs, mask=w_mask, other=0.0)
        if not SYMMETRIC:
            zc = tl.load(z_ptr + sz_ptrs, mask=w_mask, other=0)

        if BITS == 4:
            u0 = p0
            u1 = p1
            u2 = p2
            u3 = p3
        else:
            a = p1 << 1
            b = p2 << 2
            c = p0 >> 2
            d = p1 >> 1
            if ASM_BITSEL:  # sel(x, y, m) = (x & m) | (y & ~m) as one LOP3 (LUT 0xE4) each:
                # LLVM turns the and/or form into 3 LOP3 per word (SASS: 12 -> 8 per 32 weights)
                t0 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [a, b, tl.full(a.shape, _M1, tl.uint32)], tl.uint32, True, 1)
                t1 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [a, b, tl.full(a.shape, _M2, tl.uint32)], tl.uint32, True, 1)
                t2 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [d, p2, tl.full(a.shape, _M1, tl.uint32)], tl.uint32, True, 1)
                t3 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [d, p2, tl.full(a.shape, _M2, tl.uint32)], tl.uint32, True, 1)
                u0 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [p0, t0, tl.full(a.shape, _M0, tl.uint32)], tl.uint32, True, 1)
                u1 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [p0, t1, tl.full(a.shape, _M1, tl.uint32)], tl.uint32, True, 1)
                u2 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [c, t2, tl.full(a.shape, _M0, tl.uint32)], tl.uint32, True, 1)
                u3 = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xE4;", "=r,r,r,r",
                                               [c, t3, tl.full(a.shape, _M1, tl.uint32)], tl.uint32, True, 1)
            else:  # the same bits (the interpreter has no inline PTX)
                u0 = (p0 & _M0) | (((a & _M1) | (b & _N1)) & _N0)
                u1 = (p0 & _M1) | (((a & _M2) | (b & _N2)) & _N1)
                u2 = (c & _M0) | (((d & _M1) | (p2 & _N1)) & _N0)
                u3 = (c & _M1) | (((d & _M2) | (p2 & _N2)) & _N1)

        s_acc = tl.full((CG, BK32, COLW), 0.0, tl.float32)
        xq = tl.full((1, BK32, 1), 0.0, tl.float32)
        xs = tl.full((1, BK32, 1), 0.0, tl.float32)
        # In-bounds activation loads: a block past the split or K has zero scales (masked
        # loads), so its finite x adds nothing.
        x_base = x_ptr + tl.minimum(cur_blk, n_blocks - 1) * 32
        for r in tl.static_range(4):
            if r == 0:
                u = u0
            elif r == 1:
                u = u1
            elif r == 2:
                u = u2
            else:
                u = u3
            for i in tl.static_range(8):
                off = 4 * i + (r % 2) * (BITS == 3)
                tpos = LO + (off - LO + 64) % 8
                if tpos > off:
                    v = u << (tpos - off)
                elif tpos < off:
                    v = u >> (off - tpos)
                else:
                    v = u
                f = ((v & (FMASK << tpos)) | magic_one).to(tl.float32, bitcast=True)
                if BITS == 3:
                    lane = r + 4 * i
                else:
                    lane = 8 * r + i
                xv = tl.load(x_base + lane)
                if x_ptr.dtype.element_ty == tl.bfloat16:
                    xp = ((xv.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
                          + ((HI - tpos) << 23)).to(tl.float32, bitcast=True)
                else:
                    xp = xv.to(tl.float32) * (1 << (HI - tpos))
                s_acc += xp * f
                if SYMMETRIC:
                    xq += xp * ((1 << BITS) + ZSYM / (1 << (HI - tpos)))
                else:
                    xq += xp
                    xs += xp * (1.0 / (1 << (HI - tpos)))
        if SYMMETRIC:
            acc += s_cur * (s_acc * (1 << BITS) - xq)
        else:
            acc += s_cur * ((s_acc - xq) * (1 << BITS) - z_cur * xs)

    res = tl.reduce(acc, 1, tl.standard._sum_combine)  # [CG, COLW]: across the warps' blocks
    cols = pid_n * BLOCK_N + tl.arange(0, CG)[:, None] * COLW + tl.arange(0, COLW)[None, :]
    c_mask = cols < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    if split_k == 1:
        if HAS_BIAS:
            res += bias
        tl.store(out_ptr + cols, res.to(out_ptr.dtype.element_ty), mask=c_mask)
    else:
        part_ptr += pid_m * N
        tl.store(part_ptr + pid_k * M * N + cols, res, mask=c_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        tile = pid_m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
        if ticket == split_k - 1:  # the last split to arrive adds all, in split order
            rows = tl.arange(0, RED_ROWS)[:, None, None]
            total = tl.full((CG, COLW), 0.0, tl.float32)
            for s0 in range(0, split_k, RED_ROWS):
                part = tl.load(part_ptr + (s0 + rows) * (M * N) + cols[None, :, :],
                               mask=((s0 + rows) < split_k) & c_mask[None, :, :], other=0.0,
                               cache_modifier=".cg")
                total += tl.reduce(part, 0, tl.standard._sum_combine)
            if HAS_BIAS:
                total += bias
            tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next launch


@functools.lru_cache(maxsize=4)
def _kernel(interpret: bool, gemv: bool = False):
    """The kernel (the dot / dequantize one, or with ``gemv`` the M = 1 GEMV), compiled
    (JITFunction) or interpreted (InterpretedFunction), chosen per call from TRITON_INTERPRET
    (``triton.jit`` would fix the choice at import; see ``fwht._kernel``)."""
    source = _gemv_kernel_source if gemv else _dequant_gemm_kernel_source
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(source)
    return triton.runtime.JITFunction(source)


def _gemv_constexprs(plan: GemmPlan) -> dict:
    """The GEMV kernel's tile constexprs for a plan (``block_n`` columns, ``block_k`` channels)."""
    colw = min(plan.block_n, 128)
    return dict(COLW=colw, CG=plan.block_n // colw, BK32=plan.block_k // _PACK_BLOCK,
                RED_ROWS=min(_GEMV_RED_ROWS, _next_pow2(plan.split_k)))


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for_gpu(plan: GemmPlan, bits: int = 3, group_size: int = 128, symmetric: bool = True,
                    dtype: torch.dtype = torch.bfloat16, arch: int = 90):
    """Compile the GEMV kernel (``plan.use_dot`` False) for ``sm_<arch>`` without a GPU (Triton's
    bundled ptxas), as the JIT would for 16-byte-aligned tensors and sizes: Triton's compiled
    kernel (``asm["sass"]`` via cuobjdump, ``asm["cubin"]``, ``metadata.shared``). For reading
    registers, spills and the SASS of the inner loop on a CPU machine
    (``benchmarks/gemm_bench.py --sass``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if plan.use_dot:
        raise ValueError("compile_for_gpu covers the GEMV plan (use_dot=False)")
    fn = triton.runtime.JITFunction(_gemv_kernel_source)
    ty = _TRITON_TYPES[dtype]
    types = dict(x_ptr=f"*{ty}", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16" if symmetric else "*u8",
                 bias_ptr=f"*{ty}", out_ptr=f"*{ty}", part_ptr="*fp32", ticket_ptr="*i32")
    const = dict(BITS=bits, GROUP=0 if group_size == -1 else group_size, SYMMETRIC=symmetric,
                 HAS_BIAS=False, ASM_BITSEL=_GEMV_ASM_BITSEL, **_gemv_constexprs(plan))
    names = fn.arg_names
    sig = {a: types.get(a, "constexpr" if a in const else "i32") for a in names}
    aligned = [a for a in names if a.endswith("_ptr") or a in ("N", "K", "stride_xm", "stride_om")]
    src = ASTSource(fn, signature=sig, constexprs={(names.index(a),): v for a, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    options = {"num_warps": plan.num_warps}
    if plan.num_stages is not None:
        options["num_stages"] = plan.num_stages
    if plan.max_registers:
        options["maxnreg"] = plan.max_registers
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per output tile; every launch leaves them zero again."""
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, _TICKETS_MIN), dtype=torch.int32, device=device)
        _TICKETS[device] = buf
    return buf


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------


def _check_args(x, qweight, scales, qzeros, bits, group_size) -> tuple[int, int, int]:
    """(K, N, number of groups) after checking every tensor against the packed format."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8], got {bits!r}")
    k = x.shape[-1]
    n, groups = check_packed_weight(k, qweight, scales, qzeros, bits, group_size)
    return k, n, groups


def check_packed_weight(k: int, qweight, scales, qzeros, bits: int, group_size: int,
                        names: tuple[str, str] = ("scales", "qzeros")) -> tuple[int, int]:
    """(N, number of groups) of a packed weight for K inputs, after checking K, the group size,
    ``qweight``, the scales and the zero points against the packed format (``bits`` already
    checked); ``names``: what the caller calls the scales and zero points, for the errors."""
    if k % _PACK_BLOCK:
        raise ValueError(f"K = {k} must be a multiple of {_PACK_BLOCK} (packing blocks)")
    if group_size == -1:
        groups = 1
    elif isinstance(group_size, int) and group_size > 0 and group_size % _PACK_BLOCK == 0 and k % group_size == 0:
        groups = k // group_size
    else:
        raise ValueError(
            f"group_size must be -1 or a positive multiple of {_PACK_BLOCK} dividing K = {k}, "
            f"got {group_size!r}"
        )
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] != bits * k // _PACK_BLOCK:
        raise ValueError(
            f"qweight must be int32 [bits*K/32, N] = [{bits * k // _PACK_BLOCK}, N], got "
            f"{qweight.dtype} {tuple(qweight.shape)}"
        )
    n = qweight.shape[1]
    scales_name, zeros_name = names
    if not scales.dtype.is_floating_point or tuple(scales.shape) != (groups, n):
        raise ValueError(f"{scales_name} must be floating [{groups}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if qzeros is not None and (qzeros.dtype != torch.uint8 or tuple(qzeros.shape) != (groups, n)):
        raise ValueError(f"{zeros_name} must be uint8 [{groups}, {n}] or None, got {qzeros.dtype} "
                         f"{tuple(qzeros.shape)}")
    return n, groups


def dequant_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``W = (c - z) * s`` dequantized in float32 (float64 for float64
    ``x``), exactly as ``hq_vllm.format.unpack_linear``; ``qzeros=None`` means symmetric
    (``z = 2**(bits-1)``). ``x`` is ``[..., K]``; the result ``[..., N]`` in ``out_dtype``
    (default ``x.dtype``)."""
    k, n, groups = _check_args(x, qweight, scales, qzeros, bits, group_size)
    codes = unpack_codes(qweight, bits, k).float().view(n, groups, k // groups)
    s = scales.float().t()
    z = torch.full_like(s, float(2 ** (bits - 1))) if qzeros is None else qzeros.float().t()
    w = ((codes - z.unsqueeze(-1)) * s.unsqueeze(-1)).view(n, k)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute) @ w.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype or x.dtype)


def dequantize_packed_reference(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The transposed dequantized weight ``W.T`` ``[K, N]`` in ``dtype`` (float32 math, as
    ``hq_vllm.format.unpack_linear``)."""
    x = torch.empty(0, k, dtype=dtype, device=qweight.device)
    _, n, groups = _check_args(x, qweight, scales, qzeros, bits, group_size)
    codes = unpack_codes(qweight, bits, k).float().view(n, groups, k // groups)
    s = scales.float().t()
    z = torch.full_like(s, float(2 ** (bits - 1))) if qzeros is None else qzeros.float().t()
    return ((codes - z.unsqueeze(-1)) * s.unsqueeze(-1)).view(n, k).t().to(dtype)


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``W.T`` ``[K, N]`` in ``dtype`` in one Triton pass over the packed weight (same contract
    as :func:`dequantize_packed_reference`; the same fallbacks as :func:`dequant_gemm`).

    The large-M path of :func:`dequant_gemm`: ``(c - z) * s`` is exact in float32, then rounded
    once to ``dtype``.
    """
    x = torch.empty(0, k, dtype=dtype, device=qweight.device)
    _, n, _ = _check_args(x, qweight, scales, qzeros, bits, group_size)
    interpret = _interpret_requested()
    if (bits not in KERNEL_BITS or dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or not (qweight.is_cuda or interpret)):
        return dequantize_packed_reference(qweight, scales, qzeros, bits, group_size, k, dtype)
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    qzeros = None if qzeros is None else qzeros.contiguous()
    n_tiles, k_tiles = -(-n // _DEQUANT_BLOCK_N), -(-k // _DEQUANT_BLOCK_K)
    _kernel(interpret)[(n_tiles, k_tiles)](
        scales, qweight, scales, scales if qzeros is None else qzeros, out, out, out, out,
        1, n, k, 0, 0, 1, k_tiles, _MAGIC_ONE, 0,
        BITS=bits, GROUP=0 if group_size == -1 or group_size == k else group_size,
        SYMMETRIC=qzeros is None, HAS_BIAS=False, USE_DOT=True, BLOCK_M=1,
        BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=_DEQUANT_BLOCK_K, DOT_IN_FP32=interpret,
        DOT_PRECISION=None, DEQUANT_ONLY=True, num_warps=_DOT_WARPS,
    )
    return out


def dequant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    plan: GemmPlan | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` reading the packed weight directly; same contract as
    :func:`dequant_gemm_reference` (``x`` ``[..., K]`` in bf16/fp16/fp32, float32 accumulation,
    result in ``out_dtype``, default ``x.dtype``).

    Runs the Triton kernel for bits 3 and 4 with x on CUDA (or anywhere with TRITON_INTERPRET=1);
    other bit widths (2, 5–8), float64 and plain CPU tensors take the reference. ``plan`` pins a
    launch configuration (:func:`plan_dequant_gemm`); by default the heuristic picks one, and
    for M > 16 rows (prefill, large batches) the weight is instead dequantized into a transient
    16-bit ``[K, N]`` by one Triton pass (:func:`dequantize_packed`) and multiplied by
    torch.matmul: memory at rest stays packed, and the GEMM runs on the vendor library until the
    int8 prefill GEMM lands. No host synchronisation: usable inside CUDA-graph capture.
    """
    k, n, _ = _check_args(x, qweight, scales, qzeros, bits, group_size)
    interpret = _interpret_requested()
    if (bits not in KERNEL_BITS or x.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or not (x.is_cuda or interpret)):
        return dequant_gemm_reference(x, qweight, scales, qzeros, bits, group_size, out_dtype, bias)
    out_dtype = out_dtype or x.dtype
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if plan is None and m >= _DEQUANT_MIN_M:
        # 16-bit x: the library GEMM accumulates in float32 and rounds once to x's dtype; a
        # float32 output (or input) is computed in float32.
        compute = rows.dtype if out_dtype == rows.dtype else torch.float32
        w_t = dequantize_packed(qweight, scales, qzeros, bits, group_size, k, compute)
        y = torch.matmul(rows.to(compute), w_t)
        if bias is not None:
            y += bias.to(compute)
        return y.to(out_dtype).reshape(*x.shape[:-1], n)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    if plan is None:
        plan = plan_dequant_gemm(m, n, k, x.device)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    qzeros = None if qzeros is None else qzeros.contiguous()
    tiles = -(-m // plan.block_m) * -(-n // plan.block_n)
    if plan.split_k > 1:
        partial = torch.empty((plan.split_k, m, n), dtype=torch.float32, device=x.device)
        tickets = _tickets(x.device, tiles)
    else:
        partial = tickets = out  # unused
    extra = {} if plan.num_stages is None else {"num_stages": plan.num_stages}
    if not plan.use_dot:
        _kernel(interpret, True)[(-(-n // plan.block_n), plan.split_k, m)](
            rows, qweight, scales, scales if qzeros is None else qzeros,
            out if bias is None else bias, out, partial, tickets,
            m, n, k, rows.stride(0), out.stride(0), plan.tiles_per_split, plan.split_k, _MAGIC_ONE,
            BITS=bits, GROUP=0 if group_size == -1 or group_size == k else group_size,
            SYMMETRIC=qzeros is None, HAS_BIAS=bias is not None, **_gemv_constexprs(plan),
            ASM_BITSEL=not interpret and _GEMV_ASM_BITSEL, num_warps=plan.num_warps, **extra,
            **({"maxnreg": plan.max_registers} if plan.max_registers and not interpret else {}),
        )
        return out.reshape(*x.shape[:-1], n)
    fp32 = x.dtype == torch.float32
    # Field-major activations (one small copy per call): [M, 32, blocks], blocks padded with
    # zeros to every tile a split visits, so the per-field gathers read contiguous blocks
    # instead of one element every 32 (the 2026-12-01 dot path: 16x the activation traffic).
    kb = k // _PACK_BLOCK
    kb_pad = plan.split_k * plan.tiles_per_split * (plan.block_k // _PACK_BLOCK)
    x_fm = torch.nn.functional.pad(rows.view(m, kb, _PACK_BLOCK).transpose(1, 2), (0, kb_pad - kb))
    x_fm = x_fm.contiguous()  # a zero pad may return the transposed view itself
    _kernel(interpret)[(tiles, plan.split_k)](
        x_fm, qweight, scales, scales if qzeros is None else qzeros,
        out if bias is None else bias, out, partial, tickets,
        m, n, k, x_fm.stride(0), out.stride(0), plan.tiles_per_split, plan.split_k, _MAGIC_ONE, kb_pad,
        X_FIELD_MAJOR=True,
        BITS=bits,
        GROUP=0 if group_size == -1 or group_size == k else group_size,
        SYMMETRIC=qzeros is None,
        HAS_BIAS=bias is not None,
        USE_DOT=plan.use_dot,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        # Triton's interpreter multiplies 16-bit tiles wrongly (numpy has no bfloat16): there
        # the operands go to the dot as float32, which holds both exactly.
        DOT_IN_FP32=interpret,
        DOT_PRECISION="ieee" if fp32 or interpret else None,
        num_warps=plan.num_warps,
        **extra,
    )
    return out.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# Custom op: opaque to torch.compile / CUDA graphs (the vLLM plugin's GPU path calls this)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hadaquant::dequant_gemm", mutates_args=())
def dequant_gemm_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """:func:`dequant_gemm` as ``torch.ops.hadaquant.dequant_gemm`` (output in x's dtype)."""
    return dequant_gemm(x, qweight, scales, qzeros, bits, group_size, bias=bias)


@dequant_gemm_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
