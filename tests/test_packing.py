"""Packing layout of low-bit codes (kernels/packing.py): round trips and the pinned bit layout."""

import pytest
import torch

from hq_vllm.kernels.packing import pack_codes, packed_rows, unpack_codes, uses_bit_planes


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [32, 64, 96, 160, 896])
def test_round_trip(bits, k):
    g = torch.Generator().manual_seed(1000 * bits + k)
    n = 13
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)
    q = pack_codes(codes, bits)
    assert q.dtype == torch.int32
    assert q.shape == (bits * k // 32, n) == (packed_rows(bits, k), n)
    assert q.is_contiguous()
    out = unpack_codes(q, bits, k)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_use_the_sign_bit(bits):
    """All-ones codes set bit 31 of every word: int32 words must be -1, not overflow."""
    codes = torch.full((3, 64), 2**bits - 1, dtype=torch.uint8)
    q = pack_codes(codes, bits)
    assert torch.equal(q, torch.full_like(q, -1))
    assert torch.equal(unpack_codes(q, bits, 64), codes)


def test_accepts_int_dtypes():
    codes = torch.randint(0, 8, (4, 32), dtype=torch.int64)
    assert torch.equal(pack_codes(codes, 3), pack_codes(codes.to(torch.int32), 3))
    assert torch.equal(pack_codes(codes, 3), pack_codes(codes.to(torch.uint8), 3))


def test_layout_4bit_dense_fields():
    """b = 4: channel k is in row k // 8 at bit offset 4 * (k % 8) (GPTQ's nibble order)."""
    codes = (torch.arange(64) % 16).view(1, 64).to(torch.uint8)
    codes = torch.cat([codes, codes.flip(1)])  # second column: reversed
    q = pack_codes(codes, 4)
    assert q.shape == (8, 2)
    assert [_u32(v) for v in q[:, 0].tolist()] == [0x76543210, 0xFEDCBA98] * 4
    assert [_u32(v) for v in q[:, 1].tolist()] == [0x89ABCDEF, 0x01234567] * 4


def test_layout_2bit_and_8bit_dense_fields():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 17] = 3  # row 17 // 16 = 1, offset 2 * (17 % 16) = 2
    assert [_u32(v) for v in pack_codes(codes, 2)[:, 0].tolist()] == [0, 3 << 2]
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 6] = 0xAB  # row 6 // 4 = 1, offset 8 * (6 % 4) = 16
    assert [_u32(v) for v in pack_codes(codes, 8)[:, 0].tolist()] == [0, 0xAB << 16] + [0] * 6


def test_layout_3bit_bit_planes():
    """b = 3: word row 3g + p holds bit p of the 32 codes of block g; bit j = channel 32g + j."""
    assert uses_bit_planes(3) and not uses_bit_planes(4)
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    codes[0, 5] = 0b101  # block 0, lane 5: planes 0 and 2
    codes[0, 40] = 0b110  # block 1, lane 8: planes 1 and 2
    codes[1, 63] = 0b011  # block 1, lane 31: planes 0 and 1 (the sign bit of the word)
    codes[1, 0] = 0b111  # block 0, lane 0: every plane
    q = pack_codes(codes, 3)
    assert q.shape == (6, 2)
    assert [_u32(v) for v in q[:, 0].tolist()] == [1 << 5, 0, 1 << 5, 0, 1 << 8, 1 << 8]
    assert [_u32(v) for v in q[:, 1].tolist()] == [1, 1, 1, 1 << 31, 1 << 31, 0]
    assert q[3, 1].item() == -(2**31)
    assert torch.equal(unpack_codes(q, 3, 64), codes)


@pytest.mark.parametrize("k", [0, 16, 48, 100])
def test_bad_k_names_k(k):
    with pytest.raises(ValueError, match=f"K .*= {k}"):
        pack_codes(torch.zeros(4, k, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=f"K .*= {k}"):
        packed_rows(3, k)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(4, 32, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bits"):
        packed_rows(0, 32)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.full((4, 32), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.full((4, 32), -1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(torch.zeros(4, 32), 3)
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.zeros(32, dtype=torch.uint8), 3)
    q = pack_codes(torch.zeros(4, 64, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="rows"):
        unpack_codes(q, 3, 32)
    with pytest.raises(ValueError, match="int32"):
        unpack_codes(q.to(torch.int64), 3, 64)
