"""Quantizers: weight grids (RTN, with MSE clip search) and activation / KV fake quantization.

GPTQ reuses the grid functions here (:func:`weight_qparams`, :func:`quantize_with_qparams`,
:func:`dequantize_with_qparams`) on column blocks, so RTN and GPTQ weights share one grid. The
weight grid itself is implemented in ``hq_vllm.kernels.quant`` (plain torch, re-exported here),
because the vLLM plugin quantizes plain Hugging Face models at load time with the same grid and
may not import this package.

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
from hq_vllm.kernels.quant import (
    DEFAULT_CLIP_GRID,
    FP16_MAX,
    MSE_NORM,
    dequantize_with_qparams,
    fp16_scale,
    quantize_with_qparams,
    rtn_dequantize,
    rtn_quantize,
    weight_qparams,
)

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


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes uint8 ``[N, K]``; scales float16 ``[N, K/G]`` (``[N, 1]`` per channel); zeros uint8
    ``[N, K/G]`` for asymmetric specs, ``None`` for symmetric ones (implicit ``2**(bits-1)``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# Weights: the grid core is hq_vllm.kernels.quant (shared with the plugin's load-time RTN)
# ---------------------------------------------------------------------------------------------


def quantize_weight(
    w: torch.Tensor,
    spec: WeightQuantSpec,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    norm: float = MSE_NORM,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a linear weight ``[N, K]`` on the spec's grid
    (:func:`hq_vllm.kernels.quant.rtn_quantize`, which the vLLM plugin's load-time RTN uses too)."""
    if spec.bits == 16:
        raise ValueError("spec.bits is 16: the weight stays unquantized, there is nothing to quantize")
    codes, scales, zeros = rtn_quantize(w, spec.bits, spec.group_size, spec.symmetric,
                                        spec.mse_clip, clip_grid, norm)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros)


def dequantize_weight(qw: QuantizedWeight, spec: WeightQuantSpec) -> torch.Tensor:
    """Float32 ``[N, K]`` weight ``(c - z) * s``: the same operations as ``format.unpack_linear``."""
    return rtn_dequantize(qw.codes, qw.scales, qw.zeros, spec.bits)


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
        return fp16_scale(scale.clamp(max=FP16_MAX), round_up=False)
    return scale.clamp(min=torch.finfo(torch.float32).tiny)


def _fake_quantize_last_dim(
    x: torch.Tensor, bits: int, clip_ratio: float, symmetric: bool, fp16_scale: bool
) -> torch.Tensor:
    # In-place after the one division: the same float32 operations in the same order as
    # round(x / s).clamp(...) * s, without a fresh full-size tensor per step (the clip search
    # runs this on many candidates at once).
    xf = x.to(torch.float32)
    hi, lo = xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True)
    if symmetric:
        maxq = 2 ** (bits - 1) - 1
        scale = clip_ratio * torch.maximum(hi, -lo) / maxq  # = absmax
        scale = _act_scale(scale, fp16_scale)
        q = xf / scale
        return q.round_().clamp_(-maxq - 1, maxq).mul_(scale).to(x.dtype)
    maxq = 2**bits - 1
    lo = clip_ratio * lo.clamp(max=0)
    hi = clip_ratio * hi.clamp(min=0)
    scale = (hi - lo) / maxq
    scale = _act_scale(scale, fp16_scale)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    c = xf / scale
    return c.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale).to(x.dtype)


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


def fake_quantize_candidates(
    x: torch.Tensor, bits: int, clip_ratios: torch.Tensor, symmetric: bool, *, kv: bool = False
) -> torch.Tensor:
    """One quantize-dequantize of ``x [...]`` per candidate clip ratio, stacked as ``[C, ...]``:
    bit for bit :func:`fake_quantize_kv` (``kv=True``) or :func:`fake_quantize_per_token` at each
    clip, in one broadcast pass (the clip search evaluates many clips at once)."""
    clips = [float(c) for c in clip_ratios.reshape(-1).tolist()]
    for c in clips:
        _check_act(bits, c)
    if bits == 16:
        return x.unsqueeze(0).expand(len(clips), *x.shape)
    # float32 like the scalar path, whose Python float is rounded to float32 when it meets xf
    clip = torch.tensor(clips, dtype=torch.float32, device=x.device).view(-1, *([1] * x.dim()))
    return _fake_quantize_last_dim(x.unsqueeze(0), bits, clip, symmetric, fp16_scale=kv)
