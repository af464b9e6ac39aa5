"""Spike-aware mixed precision: keep the projections that quantize worst at 8 or 16 bits.

Per-token activation quantization spends one scale per token on its largest entry, so a token
whose input has a few entries far above the others (an activation *spike*) gets a coarse grid for
everything else; rotations flatten most spikes, not all of them, and some projections are more
sensitive than others whatever their inputs look like (the first blocks, and down_proj of the
last one, which writes the model's final features). Keeping a handful of projections at 8 or 16
bits costs little memory and removes their error; this module decides which ones.

The units: projection groups
    Per decoder layer, the inputs of the activation quantizers: ``qkv`` (the one input of
    q/k/v_proj, which vLLM merges into ``qkv_proj``), ``o_proj`` (the attention context),
    ``gate_up`` (the one input of gate/up_proj, vLLM's ``gate_up_proj``) and ``down_proj`` (the
    gated product **after** the online R4 Hadamard, as the simulator and the served model quantize
    it). Siblings share one input, one quantizer and one merged vLLM layer, so a group is kept or
    not as a whole and its members always get identical bits.

What is measured
    The rotated, fused model runs in full precision (weights not yet quantized, nothing quantized
    at run time, the online R4 applied) on calibration windows of the BoolQ calibration text
    (:func:`hq_vllm.offline.data.calibration_batches`, as GPTQ and the clip search use), layer by
    layer on the full-precision stream. For every group:

    * ``layer_error`` (the score that ranks, see below): the layer is run again on the same input
      with only this group quantized (RTN weights at their effective spec on the plain absmax
      grid, :func:`scoring_weight_spec`, and the input at its effective activation bits and clip),
      and the error of the layer's output is ``mean over tokens of ‖y_q − y‖² / ‖y‖²``: the clip
      search's block-local objective (offline/calibrate.py explains why the layer output,
      normalized per token: the next layer reads ``y / rms(y)``).
    * Input statistics of the group's input ``x`` (each token a row of ``K`` channels), read by a
      hook as the input will be quantized: ``peak_to_rms`` = max over tokens of
      ``r = max|x| / rms(x)`` (the classic spike detector: a flat Gaussian row of 576 channels has
      ``r ≈ 3.5``, a row with one dominant channel ``r ≈ sqrt(K)``), ``mean_peak_to_rms`` its
      mean over tokens, and ``act_error`` = mean over tokens of ``‖Q(x) − x‖² / ‖x‖²`` at the
      group's own activation spec. They are tied: with scale ``s = c·max|x| / (2^(b-1) − 1)``
      each entry's rounding error is about uniform in ``±s/2``, so
      ``e ≈ c²·r² / (12·(2^(b-1) − 1)²)`` plus the clipping error above ``c·max|x|``.

The score: why ``layer_error`` and not a spike statistic
    Measured on SmolLM2-135M-Instruct, W4A4KV4, RTN weights, rotated (held-out NLL 4.200 on two
    512-token BoolQ evaluation windows not among the 16 that perplexity is reported on): keeping
    each of 59 groups (layers 0–5, 10, 15, 18, 20, 23, 25, 27–29) at 8 bits alone and measuring
    the loss improvement, the Spearman rank correlation with the improvement was +0.43 for
    ``layer_error`` (+0.45 with the MSE-clipped grid, 20× costlier), and −0.26 / −0.32 / −0.25 for
    ``act_error`` / ``peak_to_rms`` / ``mean_peak_to_rms``. After the rotations the qkv, gate_up
    and down_proj inputs are flat in every layer (``r`` ≤ 6, ``act_error`` 0.010–0.017 at 4 bits);
    what still spikes is the attention context (R2 rotates within heads, not across them: ``r``
    up to 11, ``act_error`` up to 0.043), and those groups matter least. The largest
    single-group gains were in layers 0–2 (up to 0.16 nats) and the last block's down_proj (0.07);
    the top four by ``layer_error`` (23.qkv, 0.gate_up, 29.gate_up, 0.down_proj) gained 0.26 nats
    together against 0.41 for the best four measured, the top four by ``act_error`` nothing (all
    o_proj, within the ±0.03 noise of two windows). End to end (16 held-out windows of 512
    tokens, budget 4 at 8 bits): perplexity 88.7 → 71.3 ranked by ``layer_error``, 85.8 by
    ``act_error``, 86.1 by ``peak_to_rms``. The input statistics are kept in the table for
    diagnosis; ``choose_projections`` can rank by any of them. ``layer_error`` also covers
    w3a16/w4a16 recipes, where inputs are not quantized and only the weight error counts.

The budget
    ``budget`` = the number of projection groups to keep (an integer ≥ 0; 0 changes nothing, not
    even a byte of the checkpoint). A count, not a fraction of the model's bits: the groups differ
    in size (a qkv group of SmolLM2 has 576×960 weights, a down_proj 1536×576) but each is a tiny
    part of the decoder, and a count is what a user can reason about ("the two worst"). The
    ``budget`` groups with the highest score are kept at ``bits`` (8 or 16): each member linear's
    weight bits and activation bits are raised to ``bits`` where they are lower, never lowered (so
    for w3a16 only the weights are raised; its 16-bit inputs stay 16-bit). The activation clip
    ratio is inherited (the recipe's, or what the clip search finds: it runs after this step and
    searches every quantizer below 16 bits). Only groups where raising something changes the model
    are candidates; a budget above their number is an error naming both.

Cost: one full-precision pass plus one layer pass per group on the calibration tokens (five
model passes in all), and one absmax RTN of every weight (a twentieth of the MSE-clipped RTN).
SmolLM2 at 16×256 tokens on 2 CPU cores: about 25 s (2 minutes while other jobs share them).

The result lands in the config as per-linear ``layers`` overrides (merged into any existing
override of the same linear) and in ``calibration["mixed_precision"]`` (budget, bits, score, data
and the kept groups), and :class:`MixedPrecision` holds every group's statistics for the summary.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hq_vllm.format import HadaquantConfig, LayerOverride
from hq_vllm.offline.quantize import fake_quantize_per_token

__all__ = [
    "MP_BITS",
    "PROJECTIONS",
    "SCORES",
    "MixedPrecision",
    "ProjectionStats",
    "check_mixed_precision_options",
    "choose_projections",
    "measure_projection_stats",
    "mixed_precision_record",
    "plan_mixed_precision",
    "scoring_weight_spec",
    "with_mixed_precision",
]

#: The projection groups of one decoder layer, in data-flow order, and the HF linears behind each
#: (siblings share one input, one quantizer and one merged vLLM layer).
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
MP_BITS = (8, 16)
#: Statistics that can rank the groups (module docstring); the first is the default.
SCORES = ("layer_error", "act_error", "peak_to_rms", "mean_peak_to_rms")
MICRO_BATCH_TOKENS = 2048  # calibration tokens per layer pass


@dataclass(frozen=True)
class ProjectionStats:
    """The measured statistics of one projection group (module docstring)."""

    layer: int
    projection: str
    layer_error: float  # mean over tokens of ‖y_q − y‖² / ‖y‖²: layer output, only this group quantized
    peak_to_rms: float  # max over tokens of max|x| / rms(x)
    mean_peak_to_rms: float  # its mean over tokens
    act_error: float  # mean over tokens of ‖Q(x) − x‖² / ‖x‖² at the group's activation spec
    act_bits: int  # the activation bits act_error was measured at (16: not quantized, error 0)

    @property
    def linears(self) -> list[str]:
        """HF names of the group's member linears."""
        return [f"model.layers.{self.layer}.{m}" for m in PROJECTIONS[self.projection]]

    @property
    def name(self) -> str:
        """``model.layers.<i>.<qkv | o_proj | gate_up | down_proj>`` (qkv and gate_up stand for
        their members; these names are labels, not module names)."""
        return f"model.layers.{self.layer}.{self.projection}"

    def score(self, score: str) -> float:
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        return float(getattr(self, score))


@dataclass
class MixedPrecision:
    """What the mixed-precision step measured and chose: every group's statistics (layer order)
    and the kept groups (highest score first), at ``bits``, ranked by ``score``."""

    stats: list[ProjectionStats]
    kept: list[ProjectionStats]
    bits: int
    budget: int
    score: str
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def ranking(self) -> list[ProjectionStats]:
        """Every group, highest score first (ties: earlier layer, then data-flow order)."""
        order = {p: i for i, p in enumerate(PROJECTIONS)}
        return sorted(self.stats, key=lambda s: (-s.score(self.score), s.layer, order[s.projection]))

    def describe(self) -> str:
        """One line: how many groups were kept at how many bits, by which score."""
        o = self.options
        return (f"{len(self.kept)} of {len(self.stats)} projection groups kept at {self.bits} bits "
                f"(budget {self.budget}, ranked by {self.score} on {o.get('n_samples')}×{o.get('seq_len')} "
                f"calibration tokens) in {self.seconds:.1f} s")

    def table(self, rows: list[ProjectionStats] | None = None) -> str:
        """The kept groups (or ``rows``) with their statistics, one per line."""
        rows = self.kept if rows is None else rows
        lines = [f"    {'projection':<28} {'layer_error':>11} {'act_error':>10} {'peak/rms':>9} {'mean p/r':>9}"]
        for s in rows:
            lines.append(f"    {s.name:<28} {s.layer_error:>11.3e} {s.act_error:>10.3e} {s.peak_to_rms:>9.1f} "
                         f"{s.mean_peak_to_rms:>9.2f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


class _Accumulator:
    """Running per-token statistics of one group's input (float32 math, float64 sums)."""

    def __init__(self, bits: int, clip_ratio: float, symmetric: bool):
        self.bits, self.clip, self.symmetric = bits, clip_ratio, symmetric
        self.tokens = 0
        self.max_ratio = 0.0
        self.sum_ratio = 0.0
        self.sum_error = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        tiny = torch.finfo(torch.float32).tiny
        sq = x.square().sum(-1)
        rms = (sq / x.shape[-1]).sqrt().clamp_min(tiny)
        ratio = x.abs().amax(-1) / rms
        self.tokens += x.shape[0]
        self.max_ratio = max(self.max_ratio, float(ratio.max()))
        self.sum_ratio += float(ratio.double().sum())
        if self.bits < 16:
            err = (fake_quantize_per_token(x, self.bits, self.clip, self.symmetric) - x).square().sum(-1)
            self.sum_error += float((err / sq.clamp_min(tiny)).double().sum())


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def _normalized_error(out: torch.Tensor, target: torch.Tensor) -> float:
    """Sum over tokens of ``‖out − target‖² / ‖target‖²`` (float32, summed in float64)."""
    out, target = out.float(), target.float()
    num = (out - target).square().sum(-1)
    den = target.square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return float((num / den).double().sum())


def scoring_weight_spec(config: HadaquantConfig, name: str):
    """The weight grid the layer error is measured with: the linear's effective spec on the plain
    absmax grid (``mse_clip`` off). The MSE clip search costs ~20 grids per weight and the final
    weights (MSE-clipped RTN or GPTQ) come later at the final widths anyway; the ranking needs
    the relative sizes of the errors, which the absmax grid gives at a twentieth of the cost."""
    return dataclasses.replace(config.effective_weight_spec(name), mse_clip=False)


def measure_projection_stats(model: nn.Module, config: HadaquantConfig, calib_ids: torch.Tensor, *,
                             micro_batch: int | None = None, progress: bool = True) -> list[ProjectionStats]:
    """Statistics of every projection group of ``model`` (rotated and fused as ``config``
    describes, weights in full precision, no simulation hooks attached) on ``calib_ids [S, T]``.

    The decoder runs layer by layer on the full-precision stream (online R4 applied, on the CPU
    as two GEMMs with the dense Hadamard factors as the clip search does; nothing quantized). For
    each layer the full-precision pass records every group's input statistics (hooks that run
    after the R4 hook, so down_proj's input is seen as it will be quantized) and the layer's
    output; then each group in turn gets RTN weights
    (:func:`scoring_weight_spec`) and its input quantized at its effective activation spec, and
    the layer runs again on the same input for ``layer_error``. Weights are restored afterwards.
    Returns one :class:`ProjectionStats` per (layer, group), in layer and data-flow order.
    """
    from hq_vllm.offline.calibrate import _OnlineHadamard
    from hq_vllm.offline.gptq import _capture_input
    from hq_vllm.offline.quantize import fake_quantize_weight

    if calib_ids.dim() != 2 or calib_ids.shape[1] < 1:
        raise ValueError(f"calib_ids must be [sequences, tokens], got {tuple(calib_ids.shape)}")
    layers = model.model.layers
    device = next(model.parameters()).device
    if micro_batch is None:
        micro_batch = max(1, MICRO_BATCH_TOKENS // calib_ids.shape[1])
    n_tokens = calib_ids.numel()
    out: list[ProjectionStats] = []
    # Full precision needs only the online R4 (its transpose is fused into down_proj; R3 leaves
    # QKᵀ unchanged when K is not quantized). Its hooks are registered first, so the hooks below
    # see down_proj's input after the Hadamard (pre-hooks run in registration order).
    r4_handles = []
    if config.rotation.r4 is not None:
        r4 = _OnlineHadamard(config.rotation.r4["size"], config.rotation.r4_block_size, device)
        r4_handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: (r4(args[0]), *args[1:]))
                      for layer in layers]
    bar = tqdm(total=len(layers) * len(PROJECTIONS), desc="mixed precision", unit="group", disable=not progress)
    try:
        with torch.no_grad():
            firsts = [_capture_input(layers[0], lambda ids=ids: model.model(input_ids=ids.to(device), use_cache=False),
                                     with_kwargs=True) for ids in calib_ids.split(micro_batch)]
            hidden, kwargs = [x for x, _ in firsts], [kw for _, kw in firsts]
            for i, layer in enumerate(layers):
                acts, accs, handles = {}, {}, []
                for proj, members in PROJECTIONS.items():
                    acts[proj] = config.effective_act_spec(f"model.layers.{i}.{members[0]}")
                    acc = accs[proj] = _Accumulator(acts[proj].bits, acts[proj].clip_ratio, acts[proj].symmetric)
                    handles.append(layer.get_submodule(members[0]).register_forward_pre_hook(
                        lambda mod, args, acc=acc: acc.add(args[0])))
                try:
                    targets = [_layer_output(layer(h, **kw)) for h, kw in zip(hidden, kwargs)]
                finally:
                    for handle in handles:
                        handle.remove()
                for proj, members in PROJECTIONS.items():
                    modules = [layer.get_submodule(m) for m in members]
                    saved = [m.weight.detach().clone() for m in modules]
                    act, handles = acts[proj], []
                    try:
                        for m, module in zip(members, modules):
                            spec = scoring_weight_spec(config, f"model.layers.{i}.{m}")
                            if spec.bits < 16:
                                module.weight.copy_(fake_quantize_weight(module.weight.detach().float(), spec))
                            if act.bits < 16:
                                handles.append(module.register_forward_pre_hook(
                                    lambda mod, args, a=act: (fake_quantize_per_token(args[0], a.bits, a.clip_ratio,
                                                                                      a.symmetric), *args[1:])))
                        total = sum(_normalized_error(_layer_output(layer(h, **kw)), y)
                                    for h, kw, y in zip(hidden, kwargs, targets))
                    finally:
                        for handle in handles:
                            handle.remove()
                        for module, w in zip(modules, saved):
                            module.weight.copy_(w)
                    acc = accs[proj]
                    n = max(acc.tokens, 1)
                    out.append(ProjectionStats(i, proj, total / n_tokens, acc.max_ratio, acc.sum_ratio / n,
                                               acc.sum_error / n, acc.bits))
                    bar.update(1)
                hidden = targets
    finally:
        bar.close()
        for handle in r4_handles:
            handle.remove()
    return out


# ---------------------------------------------------------------------------------------------
# Choice and config
# ---------------------------------------------------------------------------------------------


def _candidates(config: HadaquantConfig, n_layers: int, bits: int) -> list[tuple[int, str]]:
    """The (layer, group)s where ``bits`` raises a weight or activation width (siblings agree:
    HadaquantConfig checks it, so the first member speaks for the group)."""
    out = []
    for i in range(n_layers):
        for proj, members in PROJECTIONS.items():
            first = f"model.layers.{i}.{members[0]}"
            if config.effective_weight_spec(first).bits < bits or config.effective_act_spec(first).bits < bits:
                out.append((i, proj))
    return out


def _check_budget_fits(budget: int, candidates: int, total: int, bits: int) -> None:
    if budget > candidates:
        raise ValueError(
            f"mixed-precision budget {budget} exceeds the {candidates} projection groups that "
            f"{bits}-bit precision would change (of {total}: the others are already at ≥ {bits} "
            "bits); lower the budget"
        )


def choose_projections(stats: list[ProjectionStats], config: HadaquantConfig, budget: int, bits: int, *,
                       score: str | None = None) -> tuple[list[ProjectionStats], str]:
    """The ``budget`` groups to keep at ``bits``, highest ``score`` first (default
    ``layer_error``), and the score's name. Only groups where ``bits`` raises a weight or
    activation width are candidates; ties go to the earlier layer, then data-flow order."""
    _check_budget_bits(budget, bits)
    score = SCORES[0] if score is None else score
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    allowed = set(_candidates(config, max((s.layer for s in stats), default=-1) + 1, bits))
    candidates = [s for s in stats if (s.layer, s.projection) in allowed]
    _check_budget_fits(budget, len(candidates), len(stats), bits)
    order = {p: i for i, p in enumerate(PROJECTIONS)}
    ranked = sorted(candidates, key=lambda s: (-s.score(score), s.layer, order[s.projection]))
    return ranked[:budget], score


def with_mixed_precision(config: HadaquantConfig, kept: list[ProjectionStats], bits: int) -> HadaquantConfig:
    """``config`` with every member linear of the ``kept`` groups raised to ``bits`` (weights
    and activations, where lower; never lowered), merged into existing overrides (their clip
    ratios and other keys are kept). Siblings get identical values."""
    _check_budget_bits(0, bits)
    layers = dict(config.layers)
    for s in kept:
        first = s.linears[0]
        w_bits = config.effective_weight_spec(first).bits
        a_bits = config.effective_act_spec(first).bits
        change = {}
        if w_bits < bits:
            change["weight_bits"] = bits
        if a_bits < bits:
            change["act_bits"] = bits
        if not change:
            continue
        for name in s.linears:
            ov = layers.get(name)
            layers[name] = dataclasses.replace(ov, **change) if ov is not None else LayerOverride(**change)
    return dataclasses.replace(config, layers=layers)


# ---------------------------------------------------------------------------------------------
# The pipeline's entry points (options: hq_vllm.offline.pipeline.QuantizeOptions)
# ---------------------------------------------------------------------------------------------


def _check_budget_bits(budget, bits) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"mixed-precision budget must be an integer ≥ 0 (projection groups to keep), got {budget!r}")
    if isinstance(bits, bool) or bits not in MP_BITS:
        raise ValueError(f"mixed-precision bits must be one of {', '.join(map(str, MP_BITS))}, got {bits!r}")


def check_mixed_precision_options(options) -> None:
    """Refuse bad mixed-precision options when the options are made, not after the weights."""
    _check_budget_bits(options.mp_budget, options.mp_bits)
    for key in ("mp_sequences", "mp_seq_len"):
        v = getattr(options, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "mp_sequences" else 2):
            raise ValueError(f"{key} must be an integer ≥ {1 if key == 'mp_sequences' else 2}, got {v!r}")


def mixed_precision_record(options, kept: list[ProjectionStats], score: str) -> dict:
    """What goes into the checkpoint's ``calibration`` (no timings: same options, same file)."""
    return {"budget": options.mp_budget, "bits": options.mp_bits, "score": score,
            "dataset": "boolq-calibration", "n_samples": options.mp_sequences, "seq_len": options.mp_seq_len,
            "seed": options.seed, "kept": [s.name for s in kept]}


def plan_mixed_precision(model: nn.Module, config: HadaquantConfig, tokenizer, options, *,
                         progress: bool = True) -> tuple[HadaquantConfig, MixedPrecision | None]:
    """The pipeline's step (before the clip search and the weights): measure, choose, and return
    the config with the kept groups' overrides and their record in ``calibration``. With
    ``options.mp_budget == 0`` nothing runs and ``config`` comes back unchanged (and None)."""
    from hq_vllm.offline.data import calibration_batches

    check_mixed_precision_options(options)
    if options.mp_budget == 0:
        return config, None
    n_layers = len(model.model.layers)  # a budget that cannot be met fails before the measurement
    _check_budget_fits(options.mp_budget, len(_candidates(config, n_layers, options.mp_bits)),
                       n_layers * len(PROJECTIONS), options.mp_bits)
    t0 = time.perf_counter()
    ids = calibration_batches(tokenizer, options.mp_seq_len, options.mp_sequences, options.seed)
    stats = measure_projection_stats(model, config, ids, progress=progress)
    kept, score = choose_projections(stats, config, options.mp_budget, options.mp_bits)
    new = with_mixed_precision(config, kept, options.mp_bits)
    record = mixed_precision_record(options, kept, score)
    new = dataclasses.replace(new, calibration={**new.calibration, "mixed_precision": record})
    result = MixedPrecision(stats, kept, options.mp_bits, options.mp_budget, score, time.perf_counter() - t0,
                            {"n_samples": options.mp_sequences, "seq_len": options.mp_seq_len, "seed": options.seed})
    return new, result
