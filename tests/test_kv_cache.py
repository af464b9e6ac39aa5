"""The packed KV cache (kernels/kv_cache.py): slot layout, bit-exactness against the offline
simulator's KV quantizer, paged writes and reads, and paged attention against dense attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hq_vllm.kernels.kv_cache import (
    dequantize_kv_slots,
    gather_kv,
    kv_slot_bytes,
    paged_attention_reference,
    quantize_kv_to_slots,
    write_kv_slots,
)
from hq_vllm.kernels.packing import unpack_codes
from hq_vllm.offline.quantize import fake_quantize_kv


def _kv(t, h, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # Rows with very different ranges (like real K after RoPE), a shifted mean (asymmetric case).
    spread = torch.exp(torch.randn(t, h, 1, generator=g))
    k = (torch.randn(t, h, d, generator=g) * spread + 0.3) * scale
    v = torch.randn(t, h, d, generator=g) * spread * scale
    return k, v


@pytest.mark.parametrize("d, bits, expected", [(64, 3, 56), (128, 3, 104), (64, 4, 72), (128, 4, 136),
                                               (64, 8, 136), (128, 2, 72)])
def test_slot_bytes(d, bits, expected):
    assert kv_slot_bytes(d, bits) == expected
    assert expected % 4 == 0


def test_unsupported_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        kv_slot_bytes(80, 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        kv_slot_bytes(64, 16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_round_trip_equals_the_simulators_quantizer(bits, symmetric, clip):
    """dequant(slots) is bit-identical to hq_vllm.offline.quantize.fake_quantize_kv: the served
    cache holds exactly what the simulator assumed."""
    k, v = _kv(37, 3, 64, seed=bits * 10 + symmetric)
    slots = quantize_kv_to_slots(k, v, bits, clip, symmetric)
    assert slots.shape == (37, 3, kv_slot_bytes(64, bits)) and slots.dtype == torch.uint8
    dk, dv = dequantize_kv_slots(slots, 64, bits)
    assert torch.equal(dk, fake_quantize_kv(k, bits, clip, symmetric))
    assert torch.equal(dv, fake_quantize_kv(v, bits, clip, symmetric))
    # and the quantization is real: close to the input, but not equal
    rel = float((dk - k).norm() / k.norm())
    assert 0 < rel < (1.0 if bits == 2 else 0.5)


def test_bfloat16_input_matches_simulator():
    k, v = _kv(9, 2, 128, seed=3)
    k, v = k.bfloat16(), v.bfloat16()
    dk, dv = dequantize_kv_slots(quantize_kv_to_slots(k, v, 3, 0.95, False), 128, 3, dtype=torch.bfloat16)
    assert torch.equal(dk, fake_quantize_kv(k, 3, 0.95, False))
    assert torch.equal(dv, fake_quantize_kv(v, 3, 0.95, False))


def test_slot_layout_is_the_documented_one():
    """K codes as bit-plane words, V codes, float16 scales, uint8 zeros, at their offsets."""
    k, v = _kv(5, 2, 64, seed=7)
    slots = quantize_kv_to_slots(k, v, 3, 1.0, False).view(10, -1)
    cb = 3 * 64 // 8
    k_codes = unpack_codes(slots[:, :cb].contiguous().view(torch.int32).t().contiguous(), 3, 64)
    k_scale = slots[:, 2 * cb:2 * cb + 2].contiguous().view(torch.float16).float()  # [10, 1]
    k_zero = slots[:, 2 * cb + 4:2 * cb + 5].float()
    rebuilt = (k_codes.float() - k_zero) * k_scale
    assert torch.equal(rebuilt.view(5, 2, 64), fake_quantize_kv(k, 3, 1.0, False))
    v_scale = slots[:, 2 * cb + 2:2 * cb + 4].contiguous().view(torch.float16).float()
    amax, amin = v.reshape(10, 64).amax(-1).clamp(min=0), v.reshape(10, 64).amin(-1).clamp(max=0)
    torch.testing.assert_close(v_scale.squeeze(-1), ((amax - amin) / 7).half().float())
    assert torch.all(slots[:, 2 * cb + 6:] == 0)  # padding


def test_zero_and_huge_rows_do_not_break():
    k = torch.zeros(2, 1, 32)
    v = torch.full((2, 1, 32), 1e6)
    dk, dv = dequantize_kv_slots(quantize_kv_to_slots(k, v, 3, 1.0, False), 32, 3)
    assert torch.equal(dk, k) and torch.isfinite(dv).all()


def test_paged_write_and_gather_round_trip():
    g = torch.Generator().manual_seed(0)
    blocks, h, bs = 6, 2, 4
    slot = kv_slot_bytes(32, 4)
    cache = torch.zeros(blocks, h, bs, slot, dtype=torch.uint8)
    k, v = _kv(7, h, 32, seed=1)
    slots = quantize_kv_to_slots(k, v, 4, 1.0, False)
    # a sequence living in blocks 4, 1 (positions 0..6), plus one padded token (-1)
    mapping = torch.tensor([16, 17, 18, 19, 4, 5, 6, -1])
    write_kv_slots(cache, torch.cat([slots, slots[:1]]), mapping)
    got = gather_kv(cache, torch.tensor([4, 1, 0]), 7)  # [H, 7, C]
    assert torch.equal(got, slots.transpose(0, 1))
    untouched = torch.ones(blocks, dtype=torch.bool)
    untouched[[4, 1]] = False
    assert torch.all(cache[untouched] == 0), "a padded token (-1) or stray write landed in the cache"
    del g


def _dense_attention(q, k, v, scale, q_pos, window=None):
    """Reference: plain causal softmax attention with GQA over dequantized K/V [S, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = k.shape[1]
    allowed = torch.arange(s).view(1, -1) <= q_pos.view(-1, 1)
    if window is not None:
        allowed &= torch.arange(s).view(1, -1) > q_pos.view(-1, 1) - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_dense_attention(window):
    """A batch mixing a fresh prefill, a chunked prefill continuing a cached prefix, and two
    decodes, in scattered blocks with GQA (6 query heads over 2 KV heads)."""
    d, hq, hkv, bs, bits = 64, 6, 2, 4, 3
    seqs = [(9, 9), (11, 4), (6, 1), (13, 1)]  # (seq_len, new query tokens)
    g = torch.Generator().manual_seed(5)
    n_blocks = 32
    perm = torch.randperm(n_blocks, generator=g)
    cache = torch.zeros(n_blocks, hkv, bs, kv_slot_bytes(d, bits), dtype=torch.uint8)
    block_table = torch.zeros(len(seqs), 8, dtype=torch.int32)
    queries, expected, used = [], [], 0
    for i, (seq_len, q_len) in enumerate(seqs):
        nb = math.ceil(seq_len / bs)
        block_table[i, :nb] = perm[used:used + nb]
        used += nb
        k, v = _kv(seq_len, hkv, d, seed=20 + i)
        positions = torch.arange(seq_len)
        mapping = block_table[i, positions // bs].long() * bs + positions % bs
        write_kv_slots(cache, quantize_kv_to_slots(k, v, bits, 0.95, False), mapping)
        q = torch.randn(q_len, hq, d, generator=g)
        queries.append(q)
        dk, dv = fake_quantize_kv(k, bits, 0.95, False), fake_quantize_kv(v, bits, 0.95, False)
        expected.append(_dense_attention(q, dk, dv, 0.125, positions[-q_len:], window))
    query = torch.cat(queries)
    qsl = torch.tensor([0] + [q for _, q in seqs]).cumsum(0)
    out = paged_attention_reference(query, cache, block_table, torch.tensor([s for s, _ in seqs]), qsl,
                                    head_dim=d, bits=bits, scale=0.125, sliding_window=window)
    want = torch.cat(expected)
    assert float((out - want).norm() / want.norm()) < 1e-5
