"""The packed, rotated KV cache: slot layout, quantize + pack, unpack, paged attention (torch reference).

The Triton paged-attention kernel over this layout is ``kernels/paged_attention.py``
(``paged_attention``, same arguments as :func:`paged_attention_reference` here, tested against it).

K and V of one token and one KV head are quantized over ``head_dim`` (per token and head, dynamic)
after the online R3 Hadamard has rotated K (and Q, so QKᵀ is unchanged), and stored together in
one byte *slot* of the paged cache. vLLM's paged cache for one layer is then a ``uint8`` tensor
``[num_blocks, num_kv_heads, block_size, slot_bytes]`` (vLLM's ``[B, H, N, C]`` page with
``C = slot_bytes``), so a page is ``bits / 16`` of a bf16 page plus a few bytes of scales.

Slot layout (``D`` = head_dim, a multiple of 32; ``b`` = bits; all little-endian)::

    offset           bytes        what
    0                b*D/8        K codes: int32 words, ``kernels/packing.py`` layout of one row
    b*D/8            b*D/8        V codes: same
    2*b*D/8          2            K scale, float16
    2*b*D/8 + 2      2            V scale, float16
    2*b*D/8 + 4      1            K zero point, uint8 (``2**(b-1)`` when symmetric)
    2*b*D/8 + 5      1            V zero point, uint8
    2*b*D/8 + 6      0..3         padding to a multiple of 4 bytes (int32-aligned slots)

Codes are packed per row exactly like one output column of a weight (``pack_codes`` over K = D):
blocks of 32 channels, bit planes for b = 3 (3 words per 32 channels), nibbles for b = 4, bytes
for b = 8; a GPU kernel reads them with the same shifts and masks as the weight GEMMs.
Sizes: D = 64, b = 3 gives 56 bytes per token and head against 256 for bf16 (4.57x);
D = 128, b = 3: 104 against 512 (4.92x); b = 4: 72 / 136; b = 8: 136 / 264.

Quantization arithmetic (float32; the contract with the offline simulator,
``hq_vllm.offline.quantize.fake_quantize_kv``, which a test checks bit for bit): symmetric
``s = clip * absmax / (2**(b-1) - 1)``, asymmetric ``lo = clip * min(min(x), 0)``,
``hi = clip * max(max(x), 0)``, ``s = (hi - lo) / (2**b - 1)``; the scale is clamped to
float16's range ``[2**-24, 65504]`` and rounded to float16 (nearest) *before* the codes are
computed against it; ``z = clamp(round(-lo / s), 0, 2**b - 1)``,
``c = clamp(round(x / s) + z, 0, 2**b - 1)``; dequantized ``x' = (c - z) * s``.
"""

from __future__ import annotations

import math

import torch

from hq_vllm.kernels.packing import pack_codes, unpack_codes

__all__ = [
    "KV_BITS",
    "dequantize_kv_slots",
    "gather_kv",
    "kv_slot_bytes",
    "paged_attention_reference",
    "quantize_kv_to_slots",
    "write_kv_slots",
]

#: Bit widths the packed cache stores (16 = not quantized: vLLM's own cache is used).
KV_BITS = (2, 3, 4, 5, 6, 7, 8)
_FP16_MIN_SCALE = 2.0**-24
_FP16_MAX = 65504.0
_BLOCK = 32  # channels per packing block (kernels/packing.py)


def _check(head_dim: int, bits: int) -> None:
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"KV-cache bits must be one of {KV_BITS}, got {bits!r}")
    if head_dim <= 0 or head_dim % _BLOCK:
        raise ValueError(
            f"head_dim = {head_dim}: the packed KV cache needs a multiple of {_BLOCK} (codes are "
            f"packed in blocks of {_BLOCK} channels); serve this model with a 16-bit KV cache"
        )


def _code_bytes(head_dim: int, bits: int) -> int:
    return bits * head_dim // 8


def kv_slot_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one (token, KV head) slot: K and V codes, two float16 scales, two zero points,
    padded to a multiple of 4."""
    _check(head_dim, bits)
    raw = 2 * _code_bytes(head_dim, bits) + 6
    return (raw + 3) // 4 * 4


def _quantize_rows(x: torch.Tensor, bits: int, clip_ratio: float, symmetric: bool):
    """Codes uint8 ``[R, D]``, float16 scales ``[R]``, uint8 zeros ``[R]`` of rows ``x [R, D]``."""
    xf = x.to(torch.float32)
    if symmetric:
        maxq = 2 ** (bits - 1) - 1
        scale = clip_ratio * xf.abs().amax(-1, keepdim=True) / maxq
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        top = 2**bits - 1
    else:
        top = 2**bits - 1
        lo = clip_ratio * xf.amin(-1, keepdim=True).clamp(max=0)
        hi = clip_ratio * xf.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / top
    scale16 = scale.clamp(max=_FP16_MAX).clamp(min=_FP16_MIN_SCALE).to(torch.float16)
    s = scale16.to(torch.float32)
    if symmetric:
        codes = (torch.round(xf / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + zero)
    else:
        zero = torch.round(-lo / s).clamp(0, top)
        codes = (torch.round(xf / s) + zero).clamp(0, top)
    return codes.to(torch.uint8), scale16.squeeze(-1), zero.squeeze(-1).to(torch.uint8)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[R, D]`` -> packed bytes ``[R, b*D/8]`` (each row as one weight column)."""
    words = pack_codes(codes, bits).t().contiguous()  # [R, b*D/32] int32
    return words.view(torch.uint8)


def _unpack_rows(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Packed bytes ``[R, b*D/8]`` -> uint8 codes ``[R, D]``."""
    words = packed.contiguous().view(torch.int32)  # [R, b*D/32]
    return unpack_codes(words.t().contiguous(), bits, head_dim)


def quantize_kv_to_slots(
    key: torch.Tensor, value: torch.Tensor, bits: int, clip_ratio: float, symmetric: bool,
    value_clip_ratio: float | None = None,
) -> torch.Tensor:
    """Quantize and pack ``key`` / ``value`` ``[T, H, D]`` into slots ``uint8 [T, H, slot_bytes]``.

    ``key`` must already be rotated by R3 (the caller owns the rotation, so this stays a pure
    storage format); any float dtype, computed in float32. ``value_clip_ratio``: V's own clip
    (a layer's searched clips differ for K and V); None = ``clip_ratio`` for both.
    """
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [T, H, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    clips = (clip_ratio, clip_ratio if value_clip_ratio is None else value_clip_ratio)
    for c in clips:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"clip_ratio must lie in (0, 1], got {c!r}")
    t, h, d = key.shape
    slot = kv_slot_bytes(d, bits)
    cb = _code_bytes(d, bits)
    out = torch.zeros(t * h, slot, dtype=torch.uint8, device=key.device)
    if t == 0:
        return out.view(t, h, slot)
    for i, (x, clip) in enumerate(zip((key, value), clips)):
        codes, scale, zero = _quantize_rows(x.reshape(t * h, d), bits, clip, symmetric)
        out[:, i * cb:(i + 1) * cb] = _pack_rows(codes, bits)
        out[:, 2 * cb + 2 * i:2 * cb + 2 * i + 2] = scale.view(torch.uint8).view(-1, 2)
        out[:, 2 * cb + 4 + i] = zero
    return out.view(t, h, slot)


def dequantize_kv_slots(
    slots: torch.Tensor, head_dim: int, bits: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`quantize_kv_to_slots` up to rounding: slots ``uint8 [..., slot_bytes]``
    -> (K, V) ``[..., D]`` in ``dtype`` (``(c - z) * s`` in float32, then cast)."""
    slot = kv_slot_bytes(head_dim, bits)
    if slots.dtype != torch.uint8 or slots.shape[-1] != slot:
        raise ValueError(
            f"expected uint8 slots [..., {slot}] for head_dim {head_dim} at {bits} bits, got "
            f"{slots.dtype} [..., {slots.shape[-1]}]"
        )
    lead = slots.shape[:-1]
    flat = slots.reshape(-1, slot)
    cb = _code_bytes(head_dim, bits)
    out = []
    for i in range(2):
        codes = _unpack_rows(flat[:, i * cb:(i + 1) * cb], bits, head_dim).to(torch.float32)
        scale = flat[:, 2 * cb + 2 * i:2 * cb + 2 * i + 2].contiguous().view(torch.float16).to(torch.float32)
        zero = flat[:, 2 * cb + 4 + i:2 * cb + 5 + i].to(torch.float32)
        out.append(((codes - zero) * scale).to(dtype).view(*lead, head_dim))
    return out[0], out[1]


def write_kv_slots(cache: torch.Tensor, slots: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store slots ``[T, H, C]`` into the paged cache ``[num_blocks, H, block_size, C]`` at the
    flat positions ``slot_mapping [T]`` (``block * block_size + offset``; negative = padding,
    skipped), in place."""
    n_tokens = slot_mapping.shape[0]
    slots = slots[:n_tokens]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slots, slot_mapping = slots[keep], slot_mapping[keep]
    block_size = cache.shape[2]
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor").long()
    offsets = (slot_mapping % block_size).long()
    cache[blocks, :, offsets] = slots.to(cache.dtype)


def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Slots of the first ``seq_len`` tokens of one sequence, ``[H, seq_len, C]``, from its
    block ids (``[>= ceil(seq_len / block_size)]``)."""
    _, h, block_size, c = cache.shape
    n_blocks = math.ceil(seq_len / block_size)
    pages = cache[block_ids[:n_blocks].long()]  # [n, H, bs, C]
    return pages.permute(1, 0, 2, 3).reshape(h, n_blocks * block_size, c)[:, :seq_len]


def paged_attention_reference(
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
) -> torch.Tensor:
    """Causal attention of already-rotated queries ``[T, Hq, D]`` over the packed paged cache.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` (its newest
    ``q_len`` tokens, whose K/V are already in the cache) and ``seq_lens[i]`` cached tokens in
    blocks ``block_table[i]``; query ``j`` sits at position ``seq_len - q_len + j`` and attends to
    positions ``<=`` it (and, with a ``sliding_window`` ``w``, ``> position - w``, the
    convention of vLLM and transformers). Covers prefill, chunked prefill, prefix-cache hits and
    decode alike; with a window, blocks wholly before it are not read (vLLM may have freed them).
    GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``. Softmax in float32; the result
    (``[T, Hq, D]``, in ``query``'s dtype) is written into ``output`` when given.

    The definition of the result and the CPU path; a Python loop over requests that reads the
    lengths on the host. On the GPU the backend runs its Triton twin,
    ``hq_vllm.kernels.paged_attention.paged_attention``.
    """
    t, hq, d = query.shape
    hkv = cache.shape[1]
    if d != head_dim or hq % hkv:
        raise ValueError(f"query [T, {hq}, {d}] does not fit a cache of {hkv} KV heads, head_dim {head_dim}")
    group = hq // hkv
    block_size = cache.shape[2]
    out = output if output is not None else torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        first = 0  # first cached position any query of this request may see
        if sliding_window is not None:
            first = max(0, seq_len - q_len - sliding_window + 1) // block_size * block_size
        slots = gather_kv(cache, block_table[i][first // block_size:], seq_len - first)
        k, v = dequantize_kv_slots(slots, head_dim, bits)
        k = k.repeat_interleave(group, dim=0)  # [Hq, S, D]
        v = v.repeat_interleave(group, dim=0)
        q = query[q0:q1].to(torch.float32).transpose(0, 1)  # [Hq, q_len, D]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [Hq, q_len, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).view(-1, 1)
        k_pos = torch.arange(first, seq_len, device=query.device).view(1, -1)
        hidden = k_pos > q_pos
        if sliding_window is not None:
            hidden |= k_pos <= q_pos - sliding_window
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)
    return out
