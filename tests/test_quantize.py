"""Quantizers (offline/quantize.py): RTN weight grids, MSE clip, activation and KV fake quant."""

import pytest
import torch

from hq_vllm.format import WeightQuantSpec
from hq_vllm.offline.quantize import (
    MSE_NORM,
    dequantize_weight,
    fake_quantize_kv,
    fake_quantize_per_token,
    fake_quantize_weight,
    quantize_weight,
    weight_qparams,
)


def _weights(n=64, k=256, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if heavy:  # a few outliers, as real weight rows have
        w = w * (1 + 20 * (torch.rand(n, k, generator=g) < 0.005))
    assert bool((w != 0).all())
    return w


def _group_err(w, deq, group_size, norm):
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    return (deq - w).abs().pow(norm).view(n, k // gs, gs).sum(-1)


def _expanded_scales(qw, k):
    s = qw.scales.float()
    return s.repeat_interleave(k // s.shape[1], dim=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_rtn_error_bounded_by_half_scale(bits, symmetric, group_size):
    w = _weights(seed=bits)
    spec = WeightQuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, mse_clip=False)
    qw = quantize_weight(w, spec)
    n, k = w.shape
    g = 1 if group_size == -1 else k // group_size
    assert qw.codes.shape == (n, k) and qw.codes.dtype == torch.uint8
    assert qw.scales.shape == (n, g) and qw.scales.dtype == torch.float16
    assert int(qw.codes.max()) < 2**bits
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.shape == (n, g) and qw.zeros.dtype == torch.uint8
        assert int(qw.zeros.max()) < 2**bits
    deq = dequantize_weight(qw, spec)
    # Without clipping nothing is clipped; the slack covers float16 scale rounding and the
    # rounded asymmetric zero point.
    assert bool(((deq - w).abs() <= _expanded_scales(qw, k) * 0.51).all())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, -1])
def test_mse_clip_never_worse_than_no_clip(symmetric, group_size):
    w = _weights(heavy=True, seed=7)
    base = WeightQuantSpec(bits=3, group_size=group_size, symmetric=symmetric, mse_clip=False)
    mse = WeightQuantSpec(bits=3, group_size=group_size, symmetric=symmetric, mse_clip=True)
    err_plain = _group_err(w, fake_quantize_weight(w, base), group_size, MSE_NORM)
    err_mse = _group_err(w, fake_quantize_weight(w, mse), group_size, MSE_NORM)
    assert bool((err_mse <= err_plain * (1 + 1e-5)).all())
    assert float(err_mse.sum()) < 0.95 * float(err_plain.sum())  # and it helps at 3 bits
    # with norm = 2 the searched grid is never worse in squared error either
    err2 = _group_err(w, fake_quantize_weight(w, mse, norm=2.0), group_size, 2.0)
    assert bool((err2 <= _group_err(w, fake_quantize_weight(w, base), group_size, 2.0) * (1 + 1e-5)).all())


def test_mse_clip_is_deterministic_and_grid_configurable():
    w = _weights(seed=3)
    spec = WeightQuantSpec(bits=3, group_size=64)
    a, b = quantize_weight(w, spec), quantize_weight(w.clone(), spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    only_one = quantize_weight(w, spec, clip_grid=[1.0])
    plain = quantize_weight(w, WeightQuantSpec(bits=3, group_size=64, mse_clip=False))
    assert torch.equal(only_one.codes, plain.codes) and torch.equal(only_one.scales, plain.scales)
    with pytest.raises(ValueError, match="clip_grid"):
        quantize_weight(w, spec, clip_grid=[1.5])


def test_group_wise_beats_per_channel():
    w = _weights(heavy=True, seed=11)
    per_channel = fake_quantize_weight(w, WeightQuantSpec(bits=3, group_size=-1))
    grouped = fake_quantize_weight(w, WeightQuantSpec(bits=3, group_size=32))
    assert float(((grouped - w) ** 2).sum()) < float(((per_channel - w) ** 2).sum())


def test_symmetric_convention_pinned():
    """b = 3 symmetric: s = absmax / 3 (float16), q = clamp(round(w / s), -4, 3), c = q + 4."""
    w = torch.tensor([[0.375, -0.375, 0.1875, 0.0625, -0.1875] + [0.0] * 27])
    qw = quantize_weight(w, WeightQuantSpec(bits=3, group_size=32, mse_clip=False))
    assert qw.scales.float().item() == 0.125
    expect = torch.round(w / 0.125).clamp(-4, 3) + 4
    assert torch.equal(qw.codes.float(), expect)
    # 1.5 -> 2, 0.5 -> 0, -1.5 -> -2: round half to even
    assert qw.codes[0, :5].tolist() == [7, 1, 6, 4, 2]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("mse_clip", [True, False])
def test_constant_groups_guarded(symmetric, mse_clip):
    """All-zero and constant groups (real Qwen down_proj has them) give finite scales and no NaN;
    zero groups reconstruct to exactly zero."""
    k = 32
    w = torch.zeros(4, 4 * k)
    w[1, :k] = 0.3
    w[2, k : 2 * k] = -0.7
    w[3] = _weights(1, 4 * k).view(-1)
    w[3, 2 * k : 3 * k] = 0.0
    spec = WeightQuantSpec(bits=3, group_size=k, symmetric=symmetric, mse_clip=mse_clip)
    qw = quantize_weight(w, spec)
    assert bool(torch.isfinite(qw.scales.float()).all()) and bool((qw.scales > 0).all())
    deq = dequantize_weight(qw, spec)
    assert bool(torch.isfinite(deq).all())
    assert bool((deq[w == 0] == 0).all())
    torch.testing.assert_close(deq[1, :k], w[1, :k], rtol=1e-3, atol=0)
    torch.testing.assert_close(deq[2, k : 2 * k], w[2, k : 2 * k], rtol=1e-3, atol=0)


@pytest.mark.parametrize("mse_clip", [True, False])
def test_constant_group_exact_with_asymmetric(mse_clip):
    """A constant group whose scale v / (2^b - 1) is float16-exact reconstructs exactly."""
    v = 7 * 2.0**-5
    w = torch.cat([torch.full((2, 64), v), torch.full((2, 64), -v)], dim=1)
    spec = WeightQuantSpec(bits=3, group_size=64, symmetric=False, mse_clip=mse_clip)
    assert torch.equal(fake_quantize_weight(w, spec), w)


def test_fake_quantize_weight_matches_and_keeps_dtype():
    w = _weights(seed=5).to(torch.bfloat16)
    spec = WeightQuantSpec(bits=4, group_size=128, symmetric=False)
    out = fake_quantize_weight(w, spec)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize_weight(quantize_weight(w, spec), spec).to(torch.bfloat16))
    assert fake_quantize_weight(w, WeightQuantSpec(bits=16)) is w


def test_weight_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"K=96.*group_size 64"):
        quantize_weight(torch.randn(8, 96), WeightQuantSpec(bits=3, group_size=64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(8, 2, 64), WeightQuantSpec(bits=3, group_size=64))
    with pytest.raises(ValueError, match="16"):
        quantize_weight(torch.randn(8, 64), WeightQuantSpec(bits=16))
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(torch.full((8, 64), float("nan")), WeightQuantSpec(bits=3, group_size=64))


def test_weight_qparams_over_arbitrary_leading_dims():
    """GPTQ calls the grid on one column group at a time: [N, 1, G] or [N, G]."""
    w = _weights(8, 64, seed=2)
    s1, z1 = weight_qparams(w, 3, True, True)
    s2, z2 = weight_qparams(w.view(8, 1, 64), 3, True, True)
    assert s1.shape == (8,) and s2.shape == (8, 1)
    assert torch.equal(s1, s2.view(8)) and torch.equal(z1, z2.view(8))
    assert bool((z1 == 4).all())


# --------------------------------------------------------------------------------------------
# Activations and KV
# --------------------------------------------------------------------------------------------


def _acts(shape=(4, 16, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 4


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_error_decreases_with_bits(symmetric):
    x = _acts()
    errs = [
        float((fake_quantize_per_token(x, b, symmetric=symmetric) - x).norm() / x.norm())
        for b in range(2, 9)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01


def test_per_token_16_bits_is_identity():
    x = _acts().to(torch.bfloat16)
    assert fake_quantize_per_token(x, 16) is x
    assert fake_quantize_kv(x, 16) is x


def test_per_token_convention_pinned():
    """Symmetric: s = clip * absmax / (2^(b-1) - 1) per row, round half to even, clamp."""
    x = _acts((3, 64), seed=4)
    for clip in (1.0, 0.8):
        s = clip * x.abs().amax(-1, keepdim=True) / 7
        expect = torch.round(x / s).clamp(-8, 7) * s
        assert torch.equal(fake_quantize_per_token(x, 4, clip_ratio=clip), expect)
    out = fake_quantize_per_token(x, 4, clip_ratio=0.5)
    assert bool((out.abs().amax(-1) <= 0.5 * x.abs().amax(-1) * 8 / 7 + 1e-6).all())


def test_per_token_rows_are_independent_and_zero_rows_guarded():
    x = _acts((5, 64), seed=6)
    x[2] = 0.0
    for sym in (True, False):
        out = fake_quantize_per_token(x, 3, symmetric=sym)
        assert bool(torch.isfinite(out).all())
        assert bool((out[2] == 0).all())
        y = x.clone()
        y[0] *= 100
        assert torch.equal(fake_quantize_per_token(y, 3, symmetric=sym)[1:], out[1:])
        assert len(torch.unique(out[1])) <= 2**3


def test_per_token_keeps_dtype_and_shape():
    x = _acts((2, 3, 64)).to(torch.bfloat16)
    out = fake_quantize_per_token(x, 4)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_kv_per_token_and_head():
    b, h, t, d = 2, 3, 5, 64
    x = _acts((b, h, t, d), seed=8) + 0.5  # off-centre, as K rows are
    out = fake_quantize_kv(x, 3)
    assert out.shape == x.shape and out.dtype == x.dtype
    y = x.clone()
    y[:, 1] *= 50  # one head gets much larger: the others must not change
    out_y = fake_quantize_kv(y, 3)
    assert torch.equal(out_y[:, 0], out[:, 0]) and torch.equal(out_y[:, 2], out[:, 2])
    # each (b, h, t) row is quantized on its own grid with a float16 scale (as the cache stores)
    row = x[1, 2, 3]
    lo, hi = row.min().clamp(max=0), row.max().clamp(min=0)
    s = ((hi - lo) / 7).to(torch.float16).float()
    z = torch.round(-lo / s).clamp(0, 7)
    expect = ((torch.round(row / s) + z).clamp(0, 7) - z) * s
    assert torch.equal(out[1, 2, 3], expect)
    # asymmetric beats symmetric on off-centre rows
    err_asym = (out - x).norm()
    err_sym = (fake_quantize_kv(x, 3, symmetric=True) - x).norm()
    assert err_asym < err_sym
    z = torch.zeros(1, 1, 2, d)
    assert torch.equal(fake_quantize_kv(z, 3), z)


@pytest.mark.parametrize("bits", [1, 9, 32, True])
def test_act_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_per_token(torch.randn(2, 32), bits)
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_kv(torch.randn(1, 1, 2, 32), bits)


@pytest.mark.parametrize("clip", [0.0, -0.5, 1.01])
def test_act_bad_clip(clip):
    with pytest.raises(ValueError, match="clip_ratio"):
        fake_quantize_per_token(torch.randn(2, 32), 4, clip_ratio=clip)
