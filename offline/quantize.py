"""Quantizers: weight grids (RTN, with MSE clip search) and activation / KV fake quantization.

GPTQ reuses the grid functions here (:func:`weight_qparams`, :func:`quantize_with_qparams`,
:func:`dequantize_with_qparams`) on column blocks, so RTN and GPTQ weights share one grid.

Conventions (these are the contract with the checkpoint format and the vLLM kernels)
-----------------------------------------------------------------------------------
Weights, ``b`` bits, one (scale ``s``, zero ``z``) per group of ``group_size`` input channels of
one output channel (``group_size = -1``: the whole row):

* **symmetric**: ``s = p * absmax / (2**(b-1) - 1)``, signed codes
  ``q = clamp(round(w / s), -2**(b-1), 2**(b-1) - 1)`` stored unsigned as ``c = q + 2**(b-1)``,
  so ``z = 2**(b-1)`` (implicit, not stored). The extra negative level is only reached by clipped
  values (QuaRot's convention).
* **asymmetric**: the range is first widened to include 0 (``lo = min(min(w), 0)``,
  ``hi = max(max(w), 0)``, as GPTQ does), then ``s = p * (hi - lo) / (2**b - 1)``,
  ``z = clamp(round(-p * lo / s), 0, 2**b - 1)``, ``c = clamp(round(w / s) + z, 0, 2**b - 1)``.
  Including 0 is what keeps ``z`` inside the code range, and it makes a constant group exact.
* Dequantization: ``w = (c - z) * s`` in float32.
* ``round`` is ``torch.round`` (half to even) everywhere.
* Scales are **rounded up to float16 before the codes are computed** (the checkpoint stores
  float16 scales), so ``fake_quantize_weight`` equals the dequantized checkpoint bit for bit, and
  rounding up keeps the grid covering the (clipped) range: without clipping, every weight is
  within ``s / 2`` of its dequantized value at any bit width. Zero-scale guard: scales are clamped
  to ``[2**-24, 65504]`` (float16's smallest subnormal and max), so an all-zero group (real Qwen
  down_proj has them) gets codes at its zero point and dequantizes to 0, never NaN.
* MSE clip (GPTQ's ``find_params(mse=True)``): for each shrink factor ``p`` in ``clip_grid``
  (default 1.000, 0.975, ..., 0.500) recompute the grid and keep, per group, the ``p`` minimizing
  ``sum |w - deq(w)| ** norm`` with ``norm = 2.4`` (GPTQ's default: between MSE and max-error,
  it protects the large weights a plain MSE would clip too hard). Strict ``<`` keeps the largest
  ``p`` on ties, so results are deterministic; ``p = 1`` is in the grid, so the search is never
  worse than no clip in that norm.

Activations (dynamic, per token over the last dim) and KV (per token and head, over head_dim),
``b`` in 2..8, or 16 = identity; computed in float32 and returned in the input dtype:

* symmetric: ``s = clip * absmax / (2**(b-1) - 1)``, ``q = clamp(round(x / s), -2**(b-1),
  2**(b-1) - 1)``, ``x' = q * s``;
* asymmetric: ``lo = clip * min(min(x), 0)``, ``hi = clip * max(max(x), 0)``,
  ``s = (hi - lo) / (2**b - 1)``, ``z = clamp(round(-lo / s), 0, 2**b - 1)``,
  ``c = clamp(round(x / s) + z, 0, 2**b - 1)``, ``x' = (c - z) * s``.
* Activation scales stay float32 (they live only inside one GEMM) and a zero row gets
  ``s = float32 tiny``. KV scales are clamped like weight scales and converted to float16 with
  round-to-nearest-even (a plain conversion in the kernel), because the paged cache stores them as
  float16: the codes are computed against the stored scale, not a better one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hq_vllm.format import ACT_BITS, WeightQuantSpec

__all__ = [
    "DEFAULT_CLIP_GRID",
    "MSE_NORM",
    "QuantizedWeight",
    "WeightQuantSpec",
    "dequantize_weight",
    "dequantize_with_qparams",
    "fake_quantize_kv",
    "fake_quantize_per_token",
    "fake_quantize_weight",
    "quantize_weight",
    "quantize_with_qparams",
    "weight_qparams",
]

#: Shrink factors tried by the MSE clip search: 1.00 down to 0.50 in steps of 0.025. GPTQ's
#: default grid is 80 points down to 0.21; at 3-4 bits the best shrink lies well above 0.5, and a
#: quarter of the passes keeps RTN of a 135M model within seconds on a 2-core CPU.
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(1.0 - i / 40 for i in range(21))
#: Exponent of the clip-search error (GPTQ's default).
MSE_NORM = 2.4

_FP16_MIN_SCALE = 2.0**-24
_FP16_MAX = 65504.0
_ROWS_PER_CHUNK_ELEMS = 1 << 22  # bounds the clip search's temporaries (~16 MB per buffer)


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes uint8 ``[N, K]``; scales float16 ``[N, K/G]`` (``[N, 1]`` per channel); zeros uint8
    ``[N, K/G]`` for asymmetric specs, ``None`` for symmetric ones (implicit ``2**(bits-1)``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# Weight grid
# ---------------------------------------------------------------------------------------------


def _fp16_scale(scale: torch.Tensor, round_up: bool) -> torch.Tensor:
    """Clamp to float16's range and convert to float16 (rounding up, or to nearest), returned as
    float32: the value that will be stored, so codes are computed against it."""
    if bool((scale > _FP16_MAX).any()):
        raise ValueError(
            f"a quantization scale of {float(scale.max()):.4g} exceeds float16's range "
            f"({_FP16_MAX}); the weights are not a sane model's"
        )
    scale = scale.clamp(min=_FP16_MIN_SCALE)
    s16 = scale.to(torch.float16)
    if round_up:
        up = (s16.view(torch.int16) + 1).view(torch.float16)  # next float16 up (s16 > 0, finite)
        s16 = torch.where(s16.to(torch.float32) < scale, up, s16)
    return s16.to(torch.float32)


def _grid(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 from the (already clipped) range ``[lo, hi]``; see module docstring."""
    if symmetric:
        scale = _fp16_scale(torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1), round_up=True)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    maxq = 2**bits - 1
    scale = _fp16_scale((hi - lo) / maxq, round_up=True)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_with_qparams(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes ``c = clamp(round(w / s) + z, 0, 2**bits - 1)`` as float32 (broadcasting)."""
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def dequantize_with_qparams(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> torch.Tensor:
    """``(c - z) * s`` in float32 (broadcasting)."""
    return (codes.to(torch.float32) - zero) * scale


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    mse_clip: bool,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    norm: float = MSE_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid for each row of ``w[..., G]`` (each row is one quantization group).

    Returns float32 ``(scale, zero)`` of shape ``w.shape[:-1]``; scales are float16-exact.
    With ``mse_clip`` the shrink factor is searched over ``clip_grid`` per row (vectorized over
    rows, one pass per grid point).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in 2..8 to quantize, got {bits}")
    w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights contain NaN or inf; refusing to quantize them")
    if symmetric:
        lo, hi = w.amin(-1), w.amax(-1)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    if not mse_clip:
        return _grid(lo, hi, bits, symmetric)
    grid = [float(p) for p in clip_grid]
    if not grid or not all(0.0 < p <= 1.0 for p in grid):
        raise ValueError(f"clip_grid must be non-empty with values in (0, 1], got {clip_grid!r}")
    buf = torch.empty_like(w)
    best_err = best_scale = best_zero = None
    for p in grid:
        scale, zero = _grid(p * lo, p * hi, bits, symmetric)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        # quantize -> dequantize -> |error|^norm, in place in one buffer (the search is the
        # costly part of RTN: one pass per grid point)
        torch.div(w, s, out=buf).round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s)
        buf.sub_(w).abs_()
        err = (buf.square_() if norm == 2 else buf.pow_(norm)).sum(-1)
        if best_err is None:  # p = grid[0]
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _grouped(w: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"a linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = k if spec.group_size == -1 else spec.group_size
    if k % g:
        raise ValueError(
            f"weight shape [N={n}, K={k}]: K is not a multiple of group_size {spec.group_size}"
        )
    return w.reshape(n, k // g, g)


def quantize_weight(
    w: torch.Tensor,
    spec: WeightQuantSpec,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    norm: float = MSE_NORM,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a linear weight ``[N, K]`` on the spec's grid."""
    if spec.bits == 16:
        raise ValueError("spec.bits is 16: the weight stays unquantized, there is nothing to quantize")
    wg = _grouped(w, spec).to(torch.float32)
    n, g, gs = wg.shape
    rows = max(1, _ROWS_PER_CHUNK_ELEMS // (g * gs))
    scales, zeros, codes = [], [], []
    for chunk in torch.split(wg, rows, dim=0):
        s, z = weight_qparams(chunk, spec.bits, spec.symmetric, spec.mse_clip, clip_grid, norm)
        codes.append(quantize_with_qparams(chunk, s.unsqueeze(-1), z.unsqueeze(-1), spec.bits))
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(
        codes=torch.cat(codes).reshape(n, g * gs).to(torch.uint8),
        scales=torch.cat(scales).to(torch.float16),
        zeros=None if spec.symmetric else torch.cat(zeros).to(torch.uint8),
    )


def dequantize_weight(qw: QuantizedWeight, spec: WeightQuantSpec) -> torch.Tensor:
    """Float32 ``[N, K]`` weight ``(c - z) * s``: the same operations as ``format.unpack_linear``."""
    n, k = qw.codes.shape
    scale = qw.scales.to(torch.float32)
    g = scale.shape[1]
    if qw.zeros is None:
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1)))
    else:
        zero = qw.zeros.to(torch.float32)
    w = (qw.codes.to(torch.float32).view(n, g, k // g) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.view(n, k)


def fake_quantize_weight(
    w: torch.Tensor,
    spec: WeightQuantSpec,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    norm: float = MSE_NORM,
) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype; identity for 16-bit specs."""
    if spec.bits == 16:
        return w
    return dequantize_weight(quantize_weight(w, spec, clip_grid, norm), spec).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# Activations and KV cache
# ---------------------------------------------------------------------------------------------


def _check_act(bits: int, clip_ratio: float) -> None:
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"activation/KV bits must be one of {ACT_BITS}, got {bits!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio!r}")


def _act_scale(scale: torch.Tensor, fp16: bool) -> torch.Tensor:
    """KV: the float16 value the cache stores; activations: float32, zero rows guarded."""
    if fp16:  # saturate rather than fail: one huge K row must not stop a forward pass
        return _fp16_scale(scale.clamp(max=_FP16_MAX), round_up=False)
    return scale.clamp(min=torch.finfo(torch.float32).tiny)


def _fake_quantize_last_dim(
    x: torch.Tensor, bits: int, clip_ratio: float, symmetric: bool, fp16_scale: bool
) -> torch.Tensor:
    xf = x.to(torch.float32)
    if symmetric:
        maxq = 2 ** (bits - 1) - 1
        scale = clip_ratio * xf.abs().amax(-1, keepdim=True) / maxq
        scale = _act_scale(scale, fp16_scale)
        q = torch.round(xf / scale).clamp(-maxq - 1, maxq)
        return (q * scale).to(x.dtype)
    maxq = 2**bits - 1
    lo = clip_ratio * xf.amin(-1, keepdim=True).clamp(max=0)
    hi = clip_ratio * xf.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / maxq
    scale = _act_scale(scale, fp16_scale)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    c = (torch.round(xf / scale) + zero).clamp(0, maxq)
    return ((c - zero) * scale).to(x.dtype)


def fake_quantize_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = True
) -> torch.Tensor:
    """Dynamic per-token quantize-dequantize of a linear's input ``[..., K]`` (over the last dim),
    as the served model does before its low-bit GEMM. ``bits == 16`` returns ``x``."""
    _check_act(bits, clip_ratio)
    if bits == 16:
        return x
    return _fake_quantize_last_dim(x, bits, clip_ratio, symmetric, fp16_scale=False)


def fake_quantize_kv(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = False
) -> torch.Tensor:
    """Quantize-dequantize K or V ``[B, H, T, D]`` per token and head (over ``D``, the last dim;
    any ``[..., D]`` layout works the same), with float16 scales as the paged cache stores them.
    ``bits == 16`` returns ``x``."""
    _check_act(bits, clip_ratio)
    if bits == 16:
        return x
    return _fake_quantize_last_dim(x, bits, clip_ratio, symmetric, fp16_scale=True)
