"""The KV-cache write (R3 rotate + quantize + pack + store) as one Triton kernel.

What an attention layer stores for its new tokens, per token and KV head (the slot layout and
the quantization arithmetic are ``kernels/kv_cache.py``'s; this module adds no format)::

    K' = hadamard_transform(K)                 # R3, in K's dtype (optional: ``rotate``)
    slot = pack(quantize(K'), quantize(V))     # codes, float16 scales, zero points
    cache[slot_mapping[t] // page, h, slot_mapping[t] % page] = slot   (slot_mapping < 0: skip)

Two implementations with one signature:

* :func:`write_kv_cache_reference`: plain torch, ``hadamard_transform_reference`` then
  ``quantize_kv_to_slots`` then ``write_kv_slots``. The definition, and the CPU path. It reads
  the slot mapping on the host (``write_kv_slots`` drops the padding rows), so it cannot be
  captured in a CUDA graph.
* :func:`write_kv_cache`: one launch. Nothing is read on the host (the slot of each token is
  loaded by the kernel, negative slots are masked stores), so it is CUDA-graph capturable; a
  vLLM backend whose cache write uses it may allow full graphs for its attention
  (``hq_vllm/attention.py``).

Kernel design. A program owns ``ROWS`` consecutive (token, KV head) rows (``row = token * H +
head``) as a ``[ROWS, D_PAD]`` register tile, from the load to the store: the quantization
scale needs the whole row before the first code, and K and V of a row share one slot.

1. **R3 on K** as a tensor-core product ``K · H_D`` (float32 accumulation; the ±1 products of
   16-bit inputs are exact), times ``1/sqrt(D)``, rounded to K's dtype as
   ``hadamard_transform`` rounds. Power-of-two ``D <= 128`` (the supported models: 64, 128):
   ``H_D`` is Sylvester's, generated in registers from popcount parity (as ``fwht.py`` does
   for the same sizes: the same single product), so there is no table and nothing to copy to
   the device, ever (a table made on the first call inside a CUDA-graph capture would be
   garbage). Other ``D`` (multiples of 32 with a Hadamard order, e.g. 96 = 12·8): a cached
   zero-padded ``[D_PAD, D_PAD]`` table (``hadamard_matrix(D)``) streamed in 32-channel
   chunks with K, so no program holds the whole table; its first call must not be inside a
   capture (vLLM's warm-up runs eager first; a capture that would build it raises).
2. **Quantize** each row exactly as ``kv_cache._quantize_rows``: float32, the scale by IEEE
   division (``div_rn``; Triton's ``/`` is approximate on the GPU), clamped to float16's range
   and rounded to float16 before the codes are computed against it, ``x / s`` by ``div_rn``
   per element, round half to even (``rint``; the interpreter, which has no libdevice, adds and
   subtracts 1.5·2^23), clamps on the integer range (clamping before rounding gives the same
   integers, and keeps the interpreter's trick in range). Compiled without FMA contraction
   (``enable_fp_fusion=False``): ``clip * max - clip * min`` fused into one FMA would round
   differently from torch's two products. Zero-padded channels (``D_PAD > D``)
   leave the row's max, min and absmax unchanged (the reference clamps min <= 0 <= max).
3. **Pack** with ``kernels/packing.py``'s layout: dense fields (2, 4, 8 bits) as a reshape to
   ``[ROWS, words, fields]``, shifts and a sum (the fields are disjoint, so the sum is the or);
   bit planes (3, 5, 6, 7 bits) as one such sum of 32 lanes per plane. In uint32, bitcast to
   int32 for the store. The slot is written whole as int32 words: K codes, V codes, one word of
   the two float16 scales, one of the two zero points (its padding bytes 0, as the
   reference's).

Rounding: for float32 input without R3 the bytes equal the reference's exactly; with R3 the
product's summation order differs from the reference's butterflies (on the GPU also the
tensor cores' accumulation), which can move a rotated value across a rounding boundary of
K's dtype or a code boundary: a rare code one off, rarely a row's scale one float16 ulp off
(the tests bound both). That is also how today's GPU path differs from this reference, since
it rotates with the Triton FWHT.

Dispatch: the kernel runs for float16/bfloat16/float32 K/V on CUDA, or anywhere with
``TRITON_INTERPRET=1`` (read at call time, as in ``fwht.py``); otherwise the reference.
Registered as ``torch.ops.hadaquant.write_kv_cache`` (mutates ``kv_cache``; opaque to
torch.compile).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fwht import hadamard_transform_reference
from .hadamard import hadamard_factor, hadamard_matrix
from .kv_cache import KV_BITS, kv_slot_bytes, quantize_kv_to_slots, write_kv_slots

__all__ = ["compile_for_gpu", "write_kv_cache", "write_kv_cache_op", "write_kv_cache_reference"]

# ---------------------------------------------------------------------------------------------
# Tunables, all in one place.
# ---------------------------------------------------------------------------------------------
_MIN_DOT = 16  # tl.dot needs every dimension >= 16: the least rows per program
#: Elements of the [ROWS, D_PAD] tile per program (ROWS = this / D_PAD, >= 16). In the sm_90a build
#: (Triton 3.9, ptxas -v) 2048 with 4 warps takes 103-154 registers (head_dim 128: 3-bit R3 127,
#: 8-bit 154, no R3 103) without spills, 4096 took 200-209; float32 K with R3 spills a little
#: (not the serving path). Untimed: benchmarks/kv_write_bench.py --sweep measures the choices.
_ROW_ELEMS = 2048
_MAX_IN_REGISTER_H = 128  # power-of-two head dims up to this: H_D generated in registers
_TABLE_CHUNK = 32  # channels per step of the table product (other head dims)
_NUM_WARPS = 4
_FP32_DOT_PRECISION = "tf32x3"  # float32 K on the GPU, as fwht.py
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _rotate_mode(head_dim: int, rotate: bool) -> int:
    """0: no R3; 1: Sylvester H_D in registers; 2: a cached table (other head dims)."""
    if not rotate:
        return 0
    hadamard_factor(head_dim)  # raises UnsupportedHadamardSize for a size nothing covers
    if head_dim & (head_dim - 1) == 0 and head_dim <= _MAX_IN_REGISTER_H:
        return 1
    return 2


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    bits: int,
    clip_ratio: float,
    symmetric: bool,
    value_clip_ratio: float | None = None,
    rotate: bool,
) -> None:
    """Rotate (R3, when ``rotate``) the first ``slot_mapping.shape[0]`` rows of ``key [T, H, D]``,
    quantize and pack them with ``value``'s into slots and store them in the paged cache
    ``[num_blocks, H, block_size, slot_bytes]`` at ``slot_mapping`` (flat ``block * block_size
    + offset``; negative = padding, skipped), in place. ``value_clip_ratio``: V's clip (None:
    ``clip_ratio``). Reads the slot mapping on the host."""
    n = slot_mapping.shape[0]
    k = key[:n]
    if rotate:
        k = hadamard_transform_reference(k)
    slots = quantize_kv_to_slots(k, value[:n], bits, clip_ratio, symmetric, value_clip_ratio=value_clip_ratio)
    write_kv_slots(kv_cache, slots, slot_mapping)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


def _kv_write_kernel_source(
    key_ptr, value_ptr, cache_ptr, slot_ptr, table_ptr,
    n_rows, stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_cs,
    k_clip, v_clip, q_div, rot_scale,
    NUM_KV_HEADS: tl.constexpr,
    PAGE: tl.constexpr,  # vLLM block size (tokens per page)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    ROTATE: tl.constexpr,  # 0 none, 1 Sylvester in registers, 2 table streamed in chunks
    CHUNK: tl.constexpr,
    ROUND_TO_INPUT: tl.constexpr,  # round the rotated K to its 16-bit dtype
    BF16_BITS_ROUND: tl.constexpr,  # that rounding with integer ops (the interpreter truncates)
    DOT_IN_FP32: tl.constexpr,  # interpreter: dots in float32 (numpy has no bfloat16)
    DOT_PRECISION: tl.constexpr,
    NATIVE_RINT: tl.constexpr,  # GPU: libdevice rint; interpreter: the 1.5 * 2**23 trick
):
    """One program: ROWS (token, KV head) rows; see the module docstring.

    Only core builtins (tl.full, tl.reduce with the standard combiners, tl.math.div_rn): the
    source is built compiled or interpreted at call time (see ``fwht._kernel``). K and V share
    the loop body (``static_range(2)``, unrolled at compile time).
    """
    MAGIC: tl.constexpr = 12582912.0  # 1.5 * 2**23: (v + MAGIC) - MAGIC rounds half to even
    PLANES: tl.constexpr = (32 % BITS) != 0
    PER_WORD: tl.constexpr = 32 // BITS  # dense fields per word (unused for planes)
    CODE_WORDS: tl.constexpr = BITS * HEAD_DIM // 32  # int32 words of K (or V) codes
    NBLK: tl.constexpr = D_PAD // 32  # 32-channel packing blocks of the padded row
    TOP: tl.constexpr = (1 << BITS) - 1
    HALF: tl.constexpr = 1 << (BITS - 1)

    offs_r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_valid = offs_r < n_rows
    tok = offs_r // NUM_KV_HEADS
    head = offs_r % NUM_KV_HEADS
    slot = tl.load(slot_ptr + tok, mask=r_valid, other=-1).to(tl.int64)
    store_row = r_valid & (slot >= 0)
    slot_c = tl.where(store_row, slot, 0)
    # the slot's first int32 word in the cache
    base = (slot_c // PAGE) * stride_cb + head * stride_ch + (slot_c % PAGE) * stride_cs

    offs_d = tl.arange(0, D_PAD)
    d_valid = offs_d < HEAD_DIM
    ld_mask = r_valid[:, None] & d_valid[None, :]

    scale_word = tl.full([ROWS], 0, tl.uint32)
    zero_word = tl.full([ROWS], 0, tl.uint32)
    for which in tl.static_range(2):  # 0: K, 1: V
        if which == 0:
            row_ptr = key_ptr + tok * stride_kt + head * stride_kh
            clip = k_clip
        else:
            row_ptr = value_ptr + tok * stride_vt + head * stride_vh
            clip = v_clip
        # (nested ifs on constexprs: Triton 3.6, the GPU image's, refuses chained and/or)
        if which == 0:
            if ROTATE == 1:
                x = tl.load(row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0)
                # H_D[i, j] = (-1)^popcount(i & j): Sylvester's matrix, as fwht.py's kernel
                hb = offs_d[:, None] & offs_d[None, :]
                hb = hb ^ (hb >> 8)
                hb = hb ^ (hb >> 4)
                hb = hb ^ (hb >> 2)
                hb = hb ^ (hb >> 1)
                h = 1.0 - 2.0 * (hb & 1).to(tl.float32)
                if DOT_IN_FP32:
                    y = tl.dot(x.to(tl.float32), h, input_precision=DOT_PRECISION)
                else:
                    y = tl.dot(x, h.to(x.dtype), input_precision=DOT_PRECISION)
                y = y * rot_scale
            elif ROTATE == 2:
                y = tl.full([ROWS, D_PAD], 0.0, tl.float32)
                offs_c = tl.arange(0, CHUNK)
                for c0 in range(0, HEAD_DIM, CHUNK):
                    xc = tl.load(row_ptr[:, None] + (c0 + offs_c)[None, :],
                                 mask=r_valid[:, None] & ((c0 + offs_c) < HEAD_DIM)[None, :], other=0.0)
                    hc = tl.load(table_ptr + (c0 + offs_c)[:, None] * D_PAD + offs_d[None, :])
                    if DOT_IN_FP32:
                        xc, hc = xc.to(tl.float32), hc.to(tl.float32)
                    y = tl.dot(xc, hc, y, input_precision=DOT_PRECISION)
                y = y * rot_scale
            else:
                y = tl.load(row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0).to(tl.float32)
            if ROTATE != 0:
                if ROUND_TO_INPUT:
                    if BF16_BITS_ROUND:
                        yb = y.to(tl.int32, bitcast=True)
                        y = ((yb + 0x7FFF + ((yb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                    else:
                        y = y.to(key_ptr.dtype.element_ty).to(tl.float32)
        else:
            y = tl.load(row_ptr[:, None] + offs_d[None, :], mask=ld_mask, other=0.0).to(tl.float32)

        # Scale and zero point (kv_cache._quantize_rows, operation for operation).
        if SYMMETRIC:
            amax = tl.reduce(tl.abs(y), 1, tl.standard._elementwise_max)
            scale = tl.math.div_rn(clip * amax, q_div)
        else:
            lo = clip * tl.minimum(tl.reduce(y, 1, tl.standard._elementwise_min), 0.0)
            hi = clip * tl.maximum(tl.reduce(y, 1, tl.standard._elementwise_max), 0.0)
            scale = tl.math.div_rn(hi - lo, q_div)
        scale = tl.maximum(tl.minimum(scale, 65504.0), 5.960464477539063e-08)  # float16's range
        s16 = scale.to(tl.float16)
        s = s16.to(tl.float32)
        q = tl.math.div_rn(y, tl.broadcast_to(s[:, None], [ROWS, D_PAD]))
        if SYMMETRIC:
            zero = tl.full([ROWS], HALF, tl.float32)
            q = tl.minimum(tl.maximum(q, -HALF * 1.0), HALF - 1.0)
        else:
            zq = tl.minimum(tl.maximum(tl.math.div_rn(-lo, s), 0.0), TOP * 1.0)
            if NATIVE_RINT:
                zero = libdevice.rint(zq)
            else:
                zero = (zq + MAGIC) - MAGIC
            q = tl.minimum(tl.maximum(q, -zero[:, None]), TOP - zero[:, None])
        if NATIVE_RINT:
            q = libdevice.rint(q)
        else:
            q = (q + MAGIC) - MAGIC
        codes = (q + zero[:, None]).to(tl.int32).to(tl.uint32)  # [ROWS, D_PAD], in [0, TOP]

        # Pack (kernels/packing.py's layout of one row) and store the code words.
        code_base = base + which * CODE_WORDS
        if PLANES:
            lane = tl.arange(0, 32).to(tl.uint32)
            offs_b = tl.arange(0, NBLK)
            b_mask = store_row[:, None] & (offs_b < HEAD_DIM // 32)[None, :]
            for p in tl.static_range(BITS):
                bit = tl.reshape((codes >> p) & 1, [ROWS, NBLK, 32])
                word = tl.reduce(bit << lane[None, None, :], 2, tl.standard._sum_combine)  # [ROWS, NBLK]
                tl.store(cache_ptr + code_base[:, None] + (offs_b * BITS + p)[None, :],
                         word.to(tl.int32, bitcast=True), mask=b_mask)
        else:
            field = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)
            offs_w = tl.arange(0, D_PAD // PER_WORD)
            fields = tl.reshape(codes, [ROWS, D_PAD // PER_WORD, PER_WORD])
            word = tl.reduce(fields << field[None, None, :], 2, tl.standard._sum_combine)  # [ROWS, words]
            tl.store(cache_ptr + code_base[:, None] + offs_w[None, :], word.to(tl.int32, bitcast=True),
                     mask=store_row[:, None] & (offs_w < CODE_WORDS)[None, :])
        scale_word = scale_word | (s16.to(tl.uint16, bitcast=True).to(tl.uint32) << (16 * which))
        zero_word = zero_word | (zero.to(tl.int32).to(tl.uint32) << (8 * which))

    # The scales word (K low half, V high half) and the zero points word (K, V, two zero bytes).
    tl.store(cache_ptr + base + 2 * CODE_WORDS, scale_word.to(tl.int32, bitcast=True), mask=store_row)
    tl.store(cache_ptr + base + 2 * CODE_WORDS + 1, zero_word.to(tl.int32, bitcast=True), mask=store_row)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """Compiled (JITFunction) or interpreted (InterpretedFunction), chosen per call."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_kv_write_kernel_source)
    return triton.runtime.JITFunction(_kv_write_kernel_source)


_TABLES: dict = {}


def _table(head_dim: int, d_pad: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``hadamard_matrix(head_dim)`` zero-padded to ``[d_pad, d_pad]`` on the device, cached.
    Building it copies from the host, which a CUDA-graph capture cannot contain: refused there."""
    key = (head_dim, d_pad, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"write_kv_cache: the R3 table for head_dim {head_dim} would be built inside a CUDA-graph "
                "capture (a host-to-device copy); run one eager call first"
            )
        h = torch.zeros(d_pad, d_pad, dtype=torch.float32)
        h[:head_dim, :head_dim] = hadamard_matrix(head_dim)
        table = _TABLES[key] = h.to(dtype=dtype, device=device).contiguous()
    return table


def _launch_config(head_dim: int, bits: int, dtype: torch.dtype, symmetric: bool, rotate: bool,
                   interpret: bool) -> dict:
    """The constexprs of one launch (and the table's dtype under ``"table_dtype"``)."""
    mode = _rotate_mode(head_dim, rotate)
    d_pad = _next_pow2(head_dim)
    fp32 = dtype == torch.float32
    return dict(
        HEAD_DIM=head_dim, D_PAD=d_pad, BITS=bits, ROWS=max(_MIN_DOT, _ROW_ELEMS // d_pad),
        SYMMETRIC=bool(symmetric), ROTATE=mode, CHUNK=_TABLE_CHUNK,
        ROUND_TO_INPUT=not fp32,
        # Triton's interpreter converts float32 to bfloat16 by truncation; the GPU rounds to
        # nearest even, which the integer form computes exactly (hadamard_quant.py does the same).
        BF16_BITS_ROUND=interpret and dtype == torch.bfloat16,
        # Triton's interpreter multiplies 16-bit tiles as raw bits (numpy has no bfloat16):
        # there the operands go to the dot as float32 (same values: the ±1 products are exact).
        DOT_IN_FP32=interpret,
        DOT_PRECISION="ieee" if interpret else (_FP32_DOT_PRECISION if fp32 else None),
        NATIVE_RINT=not interpret,
    )


def _check_args(key, value, kv_cache, slot_mapping, bits, clip_ratio, value_clip_ratio) -> int:
    """Validate shapes, dtypes and strides (host-side metadata only); return the slot bytes."""
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"KV-cache bits must be one of {KV_BITS}, got {bits!r}")
    for c in (clip_ratio, clip_ratio if value_clip_ratio is None else value_clip_ratio):
        if not 0.0 < c <= 1.0:
            raise ValueError(f"clip_ratio must lie in (0, 1], got {c!r}")
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be [T, H, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    t, h, d = key.shape
    slot = kv_slot_bytes(d, bits)  # validates head_dim
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] > t or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [<= {t}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[1] != h or kv_cache.shape[3] != slot:
        raise ValueError(f"kv_cache must be uint8 [num_blocks, {h}, block_size, {slot}] for head_dim {d} at "
                         f"{bits} bits, got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    if kv_cache.stride(3) != 1 or any(s % 4 for s in kv_cache.stride()[:3]) or kv_cache.storage_offset() % 4:
        raise ValueError(f"kv_cache strides {kv_cache.stride()} are not those of whole int32-aligned slots")
    return slot


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    bits: int,
    clip_ratio: float,
    symmetric: bool,
    value_clip_ratio: float | None = None,
    rotate: bool,
) -> None:
    """:func:`write_kv_cache_reference` as one Triton launch, without host synchronisation.

    ``key`` / ``value`` ``[T, H, D]`` bf16/fp16/fp32 (any strides with a contiguous last dim;
    only the first ``slot_mapping.shape[0]`` rows are read) on CUDA, or anywhere with
    ``TRITON_INTERPRET=1``; other inputs take the reference."""
    _check_args(key, value, kv_cache, slot_mapping, bits, clip_ratio, value_clip_ratio)
    interpret = _interpret_requested()
    cfg = _launch_config(key.shape[2], bits, key.dtype, symmetric, rotate, interpret)
    supported = key.dtype in _SUPPORTED_DTYPES and value.dtype in _SUPPORTED_DTYPES
    if not supported or not ((key.is_cuda and kv_cache.is_cuda) or interpret):
        write_kv_cache_reference(key, value, kv_cache, slot_mapping, bits=bits, clip_ratio=clip_ratio,
                                 symmetric=symmetric, value_clip_ratio=value_clip_ratio, rotate=rotate)
        return
    n = slot_mapping.shape[0]
    _, h, d = key.shape
    if n == 0:
        return
    if key.stride(2) != 1:
        key = key.contiguous()
    if value.stride(2) != 1:
        value = value.contiguous()
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    fp32 = key.dtype == torch.float32
    table = (_table(d, cfg["D_PAD"], torch.float32 if (fp32 or interpret) else key.dtype, key.device)
             if cfg["ROTATE"] == 2 else slot_mapping)  # unused without a table
    q_div = float(2 ** (bits - 1) - 1) if symmetric else float(2**bits - 1)
    v_clip = clip_ratio if value_clip_ratio is None else value_clip_ratio
    rows = n * h
    _kernel(interpret)[(triton.cdiv(rows, cfg["ROWS"]),)](
        key, value, kv_cache.view(torch.int32), slot_mapping, table,
        rows, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0) // 4, kv_cache.stride(1) // 4, kv_cache.stride(2) // 4,
        float(clip_ratio), float(v_clip), q_div, 1.0 / math.sqrt(d),
        NUM_KV_HEADS=h, PAGE=kv_cache.shape[2], **cfg, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for_gpu(head_dim: int, bits: int, dtype: torch.dtype = torch.bfloat16, symmetric: bool = False,
                    rotate: bool = True, num_kv_heads: int = 8, page: int = 16, arch: int = 90):
    """Compile the kernel for ``sm_<arch>`` without a GPU (Triton's bundled ptxas), as the JIT
    would: returns Triton's compiled kernel (``asm["ptx"]``, ``asm["cubin"]``). For checking on
    a CPU machine that the GPU-only paths (libdevice, native conversions, tensor-core dots)
    build."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _launch_config(head_dim, bits, dtype, symmetric, rotate, interpret=False)
    cfg.update(NUM_KV_HEADS=num_kv_heads, PAGE=page)
    ty = _TRITON_TYPES[dtype]
    table_ty = "fp32" if dtype == torch.float32 else ty
    sig = {
        "key_ptr": f"*{ty}", "value_ptr": f"*{ty}", "cache_ptr": "*i32", "slot_ptr": "*i64",
        "table_ptr": f"*{table_ty}" if cfg["ROTATE"] == 2 else "*i64",
        "n_rows": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
        "stride_cb": "i32", "stride_ch": "i32", "stride_cs": "i32",
        "k_clip": "fp32", "v_clip": "fp32", "q_div": "fp32", "rot_scale": "fp32",
    }
    names = list(sig) + list(_kv_write_kernel_source.__code__.co_varnames[len(sig):len(sig) + len(cfg)])
    sig.update({k: "constexpr" for k in cfg})
    src = ASTSource(_kernel(False), sig, constexprs={(names.index(k),): v for k, v in cfg.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]]
                           for k in ("key_ptr", "value_ptr", "cache_ptr", "slot_ptr", "table_ptr")})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": _NUM_WARPS, "enable_fp_fusion": False})


# ---------------------------------------------------------------------------------------------
# Custom op: opaque to torch.compile, capturable in CUDA graphs
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("hadaquant::write_kv_cache", mutates_args=("kv_cache",))
def write_kv_cache_op(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      bits: int, clip_ratio: float, symmetric: bool, value_clip_ratio: float | None,
                      rotate: bool) -> None:
    """:func:`write_kv_cache` as ``torch.ops.hadaquant.write_kv_cache`` (in place on ``kv_cache``)."""
    write_kv_cache(key, value, kv_cache, slot_mapping, bits=bits, clip_ratio=clip_ratio, symmetric=symmetric,
                   value_clip_ratio=value_clip_ratio, rotate=rotate)


@write_kv_cache_op.register_fake
def _(key, value, kv_cache, slot_mapping, bits, clip_ratio, symmetric, value_clip_ratio, rotate):
    return None
