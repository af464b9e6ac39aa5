"""Packing of low-bit unsigned integer codes into int32 words (plain-torch reference).

This is the on-disk and in-GPU-memory layout of every quantized linear weight in a hadaquant
checkpoint (``prefix.qweight``, see ``hq_vllm/format.py``). The GEMM kernels read it directly,
so it is chosen for them, not for the CPU.

Layout
------
A linear weight ``W`` of shape ``[N out, K in]`` is quantized to unsigned codes
``c[n, k]`` in ``[0, 2**b)``. The packed tensor ``qweight`` is ``int32`` of shape
``[b * K // 32, N]``:

* **K-major, like GPTQ.** Packing runs along the input dimension K; the output dimension N is the
  contiguous (last) one. Consecutive GPU threads, each owning one output column, therefore read
  consecutive words of one row: coalesced loads, and a K-tile of ``32 * t`` channels is exactly
  ``b * t`` whole rows for every bit width.
* **Blocks of 32 input channels.** Channels ``k = 32*g .. 32*g + 31`` live in the ``b`` word rows
  ``g*b .. g*b + b - 1`` (of every column). Hence ``K`` must be a multiple of 32.
* **Dense fields** when ``32 % b == 0`` (b = 1, 2, 4, 8): each word holds ``v = 32 // b`` codes.
  The code of channel ``32*g + w*v + j`` is bits ``[j*b, j*b + b)`` of word row ``g*b + w``
  (little-endian fields; for b = 4 this is exactly GPTQ's nibble order: channel ``k`` is in row
  ``k // 8`` at bit offset ``4 * (k % 8)``).
* **Bit planes** otherwise (b = 3, 5, 6, 7): word row ``g*b + p`` holds bit ``p`` of the 32 codes
  of the block; bit ``j`` of that word is bit ``p`` of the code of channel ``32*g + j``.
  Why planes: a 3-bit field would straddle word boundaries (32 is not a multiple of 3), which makes
  GPU unpacking irregular. With planes every channel is unpacked by the same shifts and masks,
  ``c = sum_p ((word[p] >> j) & 1) << p``, and a warp lane ``j`` reads bit ``j``.

Words are stored as ``int32`` because that is what safetensors, torch and Triton handle
everywhere; bit 31 is the sign bit, so packing is done in int64 and then reinterpreted
(two's complement), and unpacking masks back to ``[0, 2**32)`` before shifting.

Example (b = 4, one column, K = 32): codes ``0, 1, 2, ..., 15, 0, 1, ...`` pack into row 0 =
``0x76543210``, row 1 = ``0xFEDCBA98``, row 2 = ``0x76543210``, row 3 = ``0xFEDCBA98``.
Example (b = 3, one column, K = 32): if only channel 5 has code ``0b101`` and all other codes are
zero, rows 0, 1, 2 are ``1 << 5``, ``0``, ``1 << 5``.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_BITS", "MIN_BITS", "pack_codes", "packed_rows", "unpack_codes", "uses_bit_planes"]

MIN_BITS = 1
MAX_BITS = 8
_BLOCK = 32  # input channels per packing block; one int32 word holds one bit of each


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k % _BLOCK != 0:
        raise ValueError(
            f"K (input features) = {k!r} must be a positive multiple of {_BLOCK}: codes are packed "
            f"in blocks of {_BLOCK} input channels"
        )


def uses_bit_planes(bits: int) -> bool:
    """True when ``bits`` codes are stored as bit planes (32 is not a multiple of ``bits``)."""
    _check_bits(bits)
    return _BLOCK % bits != 0


def packed_rows(bits: int, k: int) -> int:
    """Number of int32 rows of ``qweight`` for ``k`` input channels: ``bits * k // 32``."""
    _check_bits(bits)
    _check_k(k)
    return bits * k // _BLOCK


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2**32) as int32 (two's complement), without overflow UB."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[N, K]`` (values in ``[0, 2**bits)``) into int32 ``[bits*K//32, N]``.

    Accepts any integer dtype; values out of range are an error rather than silently truncated,
    because a truncated code is a wrong weight that no later check would catch.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    n, k = codes.shape
    _check_k(k)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
            f"got range [{int(c.min())}, {int(c.max())}]"
        )
    c = c.t()  # [K, N]: packing runs along K, N stays contiguous
    if not uses_bit_planes(bits):
        per_word = _BLOCK // bits
        fields = c.reshape(k // per_word, per_word, n)
        shifts = (torch.arange(per_word, device=c.device, dtype=torch.int64) * bits).view(1, -1, 1)
        words = (fields << shifts).sum(dim=1)  # fields are disjoint, so sum == bitwise or
        return _to_int32(words).contiguous()
    blocks = c.reshape(k // _BLOCK, _BLOCK, n)
    lane = torch.arange(_BLOCK, device=c.device, dtype=torch.int64).view(1, -1, 1)
    planes = [(((blocks >> p) & 1) << lane).sum(dim=1) for p in range(bits)]  # each [K/32, N]
    words = torch.stack(planes, dim=1).reshape(bits * k // _BLOCK, n)
    return _to_int32(words).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[bits*k//32, N]`` to uint8 codes ``[N, k]``."""
    _check_bits(bits)
    _check_k(k)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(
            f"qweight must be a 2-D int32 tensor, got {qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    rows = packed_rows(bits, k)
    if qweight.shape[0] != rows:
        raise ValueError(
            f"qweight has {qweight.shape[0]} rows but {bits}-bit codes for K = {k} need {rows}"
        )
    n = qweight.shape[1]
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    mask = 2**bits - 1
    if not uses_bit_planes(bits):
        per_word = _BLOCK // bits
        shifts = (torch.arange(per_word, device=words.device, dtype=torch.int64) * bits).view(1, -1, 1)
        c = (words.unsqueeze(1) >> shifts) & mask  # [K/per_word, per_word, N]
    else:
        planes = words.reshape(k // _BLOCK, bits, n)
        lane = torch.arange(_BLOCK, device=words.device, dtype=torch.int64).view(1, -1, 1)
        c = torch.zeros(k // _BLOCK, _BLOCK, n, dtype=torch.int64, device=words.device)
        for p in range(bits):
            c |= ((planes[:, p : p + 1, :] >> lane) & 1) << p
    return c.reshape(k, n).t().to(torch.uint8).contiguous()
