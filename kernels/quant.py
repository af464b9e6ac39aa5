"""Round-to-nearest weight grids (plain torch): the one implementation of the weight quantizer.

Two callers must produce the same codes, bit for bit: the offline tool
(``hq_vllm.offline.quantize``, which re-exports everything here, and GPTQ on top of it) and
the vLLM plugin's load-time RTN for plain Hugging Face models (``hq_vllm/online.py``), which may
not import ``hq_vllm.offline``. Hence the grid lives here, with plain arguments (bits, group
size, symmetry) instead of ``hq_vllm.format.WeightQuantSpec``: this package imports nothing of
ours.

Conventions (the contract with the checkpoint format; ``offline/quantize.py`` has the long form):
``b`` bits, one (scale ``s``, zero ``z``) per group of ``group_size`` input channels of one output
channel (``-1``: the whole row). Symmetric: ``s = p * absmax / (2**(b-1) - 1)``, codes
``c = clamp(round(w / s) + 2**(b-1), 0, 2**b - 1)``; asymmetric: the range widened to include 0,
``s = p * (hi - lo) / (2**b - 1)``, ``z = clamp(round(-lo / s), 0, 2**b - 1)``. Scales are rounded
*up* to float16 before the codes are computed and clamped to ``[2**-24, 65504]`` (zero-scale
guard: an all-zero group dequantizes to 0). ``round`` is half to even. Dequantization is
``(c - z) * s`` in float32. ``p`` is 1, or searched per group over ``clip_grid`` (MSE clip).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_CLIP_GRID",
    "FP16_MAX",
    "FP16_MIN_SCALE",
    "MSE_NORM",
    "dequantize_with_qparams",
    "fp16_scale",
    "quantize_with_qparams",
    "rtn_dequantize",
    "rtn_quantize",
    "weight_grid",
    "weight_qparams",
]

#: Shrink factors tried by the MSE clip search: 1.00 down to 0.50 in steps of 0.025. GPTQ's
#: default grid is 80 points down to 0.21; at 3-4 bits the best shrink lies well above 0.5, and a
#: quarter of the passes keeps RTN of a 135M model within seconds on a 2-core CPU.
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(1.0 - i / 40 for i in range(21))
#: Exponent of the clip-search error (GPTQ's default).
MSE_NORM = 2.4

FP16_MIN_SCALE = 2.0**-24  # float16's smallest subnormal
FP16_MAX = 65504.0
_ROWS_PER_CHUNK_ELEMS = 1 << 22  # bounds the clip search's temporaries (~16 MB per buffer)


def fp16_scale(scale: torch.Tensor, round_up: bool) -> torch.Tensor:
    """Clamp to float16's range and convert to float16 (rounding up, or to nearest), returned as
    float32: the value that will be stored, so codes are computed against it."""
    if bool((scale > FP16_MAX).any()):
        raise ValueError(
            f"a quantization scale of {float(scale.max()):.4g} exceeds float16's range "
            f"({FP16_MAX}); the weights are not a sane model's"
        )
    scale = scale.clamp(min=FP16_MIN_SCALE)
    s16 = scale.to(torch.float16)
    if round_up:
        up = (s16.view(torch.int16) + 1).view(torch.float16)  # next float16 up (s16 > 0, finite)
        s16 = torch.where(s16.to(torch.float32) < scale, up, s16)
    return s16.to(torch.float32)


def weight_grid(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 from the (already clipped) range ``[lo, hi]``."""
    if symmetric:
        scale = fp16_scale(torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1), round_up=True)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    maxq = 2**bits - 1
    scale = fp16_scale((hi - lo) / maxq, round_up=True)
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
    rows, one pass per grid point); strict ``<`` keeps the largest shrink on ties.
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
        return weight_grid(lo, hi, bits, symmetric)
    grid = [float(p) for p in clip_grid]
    if not grid or not all(0.0 < p <= 1.0 for p in grid):
        raise ValueError(f"clip_grid must be non-empty with values in (0, 1], got {clip_grid!r}")
    buf = torch.empty_like(w)
    best_err = best_scale = best_zero = None
    for p in grid:
        scale, zero = weight_grid(p * lo, p * hi, bits, symmetric)
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


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"a linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"weight shape [N={n}, K={k}]: K is not a multiple of group_size {group_size}")
    return w.reshape(n, k // g, g)


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    mse_clip: bool = False,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    norm: float = MSE_NORM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a linear weight ``[N, K]``, group-wise along K.

    Returns codes uint8 ``[N, K]``, scales float16 ``[N, K/G]`` (``[N, 1]`` per channel) and zeros
    uint8 ``[N, K/G]`` (``None`` when symmetric: the zero is the implicit ``2**(bits-1)``).
    """
    wg = _grouped(w, group_size).to(torch.float32)
    n, g, gs = wg.shape
    rows = max(1, _ROWS_PER_CHUNK_ELEMS // (g * gs))
    scales, zeros, codes = [], [], []
    for chunk in torch.split(wg, rows, dim=0):
        s, z = weight_qparams(chunk, bits, symmetric, mse_clip, clip_grid, norm)
        codes.append(quantize_with_qparams(chunk, s.unsqueeze(-1), z.unsqueeze(-1), bits))
        scales.append(s)
        zeros.append(z)
    return (
        torch.cat(codes).reshape(n, g * gs).to(torch.uint8),
        torch.cat(scales).to(torch.float16),
        None if symmetric else torch.cat(zeros).to(torch.uint8),
    )


def rtn_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Float32 ``[N, K]`` weight ``(c - z) * s``: the same operations as ``format.unpack_linear``."""
    n, k = codes.shape
    scale = scales.to(torch.float32)
    g = scale.shape[1]
    zero = torch.full_like(scale, float(2 ** (bits - 1))) if zeros is None else zeros.to(torch.float32)
    w = (codes.to(torch.float32).view(n, g, k // g) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.view(n, k)
