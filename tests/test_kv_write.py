"""The fused KV-cache write (kernels/kv_write.py): Triton kernel vs the torch reference
(R3 + ``quantize_kv_to_slots`` + ``write_kv_slots``), byte for byte.

The kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set per test with
monkeypatch, as in test_paged_attention.py); the fixture makes the module's reference fallback
raise, so what is compared is the kernel. Every case starts both caches from the same random
garbage, so a store to a wrong slot, a store of a padding row (slot -1) or a store past a slot
shows up as a differing byte. K/V are fresh random rows of very different ranges, never exact
zeros; the key has rows past the slot mapping (CUDA-graph padding) full of NaN, which must not
reach the cache. Without R3 the bytes must be equal exactly; with R3 the kernel's matrix
product sums in another order than the reference's butterflies, so a rotated value may round
differently: there at most a tiny fraction of codes may differ, each dequantized value within
one quantization step (in practice the interpreter has matched exactly on every case).
"""

from __future__ import annotations

import pytest
import torch

from hq_vllm.kernels import kv_write as kw
from hq_vllm.kernels.kv_cache import _unpack_rows, kv_slot_bytes
from hq_vllm.kernels.kv_write import write_kv_cache

reference = kw.write_kv_cache_reference  # bound before the fixture replaces the module's name

PAGE = 16


@pytest.fixture
def interpreter(monkeypatch):
    """Run the Triton kernel under the interpreter; fail if the torch fallback is taken."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_fallback(*args, **kwargs):
        raise AssertionError("write_kv_cache fell back to the reference")

    monkeypatch.setattr(kw, "write_kv_cache_reference", no_fallback)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.full_like(x, 1e-3), x)


def _case(t, h, d, bits, dtype, seed, *, n_blocks=7, page=PAGE, pad_rows=3, n_padding=2,
          slot_dtype=torch.int64):
    """K, V ``[t + pad_rows, h, d]`` (the extra rows NaN), a garbage cache, and a slot mapping
    of ``t`` entries scattered over the blocks with ``n_padding`` of them -1."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(2 * torch.randn(t, h, 1, generator=g))  # rows of very different ranges
    k = _nonzero(torch.randn(t, h, d, generator=g) * spread + 0.3 * spread)
    v = _nonzero(torch.randn(t, h, d, generator=g) * spread)
    nan = torch.full((pad_rows, h, d), float("nan"))
    k, v = torch.cat([k, nan]).to(dtype), torch.cat([v, nan]).to(dtype)
    cache = torch.randint(0, 256, (n_blocks, h, page, kv_slot_bytes(d, bits)), generator=g, dtype=torch.uint8)
    slots = torch.randperm(n_blocks * page, generator=g)[:t]
    slots[torch.randperm(t, generator=g)[:n_padding]] = -1
    return k, v, cache, slots.to(slot_dtype)


def _written(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Bool ``[num_blocks, H, page]``: the slots the batch writes."""
    nb, h, page, _ = cache.shape
    mask = torch.zeros(nb * page, dtype=torch.bool)
    mask[slots[slots >= 0].long()] = True
    return mask.view(nb, page).unsqueeze(1).expand(nb, h, page)


def _assert_matches(got, want, start, slots, d, bits, exact):
    written = _written(start, slots)
    assert torch.equal(got[~written], start[~written]), "bytes outside the batch's slots changed"
    if exact:
        assert torch.equal(got, want)
        return
    g, w = got[written], want[written]  # [N, slot bytes]
    cb = bits * d // 8
    codes_g = torch.cat([_unpack_rows(g[:, i * cb:(i + 1) * cb], bits, d) for i in range(2)], 1)
    codes_w = torch.cat([_unpack_rows(w[:, i * cb:(i + 1) * cb], bits, d) for i in range(2)], 1)
    differ = (codes_g != codes_w).float().mean().item()
    assert differ <= 2e-3, f"{differ:.2%} of the codes differ"
    assert torch.equal(g[:, 2 * cb + 6:], w[:, 2 * cb + 6:])  # padding bytes
    for i in range(2):
        sg = g[:, 2 * cb + 2 * i:2 * cb + 2 * i + 2].contiguous().view(torch.float16).float()  # [N, 1]
        sw = w[:, 2 * cb + 2 * i:2 * cb + 2 * i + 2].contiguous().view(torch.float16).float()
        zg, zw = g[:, 2 * cb + 4 + i:2 * cb + 5 + i].float(), w[:, 2 * cb + 4 + i:2 * cb + 5 + i].float()
        cg, cw = codes_g[:, i * d:(i + 1) * d].float(), codes_w[:, i * d:(i + 1) * d].float()
        step = torch.maximum(sg, sw)
        err = ((cg - zg) * sg - (cw - zw) * sw).abs()
        assert (err <= step * 1.01).all(), "a dequantized value moved by more than one step"
        assert ((sg - sw).abs() <= 1e-3 * sw).float().mean() >= 0.98


def _run_both(k, v, cache, slots, **kw_args):
    got, want = cache.clone(), cache.clone()
    write_kv_cache(k, v, got, slots, **kw_args)
    reference(k, v, want, slots, **kw_args)
    return got, want


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("rotate", [True, False], ids=["r3", "no_r3"])
def test_kernel_matches_reference(interpreter, d, bits, dtype, symmetric, rotate):
    k, v, cache, slots = _case(21, 3, d, bits, dtype, seed=d + 10 * bits + 7 * symmetric + 3 * rotate)
    args = dict(bits=bits, clip_ratio=0.9, symmetric=symmetric, value_clip_ratio=0.75, rotate=rotate)
    got, want = _run_both(k, v, cache, slots, **args)
    _assert_matches(got, want, cache, slots, d, bits, exact=not rotate)


@pytest.mark.parametrize("bits", [2, 5, 6, 7])
def test_other_bit_widths(interpreter, bits):
    k, v, cache, slots = _case(9, 2, 64, bits, torch.bfloat16, seed=bits)
    got, want = _run_both(k, v, cache, slots, bits=bits, clip_ratio=0.95, symmetric=bits % 2 == 0, rotate=True)
    _assert_matches(got, want, cache, slots, 64, bits, exact=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_non_power_of_two_head_dim(interpreter, dtype):
    """head_dim 96 = 12·8: R3 from the streamed table, the row zero-padded to 128 channels."""
    k, v, cache, slots = _case(10, 2, 96, 3, dtype, seed=96)
    got, want = _run_both(k, v, cache, slots, bits=3, clip_ratio=1.0, symmetric=False, rotate=True)
    _assert_matches(got, want, cache, slots, 96, 3, exact=False)
    k4, v4, cache4, slots4 = _case(10, 2, 96, 4, dtype, seed=97)
    got, want = _run_both(k4, v4, cache4, slots4, bits=4, clip_ratio=0.9, symmetric=True, rotate=False)
    _assert_matches(got, want, cache4, slots4, 96, 4, exact=True)


def test_layouts_and_padding(interpreter):
    """A key sliced out of a fused qkv row (strided), int32 slot mapping, an odd page size,
    one clip for K and V, tokens of one block in a row; an all-padding and an empty batch
    write nothing."""
    d, h = 64, 2
    k, v, cache, slots = _case(12, h, d, 4, torch.bfloat16, seed=5, page=5, n_blocks=4,
                               slot_dtype=torch.int32)
    qkv = torch.cat([torch.randn(k.shape[0], 3 * h * d).to(k.dtype), k.flatten(1), v.flatten(1)], 1)
    k_view = qkv[:, 3 * h * d:4 * h * d].view(-1, h, d)
    v_view = qkv[:, 4 * h * d:].view(-1, h, d)
    assert not k_view.is_contiguous()
    args = dict(bits=4, clip_ratio=0.85, symmetric=False, rotate=True)
    got, want = _run_both(k_view, v_view, cache, slots, **args)
    _assert_matches(got, want, cache, slots, d, 4, exact=False)
    for empty in (torch.full((6,), -1, dtype=torch.int64), torch.empty(0, dtype=torch.int64)):
        untouched = cache.clone()
        write_kv_cache(k, v, untouched, empty, **args)
        assert torch.equal(untouched, cache)


def test_untouched_slots_keep_their_bytes(interpreter):
    """Two batches into one cache: the second leaves the first's slots (and all others) alone."""
    d, bits = 128, 3
    k, v, cache, _ = _case(8, 2, d, bits, torch.bfloat16, seed=11, n_blocks=3)
    first = torch.tensor([0, 1, 2, 17, 18, 40, 41, 47])
    second = torch.tensor([3, -1, 16, 30, 31, -1, 46, 5])
    args = dict(bits=bits, clip_ratio=0.95, symmetric=False, rotate=True)
    got, want = cache.clone(), cache.clone()
    write_kv_cache(k, v, got, first, **args)
    reference(k, v, want, first, **args)
    after_first = got.clone()
    write_kv_cache(v, k, got, second, **args)
    reference(v, k, want, second, **args)
    _assert_matches(got, want, cache, torch.cat([first, second]), d, bits, exact=False)
    kept = ~_written(cache, second)
    assert torch.equal(got[kept], after_first[kept])


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(kw, "write_kv_cache_reference", lambda *a, **k: calls.append(k) or reference(*a, **k))
    k, v, cache, slots = _case(5, 2, 64, 3, torch.float32, seed=3)
    got, want = cache.clone(), cache.clone()
    args = dict(bits=3, clip_ratio=0.9, symmetric=False, rotate=True)
    write_kv_cache(k, v, got, slots, **args)
    reference(k, v, want, slots, **args)
    assert torch.equal(got, want) and len(calls) == 1


def test_bad_arguments():
    k, v, cache, slots = _case(4, 2, 64, 3, torch.float32, seed=4)
    args = dict(clip_ratio=0.9, symmetric=False, rotate=True)
    with pytest.raises(ValueError, match="bits"):
        write_kv_cache(k, v, cache, slots, bits=16, **args)
    with pytest.raises(ValueError, match="clip"):
        write_kv_cache(k, v, cache, slots, bits=3, clip_ratio=0.9, symmetric=False, value_clip_ratio=1.5, rotate=True)
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv_cache(k, v, cache, slots, bits=4, **args)  # a 3-bit cache
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(k, v, cache, torch.zeros(k.shape[0] + 1, dtype=torch.int64), bits=3, **args)
    with pytest.raises(ValueError, match="key and value"):
        write_kv_cache(k, v[:, :1], cache, slots, bits=3, **args)


def test_custom_op_traces_without_graph_breaks():
    """``torch.ops.hadaquant.write_kv_cache`` mutates the cache in place under
    torch.compile(fullgraph) (CPU: the reference path) and passes torch.library.opcheck."""
    k, v, cache, slots = _case(6, 2, 64, 4, torch.float32, seed=6, pad_rows=0)
    want = cache.clone()
    reference(k, v, want, slots, bits=4, clip_ratio=0.9, symmetric=True, value_clip_ratio=None, rotate=True)

    def step(k, v, c, s):
        torch.ops.hadaquant.write_kv_cache(k, v, c, s, 4, 0.9, True, None, True)
        return c.sum(dtype=torch.int64)

    got = cache.clone()
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(k, v, got, slots)
    assert torch.equal(got, want) and int(total) == int(want.sum(dtype=torch.int64))
    torch.library.opcheck(torch.ops.hadaquant.write_kv_cache.default,
                          (k, v, cache.clone(), slots, 4, 0.9, True, 0.8, True))


@pytest.mark.parametrize("d, bits, dtype, symmetric, rotate", [
    (128, 3, torch.bfloat16, False, True),  # the serving case: Sylvester H in registers, bit planes
    (96, 4, torch.float16, True, True),  # the streamed table, dense fields
])
def test_kernel_compiles_for_hopper(d, bits, dtype, symmetric, rotate):
    """The GPU-only paths (libdevice rounding, native conversions, tensor-core dot) build for
    sm_90 with Triton's bundled ptxas, no GPU needed, and without FMA contraction."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    compiled = kw.compile_for_gpu(d, bits, dtype, symmetric, rotate)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and "mma" in ptx
    assert "cvt.rni" in ptx and "div.rn.f32" in ptx and "fma.rn.f32" not in ptx


# ---------------------------------------------------------------------------------------------
# The vLLM impl and its metadata builder
# ---------------------------------------------------------------------------------------------


def test_backend_cache_update_takes_the_kernel(interpreter, monkeypatch):
    """``do_kv_cache_update`` on the kernel path (forced here; on the GPU it is taken for CUDA
    tensors) writes what the torch path writes, padding slots and rows included."""
    attention = pytest.importorskip("hq_vllm.attention")  # imports vllm
    d, h, bits = 64, 2, 3
    k, v, cache, slots = _case(11, h, d, bits, torch.bfloat16, seed=8)
    settings = attention.PackedKVSettings(bits=bits, clip_ratio=0.9, symmetric=False, r3=True, value_clip_ratio=0.7)
    impl = attention.HadaquantAttentionImpl(4, d, 0.125, h, settings)
    torch_path = cache.clone()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch path's R3 as on the CPU platform
    impl.do_kv_cache_update(None, k, v, torch_path, slots)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    monkeypatch.setattr(attention, "_use_kv_write_kernel", lambda key, c: True)
    monkeypatch.setattr(attention, "write_kv_cache", lambda *a, **kwa: calls.append(kwa) or write_kv_cache(*a, **kwa))
    kernel_path = cache.clone()
    impl.do_kv_cache_update(None, k, v, kernel_path, slots)
    assert calls == [dict(bits=bits, clip_ratio=0.9, symmetric=False, value_clip_ratio=0.7, rotate=True)]
    _assert_matches(kernel_path, torch_path, cache, slots, d, bits, exact=False)


def test_metadata_builder_allows_decode_graphs_only_with_the_kernel_write(monkeypatch):
    attention = pytest.importorskip("hq_vllm.attention")
    from vllm.v1.attention.backend import AttentionCGSupport

    class Builder:
        _cudagraph_support = AttentionCGSupport.ALWAYS

        def __init__(self, *args, **kwargs):
            self.aot_schedule = True

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            return AttentionCGSupport.ALWAYS

    assert not attention._graph_safe_kv_path()  # this CPU machine: the torch write
    cpu = attention._packed_metadata_builder(Builder)
    assert cpu.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    assert cpu().aot_schedule is False
    monkeypatch.setattr(attention, "_graph_safe_kv_path", lambda: True)
    cuda = attention._packed_metadata_builder(Builder)
    assert cuda.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
