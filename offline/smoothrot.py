"""SmoothRot: calibrated per-channel smoothing of the down_proj input before its R4 rotation.

Why
    The down_proj input ``x = act(gate(h)) · up(h)`` (intermediate size I) carries massive
    per-channel outliers: a handful of channels reach hundreds to thousands of times the typical
    magnitude on a few tokens. The online R4 Hadamard spreads such a channel over the whole
    block, but it spreads it *within the token*: the token's row becomes a flat vector of the
    outlier's size plus everything else, and a per-token 4-bit grid sized for the outlier
    rounds the rest of that token away. Dividing the loud channels down *before* the rotation
    (SmoothQuant's migration of difficulty from activations to weights, then the rotation on
    top, as in SmoothRot) leaves the Hadamard a flatter input.

The transform (exact in full precision, free at run time)
    For a scale vector ``s > 0`` over the I channels: ``x ← x / s`` and
    ``W_down ← W_down · diag(s)``, so ``x W_downᵀ`` is unchanged. ``x`` is never divided at run
    time: channel ``j`` of ``x`` is ``act(g_j) · u_j`` and only ``u_j`` (up_proj's output row
    ``j``: weight row and bias) carries the factor, ``W_up[j, :] ← W_up[j, :] / s_j``. Both are
    plain weight edits, so the checkpoint format and the vLLM plugin are unchanged. up_proj's
    own quantization does not see the scale: its groups run along its input dimension within
    one output row, and a per-row factor scales a row's grid with it. The smoothing is applied
    in the basis the model is served in (after norm fusion, R1 and R2, before R4 is fused into
    down_proj; R1 rotates down_proj's *rows*, which changes the column maxima used below) and
    the R4 fusion then gives ``W_down · diag(s) · H``.

Scales (SmoothQuant's rule, per channel j)
    ``s_j = max|x_j|^α / max_i |W_down[i, j]|^(1 − α)``, with the activation maximum over all
    calibration tokens. ``α = 1`` flattens the activations (every channel's max becomes 1) and
    moves everything into the weights; ``α = 0`` flattens the weight columns instead (weight-only
    scaling, the activations get ``x_j · max|W_j|``). A channel with a zero activation maximum or
    a zero weight column (dead, or added by dimension expansion) keeps ``s_j = 1``. The vector is
    then divided by its geometric mean over the live channels (both quantizers are invariant to
    a common factor, so this changes nothing but keeps the weights at their usual magnitude) and
    clamped to ``[1 / MAX_SCALE_RATIO, MAX_SCALE_RATIO]``: an up_proj row divided by more than a
    few hundred would push its float16 weight scales into the subnormal range.

Objective (block-local, per layer)
    ``α`` is chosen per decoder layer from ``ALPHA_GRID`` (0, 0.1, ..., 1) plus "no smoothing"
    (``s = 1``), by the normalized error of down_proj's output as it will be served:

        ``L(s) = mean over tokens t of ‖ Q_a(x_t/s · H) · Q_w(W·diag(s)·H)ᵀ − x_t Wᵀ ‖² / ‖h_t‖²``

    with ``H`` the online R4 (the block-diagonal Hadamard of ``kernels/fwht.py``, the same
    transform the simulator and the plugin apply, computed as the clip search computes it; none
    when R4 is off), ``Q_a`` the dynamic per-token activation quantizer at the recipe's bits and
    clip ratio (:func:`~hq_vllm.offline.quantize.fake_quantize_per_token`), ``Q_w`` RTN on the
    recipe's weight grid (:func:`~hq_vllm.offline.quantize.fake_quantize_weight`, MSE clip
    included) and ``h_t`` the decoder layer's full-precision output at token ``t`` (the residual
    stream after the MLP, which down_proj's output is added to). Normalized per token for the
    reason the clip search gives (``offline/calibrate.py``): the next layer reads the stream
    through an RMSNorm, so each token's error counts relative to the stream's norm at that
    token, and a plain MSE would be ruled by the few tokens that carry the outliers.
    Normalizing by down_proj's own output ``‖x_t Wᵀ‖²`` instead (``normalize="output"``) weighs
    tokens whose MLP adds little to the stream as much as any other; on SmolLM2 W4A4KV4 (RTN,
    16×256 calibration tokens) it picked α ≤ 0.3 and no smoothing on 6 layers, and held-out
    perplexity (16×512 tokens) came out 85.1 against 77.1 with the residual norm (88.7 without
    smoothing). The objective is still not perplexity: one fixed α = 0.5 on every layer gave
    75.4 there, although its block-local loss is above the searched one on 29 of the 30 layers
    (5× on layer 11, whose input peaks at 3,300). Strict ``<`` with "no smoothing" evaluated
    first: the chosen scales are never worse than none on this objective, and a tie keeps the
    model as it was. What the objective leaves out: GPTQ
    (it would adapt to any scales; RTN is the proxy), the searched activation clips of GBS (the
    search runs afterwards, on the smoothed model), and everything outside down_proj. The search
    is skipped when neither the weights nor the activations are quantized (nothing to gain).

Calibration
    BoolQ calibration windows (:func:`~hq_vllm.offline.data.calibration_batches`, as GPTQ and
    GBS use), layer by layer as in GPTQ: the decoder layer's input is captured once, each layer
    runs on it with a forward pre-hook on down_proj recording its input, the scales of that
    layer are fitted and folded, and the layer's output feeds the next layer. Smoothing is exact,
    so no layer's input depends on the earlier layers' scales; memory stays at one layer's
    down_proj inputs. The forward runs under autocast (bfloat16 by default, as vLLM serves); the
    statistics and the objective are float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hq_vllm.format import ActQuantSpec, WeightQuantSpec
from hq_vllm.offline.calibrate import _OnlineHadamard
from hq_vllm.offline.gptq import _capture_input
from hq_vllm.offline.quantize import fake_quantize_per_token, fake_quantize_weight

__all__ = [
    "ALPHA_GRID",
    "MAX_SCALE_RATIO",
    "SmoothRot",
    "check_smoothrot_options",
    "down_proj_loss",
    "fold_smoothing_scales",
    "search_smoothing",
    "smooth_model",
    "smoothing_scales",
    "smoothrot_record",
]

#: The α candidates of the per-layer search (besides "no smoothing").
ALPHA_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))
#: Largest factor between a channel's scale and the geometric mean of all (module docstring).
MAX_SCALE_RATIO = 100.0
#: Calibration tokens per forward micro-batch.
MICRO_BATCH_TOKENS = 2048
NORMALIZATIONS = ("residual", "output")
OBJECTIVE = ("error of down_proj's output with its input smoothed, R4-rotated and per-token fake-quantized and its "
             "weight RTN-quantized, vs the full-precision output, per token relative to the norm of the {}")
_NORMALIZED_BY = {"residual": "decoder layer's output", "output": "down_proj output"}


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|x_j|^α / max_i|W[i, j]|^(1−α)`` for down_proj's weight
    ``W [out, I]`` and the per-channel activation maximum ``act_absmax [I]``; float32, normalized
    to geometric mean 1 over the live channels and clamped (module docstring). Channels with a
    zero activation maximum or weight column get 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    a = act_absmax.detach().float()
    w = weight.detach().float().abs().amax(0)
    if a.shape != w.shape:
        raise ValueError(f"activation maxima for {a.shape[0]} channels, but the weight has {w.shape[0]} columns")
    live = (a > 0) & (w > 0) & torch.isfinite(a)
    log_s = torch.zeros_like(a)
    log_s[live] = alpha * a[live].log() - (1.0 - alpha) * w[live].log()
    if bool(live.any()):
        log_s[live] -= log_s[live].mean()
    bound = math.log(MAX_SCALE_RATIO)
    return log_s.clamp_(-bound, bound).exp_()


def fold_smoothing_scales(mlp: nn.Module, scales: torch.Tensor) -> None:
    """``x ← x / s`` through up_proj's output rows (weight and bias), ``W_down ← W_down·diag(s)``;
    the MLP's function is unchanged (products in float64, stored in the weights' dtype)."""
    s = scales.detach().to(device=mlp.down_proj.weight.device, dtype=torch.float64)
    up, down = mlp.up_proj, mlp.down_proj
    if s.shape != (down.in_features,) or up.out_features != down.in_features:
        raise ValueError(f"{s.numel()} smoothing scales for up_proj's {up.out_features} outputs and "
                         f"down_proj's {down.in_features} inputs")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("smoothing scales must be positive and finite")
    with torch.no_grad():
        up.weight.copy_((up.weight.double() / s[:, None]).to(up.weight.dtype))
        if up.bias is not None:
            up.bias.copy_((up.bias.double() / s).to(up.bias.dtype))
        down.weight.copy_((down.weight.double() * s).to(down.weight.dtype))


# ---------------------------------------------------------------------------------------------
# The objective and the search on one layer
# ---------------------------------------------------------------------------------------------


def _r4(size: int, r4_block: int | None, device: torch.device):
    """The online R4 over ``size`` channels as the clip search applies it (the FWHT kernel on
    CUDA; on the CPU two small GEMMs with the factors of ``H = H_k ⊗ H_P``, 7× faster than the
    reference's butterflies on SmolLM2's 1536), or the identity without R4."""
    return (lambda x: x) if r4_block is None else _OnlineHadamard(size, r4_block, device)


def down_proj_loss(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                   scales: torch.Tensor | None, act: ActQuantSpec, wspec: WeightQuantSpec,
                   r4_block: int | None, targets: Sequence[torch.Tensor] | None = None,
                   token_norms: Sequence[torch.Tensor] | None = None) -> float:
    """The module docstring's ``L(s)`` over the down_proj inputs ``xs`` (micro-batches ``[..., I]``
    of the *unsmoothed* input, on any device) for the weight ``W [out, I]`` before smoothing and
    R4; ``scales`` None is "no smoothing". ``targets``: the FP outputs ``x Wᵀ + b`` per
    micro-batch if already computed. ``token_norms``: per micro-batch, the squared norm of each
    token's reference vector to normalize by (``[...]``, e.g. the decoder layer's output);
    None: down_proj's own FP output. Float32 throughout, on the weight's device."""
    device = weight.device
    w = weight.detach().float()
    if scales is not None:
        scales = scales.to(device, torch.float32)
        w = w * scales
    r4 = _r4(w.shape[1], r4_block, device)
    wq = fake_quantize_weight(r4(w), wspec)
    b = None if bias is None else bias.detach().float()
    total, tokens = 0.0, 0
    for m, x in enumerate(xs):
        x = x.to(device, torch.float32).reshape(-1, x.shape[-1])
        y = (torch.nn.functional.linear(x, weight.float(), b) if targets is None
             else targets[m].to(device, torch.float32).reshape(-1, weight.shape[0]))
        xt = r4(x if scales is None else x / scales)
        yq = torch.nn.functional.linear(fake_quantize_per_token(xt, act.bits, act.clip_ratio, act.symmetric), wq, b)
        den = y.square().sum(-1) if token_norms is None else token_norms[m].to(device, torch.float32).reshape(-1)
        den = den.clamp_min(torch.finfo(torch.float32).tiny)
        total += float((yq - y).square_().sum(-1).div_(den).sum())
        tokens += x.shape[0]
    return total / tokens


def search_smoothing(xs: Sequence[torch.Tensor], act_absmax: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None, act: ActQuantSpec, wspec: WeightQuantSpec,
                     r4_block: int | None, *, alpha: float | None = None,
                     grid: Sequence[float] = ALPHA_GRID,
                     early_stop: bool = True, token_norms: Sequence[torch.Tensor] | None = None,
                     ) -> tuple[float | None, torch.Tensor | None, dict]:
    """The best of "no smoothing" and the scales at the ``α`` of ``grid`` (or only ``alpha``
    when given) on :func:`down_proj_loss`. Returns ``(α or None, scales or None, {α or None:
    loss})`` over the candidates evaluated; "no smoothing" comes first and wins ties.

    ``early_stop``: scan the grid upward and stop at the first ``α`` whose loss is above the
    previous one's. The loss trades the activations' error (falling with α) against the
    weights' (rising with α) and was unimodal in α on every layer measured (SmolLM2's 30, the
    test models), where the scan finds the grid's minimum after ``index + 2`` candidates instead
    of all of them (each costs an RTN pass with MSE clip, most of the search's time); elsewhere
    it finds a local minimum, still never worse than no smoothing."""
    targets = [torch.nn.functional.linear(x.to(weight.device, torch.float32), weight.float(),
                                          None if bias is None else bias.float()) for x in xs]
    losses: dict[float | None, float] = {
        None: down_proj_loss(xs, weight, bias, None, act, wspec, r4_block, targets, token_norms)}
    best, best_scales, previous = None, None, None
    for a in ([alpha] if alpha is not None else sorted(grid)):
        s = smoothing_scales(act_absmax, weight, a)
        losses[a] = down_proj_loss(xs, weight, bias, s, act, wspec, r4_block, targets, token_norms)
        if alpha is not None or losses[a] < losses[best]:
            best, best_scales = a, s
        if early_stop and previous is not None and losses[a] > previous:
            break
        previous = losses[a]
    return best, best_scales, losses


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


@dataclass
class SmoothRot:
    """What the smoothing did, per decoder layer: the chosen ``α`` (None: no smoothing) and the
    loss of every candidate (``losses[i][α]``, ``None`` = no smoothing)."""

    alphas: list[float | None]
    losses: list[dict[float | None, float]]
    seconds: float = 0.0
    options: dict = field(default_factory=dict)
    skipped: str | None = None  # why nothing was done (16-bit weights and activations)

    @property
    def loss_before(self) -> list[float]:
        return [ls[None] for ls in self.losses]

    @property
    def loss_after(self) -> list[float]:
        return [ls[a] for ls, a in zip(self.losses, self.alphas)]

    def describe(self) -> str:
        if self.skipped:
            return f"SmoothRot skipped: {self.skipped}"
        o = self.options
        how = "searched per layer" if o.get("alpha") is None else f"fixed α = {o['alpha']:g}"
        before, after = self.loss_before, self.loss_after
        n = len(before) or 1
        return (f"SmoothRot ({how}, {o.get('n_samples')}×{o.get('seq_len')} calibration tokens) in "
                f"{self.seconds:.1f} s; down_proj loss {sum(before) / n:.4g} → {sum(after) / n:.4g} (mean over layers)")

    def table(self) -> str:
        rows = ["  layer  alpha   loss before   loss after"]
        for i, (a, b, c) in enumerate(zip(self.alphas, self.loss_before, self.loss_after)):
            rows.append(f"  {i:>5}  {'-' if a is None else f'{a:.1f}':>5}  {b:>12.5g}  {c:>11.5g}")
        return "\n".join(rows)


def smooth_model(model: nn.Module, calib_ids: torch.Tensor, act: ActQuantSpec, weight: WeightQuantSpec, *,
                 r4_block: int | None, alpha: float | None = None, grid: Sequence[float] = ALPHA_GRID,
                 early_stop: bool = True, normalize: str = "residual", micro_batch: int | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> SmoothRot:
    """Fit and fold SmoothRot scales into every decoder layer of ``model`` (in place; call it
    before R4 is fused into down_proj) on ``calib_ids [S, T]``. ``act``/``weight``: the specs
    down_proj will be served at (the objective's quantizers); ``r4_block``: the order of one
    diagonal block of the online R4, None without R4; ``alpha``: None searches ``grid`` per
    layer (:func:`search_smoothing`, ``early_stop`` included), a number applies that α everywhere.
    ``normalize``: each token's error relative to the decoder layer's output (``"residual"``) or
    to down_proj's own output (``"output"``); module docstring."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    t0 = time.perf_counter()
    layers = model.model.layers
    if act.bits >= 16 and weight.bits >= 16:
        return SmoothRot([], [], 0.0, {"alpha": alpha},
                         skipped="down_proj's weights and inputs stay 16-bit, nothing to smooth for")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be None (search) or lie in [0, 1], got {alpha!r}")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    if calib_ids.dim() != 2 or int(calib_ids.max()) >= vocab or int(calib_ids.min()) < 0:
        raise ValueError(f"calibration ids must be [S, T] in [0, {vocab}); got shape {tuple(calib_ids.shape)}")
    if len(set(getattr(model.config, "layer_types", None) or ())) > 1:
        raise NotImplementedError("SmoothRot calibration gives every layer the attention mask of layer 0; this "
                                  f"model mixes attention kinds {sorted(set(model.config.layer_types))}")
    micro_batch = micro_batch or max(1, MICRO_BATCH_TOKENS // calib_ids.shape[1])
    amp = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    alphas: list[float | None] = []
    losses: list[dict] = []
    with torch.no_grad():
        chunks = calib_ids.split(micro_batch)
        with amp:
            firsts = [_capture_input(layers[0], lambda ids=ids: model(input_ids=ids.to(device), use_cache=False),
                                     with_kwargs=True) for ids in chunks]
        hidden = [x for x, _ in firsts]
        kwargs = [kw for _, kw in firsts]
        for layer in tqdm(layers, desc="smoothrot", unit="layer", disable=not progress):
            mlp = layer.mlp
            xs: list[torch.Tensor] = []
            absmax = torch.zeros(mlp.down_proj.in_features, device=device)

            def record(mod, args):
                x = args[0].detach()
                torch.maximum(absmax, x.abs().reshape(-1, x.shape[-1]).amax(0).float(), out=absmax)
                xs.append(x.cpu())

            handle = mlp.down_proj.register_forward_pre_hook(record)
            try:
                with amp:
                    outs = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
            finally:
                handle.remove()
            hidden = [o[0] if isinstance(o, tuple) else o for o in outs]
            del outs
            a, s, tried = search_smoothing(xs, absmax, mlp.down_proj.weight, mlp.down_proj.bias, act, weight,
                                           r4_block, alpha=alpha, grid=grid, early_stop=early_stop,
                                           token_norms=None if normalize == "output" else
                                           [h.float().square().sum(-1) for h in hidden])
            if s is not None:
                fold_smoothing_scales(mlp, s)
            alphas.append(a)
            losses.append(tried)
    options = {"alpha": alpha, "grid": sorted(grid), "early_stop": early_stop, "normalize": normalize,
               "n_samples": calib_ids.shape[0], "seq_len": calib_ids.shape[1],
               "dtype": str(compute_dtype).removeprefix("torch.")}
    return SmoothRot(alphas, losses, time.perf_counter() - t0, options)


# ---------------------------------------------------------------------------------------------
# The pipeline's entry points (options: hq_vllm.offline.pipeline.QuantizeOptions)
# ---------------------------------------------------------------------------------------------


def check_smoothrot_options(options) -> None:
    """Refuse bad SmoothRot options when the options are made."""
    if not isinstance(options.smoothrot, bool):
        raise ValueError(f"smoothrot must be True or False, got {options.smoothrot!r}")
    a = options.smoothrot_alpha
    if a is not None:
        if not options.smoothrot:
            raise ValueError(f"smoothrot_alpha = {a!r} is set but smoothrot is off; pass smoothrot=True (--smoothrot)")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"smoothrot_alpha must be None (search per layer) or a number in [0, 1], got {a!r}")
    n, t = options.smoothrot_sequences, options.smoothrot_seq_len
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"smoothrot_sequences must be a positive integer, got {n!r}")
    if isinstance(t, bool) or not isinstance(t, int) or t <= 1:
        raise ValueError(f"smoothrot_seq_len must be an integer > 1, got {t!r}")


def smoothrot_record(options, result: SmoothRot) -> dict:
    """What goes into the checkpoint's ``calibration`` (the chosen α per layer, null = none; no
    losses or timings: same options, same file)."""
    if result.skipped:
        return {"smoothrot": {"skipped": result.skipped}}
    return {"smoothrot": {
        "dataset": "boolq-calibration", "n_samples": options.smoothrot_sequences,
        "seq_len": options.smoothrot_seq_len, "seed": options.seed,
        "alpha": None if options.smoothrot_alpha is None else float(options.smoothrot_alpha),
        "grid": list(result.options.get("grid", ALPHA_GRID)), "early_stop": result.options.get("early_stop"),
        "max_scale_ratio": MAX_SCALE_RATIO,
        "dtype": result.options.get("dtype"),
        "objective": OBJECTIVE.format(_NORMALIZED_BY[result.options.get("normalize", "residual")]),
        "alphas": list(result.alphas),
    }}
