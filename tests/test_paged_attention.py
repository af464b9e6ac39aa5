"""Paged attention over the packed KV cache (kernels/paged_attention.py): Triton kernel vs the
torch reference (kernels/kv_cache.py's ``paged_attention_reference``).

The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, read at call time and set
per test with monkeypatch, as in test_fwht.py / test_gemm.py); the fixture makes the module's
reference fallback raise, so what is compared is the kernel. The cache is built through the real
write path (``quantize_kv_to_slots`` + ``write_kv_slots``) from fresh random K/V, in pages
scattered by a random permutation, and every byte the batch does not own (other pages, the tail
of a sequence's last page) is random garbage: a kernel that reads a wrong page, a position past
the sequence or a masked position unmasked gives a wrong (or NaN) result. Sequences: one over
several pages, one shorter than a page, one ending exactly on a page boundary; page size 16, the
interpreter's KV tile 16, so tiles and pages both straddle.
"""

from __future__ import annotations

import math

import pytest
import torch

from hq_vllm.kernels import paged_attention as pa
from hq_vllm.kernels.kv_cache import kv_slot_bytes, quantize_kv_to_slots, write_kv_slots
from hq_vllm.kernels.paged_attention import paged_attention, paged_attention_decode, plan_paged_attention

reference = pa.paged_attention_reference  # bound before the fixture replaces the module's name

PAGE = 16
DECODE_LENS = [37, 5, 16, 70]  # 3 pages (partial last), < 1 page, exactly 1 page, 5 pages


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton kernels under the interpreter; fail if the torch fallback is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("paged attention fell back to the reference")

    monkeypatch.setattr(pa, "paged_attention_reference", no_fallback)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _paged_batch(seq_lens, q_lens, hq, hkv, d, bits, seed, symmetric=False):
    """A random cache holding ``seq_lens`` sequences in scattered pages, and queries for each
    request's newest ``q_lens`` tokens: (query, cache, block_table, seq_lens, query_start_loc)."""
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(s / PAGE) for s in seq_lens]
    n_blocks = sum(pages) + 7  # spare pages full of garbage
    cache = torch.randint(0, 256, (n_blocks, hkv, PAGE, kv_slot_bytes(d, bits)), generator=g,
                          dtype=torch.uint8)
    perm = torch.randperm(n_blocks, generator=g)
    width = max(pages) + 2
    # Unused block-table entries point at garbage pages too (a kernel must not follow them).
    block_table = perm[torch.randint(0, n_blocks, (len(seq_lens), width), generator=g)].to(torch.int32)
    used = 0
    for i, s in enumerate(seq_lens):
        block_table[i, :pages[i]] = perm[used:used + pages[i]]
        used += pages[i]
        spread = torch.exp(torch.randn(s, hkv, 1, generator=g))  # rows of very different ranges
        k = torch.randn(s, hkv, d, generator=g) * spread + 0.3
        v = torch.randn(s, hkv, d, generator=g) * spread
        positions = torch.arange(s)
        mapping = block_table[i, positions // PAGE].long() * PAGE + positions % PAGE
        write_kv_slots(cache, quantize_kv_to_slots(k, v, bits, 0.95, symmetric), mapping)
    query = torch.randn(sum(q_lens), hq, d, generator=g)
    qsl = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    return query, cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), qsl


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("window", [None, 20], ids=["full", "window20"])
def test_decode_matches_reference(interpreter, bits, hq, hkv, window):
    d = 64
    query, cache, bt, sl, qsl = _paged_batch(DECODE_LENS, [1] * 4, hq, hkv, d, bits, seed=bits * 7 + hq)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125, sliding_window=window)
    got = paged_attention_decode(query, cache, bt, sl, head_dim=d, bits=bits, scale=0.125,
                                 sliding_window=window, plan=plan_paged_attention(4, hkv, hq // hkv, 1, 70,
                                                                                  query.device, num_splits=1))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) < 1e-5
    # the general entry point, given vLLM-style query offsets, is the same launch
    got2 = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125,
                           sliding_window=window, max_query_len=1, max_seq_len=70,
                           plan=plan_paged_attention(4, hkv, hq // hkv, 1, 70, query.device, num_splits=1))
    assert _rel(got2, want) < 1e-5


# Launch variants (plan fields) and the query dtype that selects the 16-bit code path, with the
# bound of that dtype's output rounding (the kernel's float16 probabilities add ~2**-11 per term).
VARIANTS = {
    "gather-f32": (dict(unpack=0, codes16=False), torch.float32, 1e-5),
    "words-f32": (dict(unpack=1, codes16=False), torch.float32, 1e-5),
    "nibble-f32": (dict(unpack=2, codes16=False), torch.float32, 1e-5),
    "gather-fp16codes": (dict(unpack=0, codes16=True), torch.float16, 1e-3),
    "words-bf16codes": (dict(unpack=1, codes16=True), torch.bfloat16, 8e-3),
    "nibble-bf16codes": (dict(unpack=2, codes16=True), torch.bfloat16, 8e-3),
    "nibble-fp16codes": (dict(unpack=2, codes16=True), torch.float16, 1e-3),
}


# Every variant at 3 bits; at 4 and 8 bits the ones that take another code path (nibble words
# fall back to whole words at 8 bits, and float32 queries never take the 16-bit codes).
VARIANT_BITS = ([(v, 3) for v in VARIANTS] + [(v, 4) for v in ("gather-f32", "nibble-f32", "nibble-fp16codes",
                                                                 "words-bf16codes")]
                + [(v, 8) for v in ("gather-fp16codes", "words-f32", "words-bf16codes")])


@pytest.mark.parametrize("variant, bits", VARIANT_BITS)
def test_launch_variants_match_reference(interpreter, variant, bits):
    """Every unpacking / code-dtype variant on a decode batch (with KV splits) and on a mixed
    prefill batch, GQA 3, sliding window."""
    fields, dtype, bound = VARIANTS[variant]
    d, hq, hkv = 64, 6, 2
    for lens, q_lens, window, splits in [(DECODE_LENS, [1] * 4, 20, 3), ([40, 50, 20], [40, 13, 1], 9, 1)]:
        query, cache, bt, sl, qsl = _paged_batch(lens, q_lens, hq, hkv, d, bits, seed=bits)
        query = query.to(dtype)
        want = reference(query.float(), cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125,
                         sliding_window=window)
        plan = plan_paged_attention(len(lens), hkv, 3, max(q_lens), max(lens), query.device, num_splits=splits,
                                    **fields)
        got = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125,
                              sliding_window=window, plan=plan)
        assert got.dtype == dtype
        assert _rel(got, want) < bound, (lens, q_lens)


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("window", [None, 20], ids=["full", "window20"])
def test_split_kv_decode_matches_reference(interpreter, splits, window):
    """Flash-decoding: each KV split runs as its own program, a second kernel merges them. With
    5 splits of a 37-token sequence (3 KV tiles) some splits are empty (and, with the window,
    the 5-token sequence has a single tile): those must weigh nothing."""
    d, hq, hkv, bits = 64, 6, 2, 3
    query, cache, bt, sl, qsl = _paged_batch(DECODE_LENS, [1] * 4, hq, hkv, d, bits, seed=splits)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.2, sliding_window=window)
    plan = plan_paged_attention(4, hkv, 3, 1, 70, query.device, num_splits=splits)
    got = paged_attention_decode(query, cache, bt, sl, head_dim=d, bits=bits, scale=0.2,
                                 sliding_window=window, plan=plan)
    assert _rel(got, want) < 1e-5


def test_default_plan_splits_long_decodes(interpreter):
    """The heuristic splits few long sequences (the interpreter counts 4 SMs) and the result
    still matches."""
    d, hq, hkv, bits = 64, 3, 1, 4
    query, cache, bt, sl, qsl = _paged_batch([300], [1], hq, hkv, d, bits, seed=11, symmetric=True)
    plan = plan_paged_attention(1, hkv, 3, 1, 300, query.device)
    assert plan.num_splits == -(-300 // pa._MIN_SPLIT_TOKENS) > 1  # positions per split >= the minimum
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125)
    got = paged_attention_decode(query, cache, bt, sl, head_dim=d, bits=bits, scale=0.125)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)], ids=["mha", "gqa3"])
def test_head_dim_128(interpreter, hq, hkv):
    d, bits = 128, 3
    query, cache, bt, sl, qsl = _paged_batch([37, 5], [1, 1], hq, hkv, d, bits, seed=hq)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=d**-0.5)
    got = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=d**-0.5)
    assert _rel(got, want) < 1e-5


def test_head_dim_not_a_power_of_two(interpreter):
    """head_dim 96 (a multiple of 32, padded to 128 lanes inside the kernel)."""
    d, bits = 96, 4
    query, cache, bt, sl, qsl = _paged_batch([23, 40], [3, 1], 4, 2, d, bits, seed=96)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=d**-0.5)
    got = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=d**-0.5)
    assert _rel(got, want) < 1e-5


# A fresh prefill over 2 pages, a chunked prefill continuing a cached prefix (13 new of 50), a
# decode, a prefix-cache hit that ends on a page boundary (5 new of 32), and a short prefill.
MIXED = [(40, 40), (50, 13), (20, 1), (32, 5), (7, 7)]


@pytest.mark.parametrize("bits, hq, hkv, window", [(3, 2, 2, None), (3, 6, 2, 9), (4, 6, 2, None), (4, 2, 2, 9)],
                         ids=["3-mha-full", "3-gqa3-window9", "4-gqa3-full", "4-mha-window9"])
def test_prefill_and_chunked_prefill_match_reference(interpreter, bits, hq, hkv, window):
    d = 64
    seq_lens, q_lens = [s for s, _ in MIXED], [q for _, q in MIXED]
    query, cache, bt, sl, qsl = _paged_batch(seq_lens, q_lens, hq, hkv, d, bits, seed=bits + hq)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125, sliding_window=window)
    # block_q 16 (or 8 for the padded group of 3 -> 4): 40 new tokens make 3 query tiles
    plan = plan_paged_attention(5, hkv, hq // hkv, 40, 50, query.device, block_q=16 // (1 if hq == hkv else 4))
    got = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125,
                          sliding_window=window, plan=plan)
    assert _rel(got, want) < 1e-5


def test_bfloat16_queries(interpreter):
    """Serving dtype: bf16 queries and output; the kernel's float32 math then one rounding."""
    d, hq, hkv, bits = 64, 6, 2, 3
    query, cache, bt, sl, qsl = _paged_batch([37, 5], [4, 1], hq, hkv, d, bits, seed=16)
    query = query.bfloat16()
    want = reference(query.float(), cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125)
    got = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125)
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < 8e-3  # bf16 output rounding (2**-9 relative per element)


def test_pages_before_the_window_are_not_read(interpreter):
    """With a sliding window, vLLM may free (and reuse) pages wholly before the window: point
    their block-table entries at a page of NaN scales; neither implementation may see them."""
    d, hq, hkv, bits, window = 64, 6, 2, 3, 20
    query, cache, bt, sl, qsl = _paged_batch([70, 37], [1, 3], hq, hkv, d, bits, seed=3)
    poison = torch.full_like(cache[:1], 0xFF)  # float16 0xFFFF = NaN scales, codes all ones
    cache = torch.cat([cache, poison])
    bad = cache.shape[0] - 1
    bt[0, :3] = bad  # positions 0..47; the window of position 69 starts at 50
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125, sliding_window=window)
    assert torch.isfinite(want).all()
    got = paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125,
                          sliding_window=window)
    assert torch.isfinite(got).all() and _rel(got, want) < 1e-5


@pytest.mark.parametrize("splits", [1, 3])
def test_padding_requests_are_skipped(interpreter, splits):
    """CUDA-graph padding: requests with no query tokens (or length 0 at decode) write nothing."""
    d, hq, hkv, bits = 64, 2, 2, 4
    query, cache, bt, sl, qsl = _paged_batch([37, 5], [1, 1], hq, hkv, d, bits, seed=5)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125)
    sentinel = 1234.5
    # decode: a third row whose sequence has length 0
    q3 = torch.cat([query, torch.randn(1, hq, d)])
    out = torch.full_like(q3, sentinel)
    plan = plan_paged_attention(3, hkv, 1, 1, 37, query.device, num_splits=splits)
    paged_attention_decode(q3, cache, torch.cat([bt, bt[:1]]), torch.cat([sl, sl.new_zeros(1)]),
                           head_dim=d, bits=bits, scale=0.125, output=out, plan=plan)
    assert torch.all(out[2] == sentinel)
    assert _rel(out[:2], want) < 1e-5
    # varlen: a trailing request with an empty query range
    out = torch.full_like(q3, sentinel)
    qsl3 = torch.cat([qsl, qsl[-1:]])
    paged_attention(q3, cache, torch.cat([bt, bt[:1]]), torch.cat([sl, sl[:1]]), qsl3, head_dim=d, bits=bits,
                    scale=0.125, output=out, plan=plan)
    assert torch.all(out[2] == sentinel) and _rel(out[:2], want) < 1e-5


def test_cpu_without_interpreter_takes_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d, hq, hkv, bits = 64, 2, 1, 3
    query, cache, bt, sl, qsl = _paged_batch([20, 5], [1, 1], hq, hkv, d, bits, seed=9)
    want = reference(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125)
    assert torch.equal(paged_attention_decode(query, cache, bt, sl, head_dim=d, bits=bits, scale=0.125), want)
    sl0 = torch.cat([sl, sl.new_zeros(1)])
    q0 = torch.cat([query, torch.randn(1, hq, d)])
    out = torch.zeros_like(q0)
    paged_attention_decode(q0, cache, torch.cat([bt, bt[:1]]), sl0, head_dim=d, bits=bits, scale=0.125, output=out)
    assert torch.equal(out[:2], want) and torch.all(out[2] == 0)


def test_bad_arguments_are_clear_errors():
    d, bits = 64, 3
    query, cache, bt, sl, qsl = _paged_batch([20], [1], 3, 2, d, bits, seed=1)
    with pytest.raises(ValueError, match="not a multiple"):
        pa._check_args(query, cache, bt, sl, qsl, d, bits)
    with pytest.raises(ValueError, match="cache must be uint8"):
        pa._check_args(query[:, :2], cache, bt, sl, qsl, d, 4)
    with pytest.raises(ValueError, match="decode-only"):
        plan_paged_attention(1, 2, 1, 4, 20, torch.device("cpu"), num_splits=2)


def test_backend_forward_takes_the_kernel_with_vllm_metadata(interpreter, monkeypatch):
    """The vLLM impl's forward on the kernel path (forced here; on the GPU it is taken for CUDA
    tensors): R3-rotates the unrotated queries, passes the metadata through, writes only the
    batch's rows of a padded output, and agrees with the reference on the rotated queries."""
    import types

    attention = pytest.importorskip("hq_vllm.attention")  # imports vllm
    from hq_vllm.kernels.fwht import hadamard_transform_reference

    d, hq, hkv, bits = 64, 6, 2, 3
    seq_lens, q_lens = [40, 50, 20], [40, 13, 1]
    query, cache, bt, sl, qsl = _paged_batch(seq_lens, q_lens, hq, hkv, d, bits, seed=21)
    settings = attention.PackedKVSettings(bits=bits, clip_ratio=0.95, symmetric=False, r3=True)
    impl = attention.HadaquantAttentionImpl(hq, d, 0.125, hkv, settings, sliding_window=16)
    calls = []
    kernel = attention.paged_attention
    monkeypatch.setattr(attention, "_use_attention_kernel", lambda q, c: True)
    monkeypatch.setattr(attention, "paged_attention", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    n = query.shape[0]
    padded = torch.cat([query, torch.randn(3, hq, d)])  # CUDA-graph padding rows
    output = torch.full_like(padded, float("nan"))
    metadata = types.SimpleNamespace(num_actual_tokens=n, block_table=bt, seq_lens=sl, query_start_loc=qsl,
                                     max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    impl.forward(None, padded, None, None, cache, metadata, output)
    assert len(calls) == 1 and calls[0]["max_query_len"] == 40 and calls[0]["max_seq_len"] == 50
    want = reference(hadamard_transform_reference(query), cache, bt, sl, qsl, head_dim=d, bits=bits, scale=0.125,
                     sliding_window=16)
    assert _rel(output[:n], want) < 1e-5
    assert torch.isnan(output[n:]).all()
