"""Paged attention over the packed, rotated KV cache: one Triton kernel for decode and prefill.

The torch reference is :func:`hq_vllm.kernels.kv_cache.paged_attention_reference` (beside the
slot layout it reads); this module is its Triton twin, with the same arguments and conventions,
so the vLLM backend (``hq_vllm/attention.py``) can switch between them per call:

* ``query [T, Hq, D]`` is already R3-rotated by the caller (the backend's ``_rotate``), so
  ``Q Kᵀ`` is the original one; the result ``[T, Hq, D]`` is in the rotated V basis as stored
  (V is never rotated by R3; R2 is fused offline), in ``query``'s dtype, written into ``output``
  when given.
* request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its newest
  ``q_len`` tokens, whose K/V are already in the cache) and ``seq_lens[i]`` cached tokens in the
  pages ``block_table[i]``; query ``j`` sits at position ``seq_len - q_len + j`` and sees the
  positions ``<=`` it and, with a ``sliding_window`` ``w``, ``> position - w``. That covers
  prefill, chunked prefill, prefix-cache hits and decode in one launch. Pages wholly before a
  window are never read (their block-table entries are not even loaded).
* GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``.

How a program works (grid: query tile [x KV split], request, KV head):

* **A GQA group at once.** A program owns one KV head and a tile of ``BLOCK_Q`` query tokens
  of one request, with all ``G = Hq / Hkv`` query heads of that head: ``BLOCK_M = BLOCK_Q x
  next_pow2(G)`` rows (token-major). Every slot is read and unpacked once per tile, not once per
  query head. At decode (``q_len = 1``) ``BLOCK_Q`` only pads the rows to 16, the smallest
  tensor-core tile; the padding rows are masked and cost no memory traffic.
* **Pages via the block table, token by token.** A KV tile of ``BLOCK_N`` positions looks up
  each position's page, so any vLLM block size works (smaller or larger than the tile).
* **Unpacking** reads each token's slot as int32 words with the shifts and masks of
  ``kernels/packing.py``. Three ways, one per ``AttentionPlan.unpack`` (all tested):

  0. *gather*: every channel loads its own word (bit planes for 3, 5, 6, 7 bits:
     ``c = sum_p ((w[g*b + p] >> j) & 1) << p``; dense fields for 2, 4, 8:
     ``c = (w[g*b + j // v] >> (j % v) * b) & (2**b - 1)``). Simplest; ~4x the instructions.
  1. *words*: the block's words are loaded once per token and expanded (the same shifts) into a
     ``[words, fields]`` tile that is reshaped to channels.
  2. *nibble words* (3 and 4 bits, the default there): 4-bit words are nibbles already; the
     three 3-bit planes become four nibble words with 12 bit operations per 32 codes (the
     construction of ``gemm.py``; word ``r`` holds lanes ``r, r+4, ..., r+28`` at bits
     ``4i + r % 2``). With 16-bit codes one shift and one and-or then make *two* codes per
     32-bit register (fields ``k`` and ``k + 4`` land in its two halves, each ``magic | c``).
     The block's channels come out in word order, not lane order: Q is loaded and the output
     stored through that permutation (``chan`` in the kernel), which leaves ``Q Kᵀ`` unchanged.

* **Codes as floats without conversions, scales outside the dots.** ``Q Kᵀ`` is
  ``s_k * (Q (c_k - z_k)ᵀ)`` per key token and ``P V = (P * s_v) (c_v - z_v)``. With 16-bit
  queries (``codes16``, the default) a K code becomes the bf16 ``128 + c`` (bits ``0x4300 | c``,
  c < 128) or fp16 ``1024 + c`` (``0x6400 | c``), exact, meets Q on 16-bit tensor cores with
  float32 accumulation, and the offset leaves as ``(OFF + z_k) * sum(q)`` per score; a V code
  becomes fp16 ``1024 + c`` and meets ``P * s_v / max(s_v)`` in float16 (scaled into [0, 1] so
  no probability goes subnormal), the offset leaving as a row sum: float16 probabilities carry
  2**-11 relative error per term (FlashAttention keeps P in the 16-bit input dtype too), below a
  bf16 output's rounding. Without ``codes16``, and always for float32 queries, ``c - z`` is
  ``bitcast(c | 0x4B000000) - (2**23 + z)`` in float32, rounded exactly to Q's dtype for
  ``Q Kᵀ`` and met by ``P * s_v`` in a tf32 dot (10 mantissa bits, float32's range); float32
  queries use tf32x3 (float32 accuracy) for both dots.
* **Online softmax** (flash attention) in float32, base 2 (``scale * log2 e`` folded in).

What it costs. A static count first (warp instructions per (token, KV head) in the KV loop of
the sm_90a SASS that Triton 3.9 emits, ``cuobjdump -sass``; the GPU image has Triton 3.6;
Llama-3-8B decode, head_dim 128, G = 4, 3 bits, 4 warps): gather with float32 tiles and a
16-token tile 240; words + 16-bit codes, 64-token tile 131; nibble words, one code per op 85;
nibble words, two codes per op 66 (4 bits: 63); a 128-token tile 54 but 255 registers). An H200 SM issues 4 per clock, so reading HBM at full
speed (104 bytes per token and head at 4.8 TB/s) would allow ~23: the unpacking and the layout
changes into the tensor-core operands still dominate (``benchmarks/paged_attention_sass.py``).
Measured on an H200 (``benchmarks/paged_attention_bench.py``, docs/BENCHMARKS.md): correct on
all 124 checked launches; 560-640 GB/s of slot bytes at batch 64 (13-15% of HBM), 0.5-0.7x the
speed of bf16 SDPA on 4-5x the bytes; nibble words beat whole words 1.4-1.7x, float32 tiles
2.4-2.9x, gathers 30x. Eager launches cost ~85+ us of Python (Triton 3.6's launcher): in a CUDA
graph a batch-1 decode takes 11-40 us.

**Split-KV (flash-decoding)** for decode-only launches: when ``requests x KV heads`` programs
would leave the GPU's SMs idle (few long sequences), each program's KV range is cut into
``num_splits`` parts that run as separate programs, each writes its un-normalised accumulator
with its running max and sum (float32), and a second small kernel merges them per (request,
query head). The split count depends only on host-side numbers (``max_seq_len`` from vLLM's
metadata, the batch shape, the SM count); the split *ranges* are computed in the kernel from the
real sequence lengths, so the launch is correct for any lengths and CUDA graphs can capture
it. Prefill tiles (``q_len > 1``) never split: they have programs enough.

No host synchronisation: the Python side reads only shapes and the optional host-side
``max_query_len`` / ``max_seq_len`` (vLLM's metadata carries both as ints; without them they
are read from the tensors once, which syncs, for tests and tools).

Dispatch: the Triton kernel runs when ``query`` is on CUDA or when ``TRITON_INTERPRET=1`` is
set (read at call time, as in ``fwht.py``); float64 and plain CPU tensors take the reference.
All bit widths of the cache (2-8) and every head dim that is a multiple of 32 run the kernel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Bit-select masks (bits 4i, 4i+1, 4i+2 of every nibble) and their complements: the 3-bit
# nibble-word construction of gemm.py (there documented), on uint32 words; one definition.
from .gemm import _M0, _M1, _M2, _N0, _N1, _N2  # noqa: F401 (kernel globals)
from .kv_cache import kv_slot_bytes, paged_attention_reference

__all__ = [
    "AttentionPlan",
    "paged_attention",
    "paged_attention_decode",
    "paged_attention_reference",
    "plan_paged_attention",
]

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place (benchmarks/paged_attention_bench.py measures them).
# ---------------------------------------------------------------------------------------------
_MIN_ROWS = 16  # tensor-core tile minimum: rows (query tokens x heads of a group) per program
#: Decode: KV positions per inner step and warps. Measured on the H200 (Triton 3.6, batch 64 x
#: 4096 tokens, benchmarks/results/paged_attention_h200_2026-12-01*.json): at 3 bits 128 x 2 warps took
#: 372 us (Llama-3-8B shape) / 1381 us (Llama-2-7B), 64 x 4 warps 426 / 1687, 64 x 2 399 / 1429,
#: 8 warps 547+ / 2032+; at 4 bits 128 x 2 was slower than 64 x 4 (556 / 2140 against 523 /
#: 1928 us), and so it was with few programs (batch 1-8: fewer, longer splits). Hence 128 x 2 only
#: for 3 bits with at least _WIDE_MIN_PROGRAMS_PER_SM (request, KV head) programs per SM.
_DECODE_BLOCK_N = 64
_DECODE_WARPS = 4
_WIDE_BLOCK_N = 128
_WIDE_WARPS = 2
_WIDE_MIN_PROGRAMS_PER_SM = 2
_PREFILL_ROWS = 64  # rows per program when requests have several query tokens
_PREFILL_BLOCK_N = 32
_NUM_WARPS = 4  # prefill
#: Software pipelining depth. Triton's default 3 takes the gather variant at a 64-token tile past
#: the H200's 227 KB of shared memory (OutOfResources); the default path needs 14 KB at 2, and 3
#: stages measured within 5% of 2 on the H200, 1 stage 1-60% slower.
_NUM_STAGES: int | None = 2
_UNPACK = 2  # nibble words where they apply (3 and 4 bits), else whole words (1)
_CODES16 = True
#: Split-KV: split until the grid has this many programs per SM, but keep at least
#: ``_MIN_SPLIT_TOKENS`` positions (two 64-token tiles) per split: a shorter split is mostly
#: prologue and merge. On the H200 at batch 64 two splits beat one (445 against 552 us); at batch 1
#: the launch overhead hides the differences between 4 and 32 splits in eager timings.
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_TOKENS = 128
_MAX_SPLITS = 64
_INTERPRET_SM_COUNT = 4  # the interpreter has no SMs; small, so tests exercise the split path
_INTERPRET_BLOCK_N = 16  # the interpreter runs every program in numpy: small tiles, fewer wasted lanes

#: Bits of float32 2**23: ``bitcast(c | _MAGIC) = 2**23 + c`` for a code c < 2**23; of float16
#: 1024 (``1024 + c``, c < 1024) and bfloat16 128 (``128 + c``, c < 128). Passed as arguments, not
#: constants: a mask-and-or with two immediates does not fit one LOP3, and ptxas then
#: re-materializes the mask before every use (in the SASS: 64 more instructions per 64-token tile).
_MAGIC = 0x4B000000
_MAGIC_FP16 = 0x6400
_MAGIC_BF16 = 0x4300
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionPlan:
    """One launch: query tokens and KV positions per program step, warps, KV splits."""

    block_q: int
    block_n: int
    num_warps: int
    num_splits: int
    num_stages: int | None = None
    unpack: int = 2  # 0: gather per channel; 1: whole words + reshape; 2: nibble words (3, 4 bits)
    codes16: bool = True  # 16-bit codes in the dots (16-bit queries); else float32 c - z tiles


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def plan_paged_attention(
    num_seqs: int, num_kv_heads: int, group: int, max_query_len: int, max_seq_len: int,
    device: torch.device, *, bits: int | None = None, **override,
) -> AttentionPlan:
    """The launch the heuristic picks; ``override`` replaces fields (``num_splits=...``,
    ``block_n=...``), used by the tests and the benchmark to pin or sweep configurations.

    ``num_splits`` > 1 only for decode-only launches (``max_query_len <= 1``); ``bits`` (the
    cache's) picks the decode tile."""
    interpret = device.type != "cuda"
    group_pad = _next_pow2(group)
    sms = _INTERPRET_SM_COUNT if interpret else _sm_count(device.index or 0)
    programs = max(1, num_seqs * num_kv_heads)
    warps = _NUM_WARPS
    if max_query_len <= 1:
        block_q = max(1, _MIN_ROWS // group_pad)
        block_n, warps = _DECODE_BLOCK_N, _DECODE_WARPS
        if bits == 3 and programs >= _WIDE_MIN_PROGRAMS_PER_SM * sms:
            block_n, warps = _WIDE_BLOCK_N, _WIDE_WARPS
        if interpret:
            block_n = _INTERPRET_BLOCK_N
    else:
        block_q = max(1, _PREFILL_ROWS // group_pad, _MIN_ROWS // group_pad)
        block_n = _INTERPRET_BLOCK_N if interpret else _PREFILL_BLOCK_N
    splits = 1
    if max_query_len <= 1:
        want = -(-_PROGRAMS_PER_SM * sms // programs)
        splits = max(1, min(want, -(-max_seq_len // _MIN_SPLIT_TOKENS), _MAX_SPLITS))
    plan = dict(block_q=block_q, block_n=block_n, num_warps=warps, num_splits=splits,
                num_stages=_NUM_STAGES, unpack=_UNPACK, codes16=_CODES16)
    unknown = override.keys() - plan.keys()
    if unknown:
        raise TypeError(f"unknown plan fields {sorted(unknown)}")
    plan.update(override)
    if plan["num_splits"] > 1 and max_query_len > 1:
        raise ValueError(f"KV splits need a decode-only launch (max_query_len <= 1), got {max_query_len}")
    bn = plan["block_n"]
    if bn < 16 or bn & (bn - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {bn}")
    if plan["block_q"] * group_pad < _MIN_ROWS or plan["block_q"] & (plan["block_q"] - 1):
        raise ValueError(
            f"block_q must be a power of two with block_q x {group_pad} (padded group) >= {_MIN_ROWS}, "
            f"got {plan['block_q']}"
        )
    return AttentionPlan(**plan)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _paged_attention_kernel_source(
    q_ptr, out_ptr, cache_i32_ptr, cache_f16_ptr, cache_u8_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
    part_acc_ptr, part_ml_ptr,
    num_q_heads, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_bt,
    qk_scale, window, magic, k16_magic, v16_magic, k16_magic2, v16_magic2, num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BITS: tl.constexpr,
    SLOT: tl.constexpr,  # bytes per (token, KV head) slot
    PAGE: tl.constexpr,  # vLLM block size (tokens per page)
    SPLIT: tl.constexpr,  # num_splits > 1: write partials for the merge kernel
    HAS_QSL: tl.constexpr,  # False: decode, query row i is request i's only token
    HAS_WINDOW: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # interpreter: every dot in float32 (numpy has no bfloat16)
    QK_PRECISION: tl.constexpr,
    PV_PRECISION: tl.constexpr,
    UNPACK: tl.constexpr,  # 0 gather per channel, 1 per word + reshape, 2 nibble words (3, 4 bits)
    K16: tl.constexpr,  # K codes as 16-bit floats OFF + c (k16_magic | c), offset removed after the dot
    K16_OFF: tl.constexpr,
    K16_DTYPE: tl.constexpr,
    V16: tl.constexpr,  # V codes as float16 1024 + c, probabilities in float16
):
    """One (request, KV head, query tile x KV split) program; see the module docstring.

    Only core builtins (tl.full, tl.reduce with the standard combiners): the
    triton.language.standard @jit helpers are bound compiled-or-interpreted at ``import
    triton``, and this source is built both ways at call time (see ``_kernel``).
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    PLANES: tl.constexpr = (32 % BITS) != 0
    PER_WORD: tl.constexpr = 32 // BITS  # dense fields per word (unused for planes)
    FMASK: tl.constexpr = (1 << BITS) - 1
    CODE_WORDS: tl.constexpr = BITS * HEAD_DIM // 32  # int32 words of K (or V) codes
    SK_HALF: tl.constexpr = 2 * CODE_WORDS * 2  # K scale, in float16 units from the slot start
    ZK_BYTE: tl.constexpr = 2 * CODE_WORDS * 4 + 4  # K zero, in bytes from the slot start
    NEG_INF: tl.constexpr = float("-inf")
    NB_PAD: tl.constexpr = D_PAD // 32
    BITS_W: tl.constexpr = BITS if (32 % BITS) == 0 else 1  # dense: code words per block
    NIB_ODD: tl.constexpr = 1 if BITS == 3 else 0  # 3-bit nibble words 1, 3 hold fields at 4i + 1
    PAIRED: tl.constexpr = UNPACK == 2 and K16 and V16  # 16-bit codes made two per 32-bit op
    PAIR_MASK: tl.constexpr = FMASK | (FMASK << 16)

    # Grid (query tiles x splits, requests, KV heads): the first dimension is the one that may
    # exceed 65535 (a long prefill), the others are bounded by vLLM's batch and the model.
    q_tile = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    seq = tl.program_id(1)
    kvh = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    if HAS_QSL:
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
    else:
        q_start = seq
        q_len = tl.where(seq_len > 0, 1, 0)
    q_len = tl.minimum(q_len, seq_len)  # never more queries than cached tokens

    # Rows: query token (within the request) x head of the group, token-major.
    offs_m = tl.arange(0, BLOCK_M)
    tile_q0 = q_tile * BLOCK_Q
    q_idx = tile_q0 + offs_m // GROUP_PAD
    h_in_group = offs_m % GROUP_PAD
    row_valid = (q_idx < q_len) & (q_idx < tile_q0 + BLOCK_Q) & (h_in_group < GROUP)
    q_head = kvh * GROUP + h_in_group
    q_pos = seq_len - q_len + q_idx
    q_row = (q_start + q_idx).to(tl.int64)

    # Tile columns -> channels. The nibble unpack yields a block's 32 channels in the order of
    # its four nibble words (column blk*32 + 8f + i); Q is loaded and the output stored in that
    # order, which leaves Q Kᵀ unchanged and un-permutes P V. Word f = 2x + y of the joined
    # words is nibble word r = x + 2y.
    offs_d = tl.arange(0, D_PAD)
    if UNPACK == 2:
        nib_f = (offs_d % 32) // 8
        nib_r = nib_f // 2 + 2 * (nib_f % 2)
        if PAIRED:  # column 8f + 2k + h holds field k + 4h (two fields per 32-bit register)
            nib_i = (offs_d % 8) // 2 + 4 * (offs_d % 2)
        else:  # column 8f + i holds field i
            nib_i = offs_d % 8
        if BITS == 3:
            chan = (offs_d // 32) * 32 + 4 * nib_i + nib_r  # word r: lanes r, r+4, ..., r+28
        else:
            chan = (offs_d // 32) * 32 + 8 * nib_r + nib_i  # word r: lanes 8r .. 8r+7
        nib_x = tl.arange(0, 4) // 2  # x of joined word f: its fields sit at 4i + x (3 bits)
        nib_shift = 4 * tl.arange(0, 8)[None, :] + (nib_x * NIB_ODD)[:, None]  # [4, 8]
        pair_shift = 4 * tl.arange(0, 4)[None, :] + (nib_x * NIB_ODD)[:, None]  # [4, 4]: fields k, k + 4
    else:
        chan = offs_d
    d_valid = chan < HEAD_DIM
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + q_head[:, None] * stride_qh + chan[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # KV positions this tile may see: [lo, hi). Empty when the tile holds no query.
    last_q = tl.minimum(tile_q0 + BLOCK_Q, q_len) - 1
    hi = tl.where(last_q >= tile_q0, seq_len - q_len + last_q + 1, 0)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - q_len + tile_q0 - window + 1, 0)
    t_first = lo // BLOCK_N
    n_tiles = tl.maximum((hi + BLOCK_N - 1) // BLOCK_N - t_first, 0)
    per_split = (n_tiles + num_splits - 1) // num_splits
    t_begin = t_first + split * per_split
    t_end = tl.minimum(t_begin + per_split, t_first + n_tiles)

    # Gather unpack: per channel, its word and shift. Word unpack: blocks, words, lanes, fields.
    blk = offs_d // 32
    lane = offs_d % 32
    if PLANES:
        word_of_d = blk * BITS  # + plane p
        shift_of_d = lane
    else:
        word_of_d = blk * BITS + lane // PER_WORD
        shift_of_d = (lane % PER_WORD) * BITS
    offs_b = tl.arange(0, NB_PAD)  # 32-channel blocks
    b_valid = offs_b < HEAD_DIM // 32
    offs_w = tl.arange(0, NB_PAD * BITS_W)  # dense: code words, PER_WORD channels each
    w_valid = offs_w < CODE_WORDS
    lane32 = tl.arange(0, 32)
    if PLANES:
        field = lane32  # unused
    else:
        field = tl.arange(0, PER_WORD) * BITS

    if K16:  # rows' sums of q, for the offset of the 16-bit codes (see the module docstring)
        q_sum = tl.reduce(q.to(tl.float32), 1, tl.standard._sum_combine)

    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D_PAD], 0.0, tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    head_byte = kvh.to(tl.int64) * stride_ch

    for t in range(t_begin, t_end):
        pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_valid = (pos >= lo) & (pos < hi)
        page = tl.load(bt_row + pos // PAGE, mask=kv_valid, other=0).to(tl.int64)
        slot_byte = page * stride_cb + head_byte + (pos % PAGE) * SLOT  # [BLOCK_N] int64
        slot_word = slot_byte // 4
        k_scale = tl.load(cache_f16_ptr + slot_byte // 2 + SK_HALF, mask=kv_valid, other=0.0).to(tl.float32)
        v_scale = tl.load(cache_f16_ptr + slot_byte // 2 + SK_HALF + 1, mask=kv_valid, other=0.0).to(tl.float32)
        k_zero = tl.load(cache_u8_ptr + slot_byte + ZK_BYTE, mask=kv_valid, other=0).to(tl.float32)
        v_zero = tl.load(cache_u8_ptr + slot_byte + ZK_BYTE + 1, mask=kv_valid, other=0).to(tl.float32)

        # K codes, transposed [D_PAD, BLOCK_N] for Q Kᵀ (columns in ``chan`` order).
        if UNPACK == 2:
            wp = cache_i32_ptr + slot_word[:, None] + (offs_b * BITS)[None, :]
            wm = kv_valid[:, None] & b_valid[None, :]
            w0 = tl.load(wp, mask=wm, other=0).to(tl.uint32, bitcast=True)  # [BLOCK_N, NB_PAD]
            w1 = tl.load(wp + 1, mask=wm, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(wp + 2, mask=wm, other=0).to(tl.uint32, bitcast=True)
            if BITS == 3:  # nibble words from the 3 bit planes (12 ops per 32 codes; see gemm.py)
                n_a = w1 << 1
                n_b = w2 << 2
                n_c = w0 >> 2
                n_d = w1 >> 1
                u0 = (w0 & _M0) | (((n_a & _M1) | (n_b & _N1)) & _N0)
                u1 = (w0 & _M1) | (((n_a & _M2) | (n_b & _N2)) & _N1)
                u2 = (n_c & _M0) | (((n_d & _M1) | (w2 & _N1)) & _N0)
                u3 = (n_c & _M1) | (((n_d & _M2) | (w2 & _N2)) & _N1)
            else:
                u0 = w0
                u1 = w1
                u2 = w2
                u3 = tl.load(wp + 3, mask=wm, other=0).to(tl.uint32, bitcast=True)
            joined = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [BLOCK_N, NB_PAD, 4])
            if PAIRED:  # one shift + one and-or per two codes: fields k and k + 4 in both halves
                pairs = ((joined[:, :, :, None] >> pair_shift[None, None, :, :]) & PAIR_MASK) | k16_magic2
                k16 = tl.trans(tl.reshape(tl.join(pairs.to(tl.uint16), (pairs >> 16).to(tl.uint16)),
                                          [BLOCK_N, D_PAD])).to(K16_DTYPE, bitcast=True)
            else:
                kc = tl.trans(tl.reshape((joined[:, :, :, None] >> nib_shift[None, None, :, :]) & FMASK,
                                         [BLOCK_N, D_PAD])).to(tl.int32, bitcast=True)
        elif UNPACK == 1:
            if PLANES:
                kc3 = tl.full([NB_PAD, 32, BLOCK_N], 0, tl.int32)
                for p in tl.static_range(BITS):
                    w = tl.load(cache_i32_ptr + slot_word[None, :] + (offs_b * BITS + p)[:, None],
                                mask=b_valid[:, None] & kv_valid[None, :], other=0)  # [NB_PAD, BLOCK_N]
                    kc3 = kc3 | (((w[:, None, :] >> lane32[None, :, None]) & 1) << p)
                kc = tl.reshape(kc3, [D_PAD, BLOCK_N])
            else:
                w = tl.load(cache_i32_ptr + slot_word[None, :] + offs_w[:, None],
                            mask=w_valid[:, None] & kv_valid[None, :], other=0)  # [words, BLOCK_N]
                kc = tl.reshape((w[:, None, :] >> field[None, :, None]) & FMASK, [D_PAD, BLOCK_N])
        else:
            k_ptrs = cache_i32_ptr + slot_word[None, :] + word_of_d[:, None]
            k_mask = d_valid[:, None] & kv_valid[None, :]
            if PLANES:
                kc = tl.full([D_PAD, BLOCK_N], 0, tl.int32)
                for p in tl.static_range(BITS):
                    w = tl.load(k_ptrs + p, mask=k_mask, other=0)
                    kc = kc | (((w >> shift_of_d[:, None]) & 1) << p)
            else:
                w = tl.load(k_ptrs, mask=k_mask, other=0)
                kc = (w >> shift_of_d[:, None]) & FMASK
        if K16:
            # OFF + c as a 16-bit float (exact); Q (OFF + c)ᵀ - (OFF + z) * sum(q) = Q (c - z)ᵀ
            if not PAIRED:
                k16 = (kc | k16_magic).to(tl.int16).to(K16_DTYPE, bitcast=True)
            if DOT_IN_FP32:
                s = tl.dot(q, k16.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, k16)
            s = s - (K16_OFF + k_zero)[None, :] * q_sum[:, None]
        else:
            k_f = (kc | magic).to(tl.float32, bitcast=True) - (8388608.0 + k_zero)[None, :]  # c - z, exact
            if DOT_IN_FP32:
                s = tl.dot(q, k_f, input_precision="ieee")
            elif QK_PRECISION == "exact16":
                s = tl.dot(q, k_f.to(q.dtype))
            else:
                s = tl.dot(q, k_f, input_precision=QK_PRECISION)
        s = s * (k_scale * qk_scale)[None, :]
        visible = kv_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, NEG_INF)

        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_ij = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p_ij, 1, tl.standard._sum_combine)
        m_i = m_new

        # V codes [BLOCK_N, D_PAD] (columns in ``chan`` order).
        if UNPACK == 2:
            wp = cache_i32_ptr + slot_word[:, None] + (CODE_WORDS + offs_b * BITS)[None, :]
            wm = kv_valid[:, None] & b_valid[None, :]
            w0 = tl.load(wp, mask=wm, other=0).to(tl.uint32, bitcast=True)
            w1 = tl.load(wp + 1, mask=wm, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(wp + 2, mask=wm, other=0).to(tl.uint32, bitcast=True)
            if BITS == 3:
                n_a = w1 << 1
                n_b = w2 << 2
                n_c = w0 >> 2
                n_d = w1 >> 1
                u0 = (w0 & _M0) | (((n_a & _M1) | (n_b & _N1)) & _N0)
                u1 = (w0 & _M1) | (((n_a & _M2) | (n_b & _N2)) & _N1)
                u2 = (n_c & _M0) | (((n_d & _M1) | (w2 & _N1)) & _N0)
                u3 = (n_c & _M1) | (((n_d & _M2) | (w2 & _N2)) & _N1)
            else:
                u0 = w0
                u1 = w1
                u2 = w2
                u3 = tl.load(wp + 3, mask=wm, other=0).to(tl.uint32, bitcast=True)
            joined = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [BLOCK_N, NB_PAD, 4])
            if PAIRED:
                pairs = ((joined[:, :, :, None] >> pair_shift[None, None, :, :]) & PAIR_MASK) | v16_magic2
                v16 = tl.reshape(tl.join(pairs.to(tl.uint16), (pairs >> 16).to(tl.uint16)),
                                 [BLOCK_N, D_PAD]).to(tl.float16, bitcast=True)
            else:
                vc = tl.reshape((joined[:, :, :, None] >> nib_shift[None, None, :, :]) & FMASK,
                                [BLOCK_N, D_PAD]).to(tl.int32, bitcast=True)
        elif UNPACK == 1:
            if PLANES:
                vc3 = tl.full([BLOCK_N, NB_PAD, 32], 0, tl.int32)
                for p in tl.static_range(BITS):
                    w = tl.load(cache_i32_ptr + slot_word[:, None] + (CODE_WORDS + offs_b * BITS + p)[None, :],
                                mask=kv_valid[:, None] & b_valid[None, :], other=0)  # [BLOCK_N, NB_PAD]
                    vc3 = vc3 | (((w[:, :, None] >> lane32[None, None, :]) & 1) << p)
                vc = tl.reshape(vc3, [BLOCK_N, D_PAD])
            else:
                w = tl.load(cache_i32_ptr + slot_word[:, None] + (CODE_WORDS + offs_w)[None, :],
                            mask=kv_valid[:, None] & w_valid[None, :], other=0)  # [BLOCK_N, words]
                vc = tl.reshape((w[:, :, None] >> field[None, None, :]) & FMASK, [BLOCK_N, D_PAD])
        else:
            v_ptrs = cache_i32_ptr + slot_word[:, None] + (CODE_WORDS + word_of_d)[None, :]
            v_mask = kv_valid[:, None] & d_valid[None, :]
            if PLANES:
                vc = tl.full([BLOCK_N, D_PAD], 0, tl.int32)
                for p in tl.static_range(BITS):
                    w = tl.load(v_ptrs + p, mask=v_mask, other=0)
                    vc = vc | (((w >> shift_of_d[None, :]) & 1) << p)
            else:
                w = tl.load(v_ptrs, mask=v_mask, other=0)
                vc = (w >> shift_of_d[None, :]) & FMASK
        if V16:
            # P V = s_max * ((P s / s_max) (1024 + c) - rowsum((P s / s_max) (1024 + z))), the
            # probabilities scaled into [0, 1] so float16 keeps them normal.
            s_max = tl.reduce(v_scale, 0, tl.standard._elementwise_max)
            s_max = tl.where(s_max > 0.0, s_max, 1.0)
            p16 = (p_ij * (v_scale / s_max)[None, :]).to(tl.float16)
            if not PAIRED:
                v16 = (vc | v16_magic).to(tl.int16).to(tl.float16, bitcast=True)
            p16_f = p16.to(tl.float32)
            if DOT_IN_FP32:
                pv = tl.dot(p16_f, v16.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p16, v16)
            corr = tl.reduce(p16_f * (1024.0 + v_zero)[None, :], 1, tl.standard._sum_combine)
            pv = (pv - corr[:, None]) * s_max
        else:
            v_f = (vc | magic).to(tl.float32, bitcast=True) - (8388608.0 + v_zero)[:, None]
            p_s = p_ij * v_scale[None, :]
            if DOT_IN_FP32:
                pv = tl.dot(p_s, v_f, input_precision="ieee")
            else:
                pv = tl.dot(p_s, v_f, input_precision=PV_PRECISION)
        acc = acc * alpha[:, None] + pv

    if not SPLIT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + q_row[:, None] * stride_ot + q_head[:, None] * stride_oh + chan[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        # Decode only: one query token, rows = heads of the group. Partials [seq, head, split],
        # channels in ``chan`` order.
        part = (seq.to(tl.int64) * num_q_heads + q_head) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * D_PAD + chan[None, :], acc, mask=row_valid[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


def _merge_splits_kernel_source(
    out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, qsl_ptr,
    num_q_heads, stride_ot, stride_oh, num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_QSL: tl.constexpr,
):
    """One (request, query head) program: merge the KV splits' partial softmaxes."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    if HAS_QSL:
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
    else:
        q_start = seq
        q_len = tl.where(seq_len > 0, 1, 0)
    has_query = (q_len > 0) & (seq_len > 0)

    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    # (vector < scalar), not (vector & scalar bool): the interpreter rejects the latter as a mask
    s_valid = offs_s < tl.where(has_query, num_splits, 0)
    part = (seq.to(tl.int64) * num_q_heads + head) * num_splits + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=s_valid, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_valid, other=0.0)
    m_max = tl.reduce(m, 0, tl.standard._elementwise_max)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.reduce(l * w, 0, tl.standard._sum_combine)
    acc = tl.load(part_acc_ptr + part[:, None] * D_PAD + offs_d[None, :], mask=s_valid[:, None], other=0.0)
    out = tl.reduce(acc * w[:, None], 0, tl.standard._sum_combine) / tl.where(total > 0.0, total, 1.0)
    o_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < tl.where(has_query, HEAD_DIM, 0))


@functools.lru_cache(maxsize=4)
def _kernel(source_name: str, interpret: bool):
    """A kernel, compiled (JITFunction) or interpreted (InterpretedFunction), chosen per call
    from TRITON_INTERPRET (``triton.jit`` would fix the choice at import; see ``fwht._kernel``)."""
    source = {"attention": _paged_attention_kernel_source, "merge": _merge_splits_kernel_source}[source_name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(source)
    return triton.runtime.JITFunction(source)


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------


def _check_args(query, cache, block_table, seq_lens, query_start_loc, head_dim, bits):
    """(num_seqs, Hkv, group) after checking shapes against the slot layout; raises ValueError."""
    slot = kv_slot_bytes(head_dim, bits)  # validates bits and head_dim
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must be [T, Hq, {head_dim}], got {tuple(query.shape)}")
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[3] != slot:
        raise ValueError(
            f"cache must be uint8 [num_blocks, Hkv, block_size, {slot}] for head_dim {head_dim} at {bits} "
            f"bits, got {cache.dtype} {tuple(cache.shape)}"
        )
    hq, hkv = query.shape[1], cache.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of the cache's {hkv} KV heads")
    if cache.stride(3) != 1 or cache.stride(2) != slot or cache.stride(0) % 4 or cache.stride(1) % 4:
        raise ValueError(f"cache strides {cache.stride()} are not those of whole int32-aligned slots")
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be int32/int64 [num_seqs, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    num_seqs = seq_lens.shape[0]
    if block_table.shape[0] < num_seqs:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for {num_seqs} sequences")
    if query_start_loc is not None and query_start_loc.shape[0] < num_seqs + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries for {num_seqs} sequences")
    return num_seqs, hkv, hq // hkv


def _launch(query, cache, block_table, seq_lens, query_start_loc, head_dim, bits, scale, sliding_window,
            output, max_query_len, max_seq_len, plan, interpret):
    num_seqs, hkv, group = _check_args(query, cache, block_table, seq_lens, query_start_loc, head_dim, bits)
    hq = query.shape[1]
    if output is not None and (output.shape != query.shape or output.dtype != query.dtype):
        raise ValueError(f"output must be {query.dtype} {tuple(query.shape)} like the query, got {output.dtype} "
                         f"{tuple(output.shape)}")
    out = output if output is not None else torch.empty_like(query)
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = 1 if query_start_loc is None else int((query_start_loc[1:num_seqs + 1]
                                                               - query_start_loc[:num_seqs]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens[:num_seqs].max())
    if plan is None:
        plan = plan_paged_attention(num_seqs, hkv, group, max_query_len, max_seq_len, query.device, bits=bits)
    if plan.num_splits > 1 and max_query_len > 1:
        raise ValueError(f"KV splits need a decode-only launch (max_query_len <= 1), got {max_query_len}")
    if query.stride(2) != 1:
        query = query.contiguous()
    if out.stride(2) != 1:
        raise ValueError("output must have a contiguous last dimension")
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    d_pad = _next_pow2(head_dim)
    splits = plan.num_splits
    if splits > 1:
        part_acc = torch.empty((num_seqs, hq, splits, d_pad), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((num_seqs, hq, splits, 2), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused
    fp32 = query.dtype == torch.float32
    # 16-bit codes for 16-bit queries: K as bf16 128 + c (bits <= 7) or fp16 1024 + c, V as
    # fp16 1024 + c; float32 queries keep float32 tiles (and tf32x3 dots).
    bf16 = query.dtype == torch.bfloat16
    k16 = plan.codes16 and not fp32 and not (bf16 and bits > 7)
    v16 = plan.codes16 and not fp32
    k16_magic, k16_off, k16_dtype = (_MAGIC_BF16, 128.0, tl.bfloat16) if bf16 else (_MAGIC_FP16, 1024.0, tl.float16)
    # Nibble words: 3 and 4 bits, with 16-bit codes (two per op). With float32 tiles Triton 3.6
    # (the GPU image) miscompiles them at a 16-token KV tile (wrong results on the H200, right
    # under the interpreter and at 32 or 64 tokens), so that combination takes whole words.
    unpack = plan.unpack if plan.unpack != 2 or (bits in (3, 4) and k16 and v16) else 1
    q_tiles = max(1, -(-max_query_len // plan.block_q))
    qsl = query_start_loc if query_start_loc is not None else seq_lens
    extra = {} if plan.num_stages is None else {"num_stages": plan.num_stages}
    if num_seqs > 65535:
        raise ValueError(f"{num_seqs} sequences in one launch: at most 65535 (a CUDA grid dimension)")
    _kernel("attention", interpret)[(q_tiles * splits, num_seqs, hkv)](
        query, out, cache.view(torch.int32), cache.view(torch.float16), cache, block_table, seq_lens, qsl,
        part_acc, part_ml,
        hq, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_table.stride(0),
        float(scale) * _LOG2E, int(sliding_window or 0),
        _MAGIC, k16_magic, _MAGIC_FP16, k16_magic * 0x10001, _MAGIC_FP16 * 0x10001,  # 0x10001: both halves
        splits,
        GROUP=group, GROUP_PAD=_next_pow2(group), BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n,
        HEAD_DIM=head_dim, D_PAD=d_pad, BITS=bits, SLOT=cache.shape[3], PAGE=cache.shape[2],
        SPLIT=splits > 1, HAS_QSL=query_start_loc is not None, HAS_WINDOW=sliding_window is not None,
        DOT_IN_FP32=interpret,
        QK_PRECISION="tf32x3" if fp32 else "exact16",
        PV_PRECISION="tf32x3" if fp32 else "tf32",
        UNPACK=unpack, K16=k16, K16_OFF=k16_off, K16_DTYPE=k16_dtype, V16=v16,
        num_warps=plan.num_warps, **extra,
    )
    if splits > 1:
        _kernel("merge", interpret)[(num_seqs, hq)](
            out, part_acc, part_ml, seq_lens, qsl, hq, out.stride(0), out.stride(1), splits,
            SPLITS_PAD=_next_pow2(splits), HEAD_DIM=head_dim, D_PAD=d_pad,
            HAS_QSL=query_start_loc is not None, num_warps=1,
        )
    return out


def _use_kernel(query: torch.Tensor) -> tuple[bool, bool]:
    interpret = _interpret_requested()
    ok = query.dtype in (torch.float16, torch.bfloat16, torch.float32) and (query.is_cuda or interpret)
    return ok, interpret


def paged_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    head_dim: int,
    bits: int,
    scale: float,
    sliding_window: int | None = None,
    output: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Causal attention of already-rotated queries ``[T, Hq, D]`` over the packed paged cache, as
    one Triton launch (two with KV splits): the contract of
    :func:`~hq_vllm.kernels.kv_cache.paged_attention_reference`, whose arguments it takes.

    ``max_query_len`` / ``max_seq_len``: host-side bounds (vLLM's metadata has both); they pick
    the launch shape only, never the result, and without them the tensors are read on the host
    (a sync). ``plan`` pins a launch configuration (:func:`plan_paged_attention`). Plain CPU
    tensors and float64 take the reference.
    """
    ok, interpret = _use_kernel(query)
    if not ok:
        return paged_attention_reference(query, cache, block_table, seq_lens, query_start_loc,
                                         head_dim=head_dim, bits=bits, scale=scale,
                                         sliding_window=sliding_window, output=output)
    return _launch(query, cache, block_table, seq_lens, query_start_loc, head_dim, bits, scale,
                   sliding_window, output, max_query_len, max_seq_len, plan, interpret)


def paged_attention_decode(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    head_dim: int,
    bits: int,
    scale: float,
    sliding_window: int | None = None,
    output: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Decode: query row ``i`` ``[num_seqs, Hq, D]`` is the newest token of sequence ``i``
    (``query_start_loc = arange(num_seqs + 1)`` in :func:`paged_attention`'s terms; a sequence
    of length 0 is padding and its row is left untouched)."""
    ok, interpret = _use_kernel(query)
    if query.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"decode takes one query row per sequence: {query.shape[0]} rows, "
                         f"{seq_lens.shape[0]} sequences")
    if not ok:  # the reference, on the rows of real sequences (length 0 = padding)
        keep = seq_lens > 0
        n = int(keep.sum())
        qsl = torch.arange(n + 1, device=query.device, dtype=torch.int32)
        out = output if output is not None else torch.empty_like(query)
        out[keep] = paged_attention_reference(query[keep], cache, block_table[:seq_lens.shape[0]][keep],
                                              seq_lens[keep], qsl, head_dim=head_dim, bits=bits, scale=scale,
                                              sliding_window=sliding_window)
        return out
    return _launch(query, cache, block_table, seq_lens, None, head_dim, bits, scale, sliding_window,
                   output, 1, max_seq_len, plan, interpret)
