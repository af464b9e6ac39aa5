"""Gradual binary search (GBS) of the activation and KV-cache clip ratios, layer by layer.

A dynamic per-token quantizer scales each row by ``clip · absmax``: a clip below 1 trades the
clipping error of the few largest entries for a finer grid for all the others. The best trade
depends on the projection (the q/k/v input after the norm, the attention context before o_proj,
the gated MLP product after R4 ...) and on the layer, so instead of one fixed clip (QuaRot's
0.9 for activations, 0.95 for KV) GBS finds one per quantizer: layer by layer, projection by
projection, it searches the clip in (0, 1] on a calibration loss, fixes it, and moves on, so
every later search sees the earlier choices.

The quantizers of decoder layer ``i``, in the order searched (the order data flows through the
layer, whichever the direction of the layers):

=============  ========================================================================
``qkv``        input of q/k/v_proj: one quantizer, since vLLM merges them into ``qkv_proj``
``k_cache``    K after RoPE and R3, as stored in the cache (per token and KV head)
``v_cache``    V as stored in the cache
``o_proj``     the attention context entering o_proj
``gate_up``    input of gate/up_proj (one quantizer: vLLM's ``gate_up_proj``)
``down_proj``  input of down_proj, after the online R4 when configured
=============  ========================================================================

A quantizer whose bits are 16 (a w3a16 recipe, or a mixed-precision override) is not searched.

Objective (block-local, why)
    The loss of a candidate clip is the **normalized MSE of the decoder layer's output**:
    ``mean over calibration tokens of ‖y_q − y‖² / ‖y‖²``, where ``y_q`` is the layer's output
    with the candidate (quantized weights, the quantizers already fixed, the candidate, the
    others at their start setting) and ``y`` the output of the **same layer in full precision**
    (FP weights, kept from before the weights were quantized; no activation or KV quantization)
    **on the same input** (the quantized model's stream). Why these choices:

    * A layer output instead of the whole model's perplexity: one candidate costs a part of one
      decoder layer on a few thousand tokens instead of a full forward pass, which is what makes
      a full search take minutes on a CPU instead of GPU-hours (the GBS paper's cost).
    * The whole layer's output, not the projection's own output: a clip on the q/k/v input acts
      through softmax attention, one on the gated product through down_proj; the residual
      stream after the layer is the first place where every quantizer's effect is measured in
      the same units.
    * Normalized per token: the next layer reads ``y / rms(y)`` (every RMSNorm scale is fused
      into the linears after it), so the error that matters downstream is relative to each
      token's own norm. A plain MSE would be dominated by the few tokens with massive residual
      activations (the first token carries 10–100× the norm of the others).
    * The FP layer on the same input (``target="layer"``), not the FP model's output
      (``target="model"``, also available): against the FP model, a layer's input already
      carries the error of all layers before it, and the loss then rewards shrinking any branch
      whose output correlates poorly with the FP one (an MSE-optimal damping, not a better
      quantizer): on SmolLM2 W4A4KV4 that target drove V-cache clips to 0.13–0.19 and one q/k/v
      clip to 0.05, and held-out perplexity came out 84.0 against 65.8 with the layer target
      (fixed clips: 91.7; 16×256 calibration tokens, RTN weights, bf16).

Search (bisection on a dyadic bracket, candidates batched)
    Round 0 evaluates the grid ``0.25, 0.5, 0.75, 1.0`` plus the fixed default clip; each of
    ``rounds`` (default 4) further rounds halves the step and evaluates the two neighbours
    ``best ± step`` of the best clip so far (those inside (0, 1] and not evaluated yet): a
    bisection of the bracket around the best point, ending at a resolution of 1/64 after at most
    5 + 2·4 = 13 evaluations. Ties go to the larger clip. The default is a candidate, so the
    found clip's loss is never above the fixed clip's on the calibration tokens.

    All candidates of one round run as one batched pass: the quantizer's input is quantized at
    every candidate clip at once (:func:`~hq_vllm.offline.quantize.fake_quantize_candidates`)
    and the rest of the layer runs on the ``C × B`` stacked batch.

Caching
    Only the part of the layer after the searched quantizer is recomputed: the norm output, the
    post-RoPE Q/K/V, the attention context, the mid-layer residual and the down_proj input are
    computed once per layer at the fixed settings and reused by every candidate of the later
    quantizers (a down_proj candidate costs one GEMM). The targets cost one FP layer pass per
    layer (or, for ``target="model"``, one FP model pass kept for every layer); in the
    first→last direction the next layer's input is the layer's output at its found clips
    (already computed); last→first uses the inputs of one forward pass of the model at the
    start setting (every earlier layer is unvisited). The searched layer runs as a bfloat16 copy
    by default, with the online Hadamards as two small GEMMs (``H_k ⊗ H_P``) on the CPU.

Start bit-width and direction
    ``start_bits``: the setting of quantizers not visited yet: ``None`` (their target bits at the
    fixed default clip), 16 (unquantized), or another width (at the default clip). With a
    block-local loss it only acts within the current layer (the quantizers after the searched
    one) and, for ``direction="backward"`` (last→first), on the layers before it, whose outputs
    are this layer's input; ``"forward"`` (first→last, the default) feeds each layer the
    outputs of the already-searched ones.

The layer is run in stages as in :mod:`hq_vllm.offline.gptq` (norm → attention → o_proj →
residual → norm → gate/up → down_proj → residual) through the model's own attention module,
with an attention function that hands back Q/K/V after RoPE; R3, the KV fake quantization and
SDPA are then done here exactly as the simulator (:mod:`hq_vllm.offline.simulate`) does them.
The staging is checked against the layer's own forward on the first micro-batch, and the
search is deterministic for given calibration ids (no randomness; candidates in a fixed order).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hq_vllm.format import ACT_BITS, HadaquantConfig, LayerOverride, attention_key
from hq_vllm.kernels.fwht import block_hadamard_transform, hadamard_transform_reference
from hq_vllm.kernels.hadamard import hadamard_factor
from hq_vllm.offline.gptq import _capture_input
from hq_vllm.offline.quantize import fake_quantize_candidates, fake_quantize_kv, fake_quantize_per_token
from hq_vllm.offline.simulate import attach_simulation

__all__ = [
    "DIRECTIONS",
    "GRID",
    "QUANTIZERS",
    "ClipSearch",
    "FullPrecisionReference",
    "begin_clip_search",
    "bisect_clip",
    "check_clip_search_options",
    "clip_search_record",
    "reference_layer_outputs",
    "search_clip_ratios",
    "with_clip_ratios",
]

QUANTIZERS = ("qkv", "k_cache", "v_cache", "o_proj", "gate_up", "down_proj")
#: The HF linears that read each activation quantizer's input (their overrides carry its clip).
QUANTIZER_LINEARS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
#: The attention override's key for each KV quantizer.
KV_OVERRIDE_KEYS = {"k_cache": "k_clip_ratio", "v_cache": "v_clip_ratio"}
DIRECTIONS = ("forward", "backward")
GRID = (0.25, 0.5, 0.75, 1.0)
CAPTURE_ATTENTION = "hadaquant_gbs"


# ---------------------------------------------------------------------------------------------
# The search on one quantizer
# ---------------------------------------------------------------------------------------------


def bisect_clip(losses_of: Callable[[list[float]], list[float]], default: float, *,
                grid: tuple[float, ...] = GRID, rounds: int = 4) -> tuple[float, dict[float, float]]:
    """Minimize a loss over clip ratios in (0, 1]; ``losses_of`` evaluates a batch of candidates.

    Returns the best clip and every ``{clip: loss}`` evaluated (module docstring: round 0 is the
    grid plus ``default``; each further round halves the step and tries ``best ± step``).
    """
    tried: dict[float, float] = {}

    def run(candidates: list[float]) -> None:
        new = [c for c in dict.fromkeys(round(c, 6) for c in candidates) if 0.0 < c <= 1.0 and c not in tried]
        if new:
            losses = losses_of(new)
            tried.update(zip(new, (float(v) for v in losses)))

    def best() -> float:
        return min(tried, key=lambda c: (tried[c], -c))

    run([*grid, default])
    step = min(b - a for a, b in zip(grid, grid[1:])) if len(grid) > 1 else grid[0] / 2
    for _ in range(rounds):
        step /= 2
        b = best()
        run([b - step, b + step])
    return best(), tried


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class ClipSearch:
    """What the search found: per layer, the clip of every searched quantizer and the loss of
    every candidate it evaluated (``losses[i][name][clip]``)."""

    clips: list[dict[str, float]]
    losses: list[dict[str, dict[float, float]]]
    defaults: dict[str, float]
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line: how the clips were searched, how long it took, the fixed defaults."""
        o = self.options
        start = "target bits" if o.get("start_bits") is None else f"{o['start_bits']} bits"
        defaults = ", ".join(f"{n} {c:g}" for n, c in self.defaults.items())
        return (f"GBS ({o.get('direction', 'forward')}, unvisited at {start}, {o.get('rounds')} rounds, "
                f"loss vs the FP {o.get('target', 'layer')}) in {self.seconds:.1f} s; fixed defaults: {defaults}")

    def table(self) -> str:
        """Per-layer clip ratios, one row per layer (``-``: not searched)."""
        head = "  layer  " + " ".join(f"{n:>9}" for n in QUANTIZERS)
        rows = [head]
        for i, found in enumerate(self.clips):
            rows.append(f"  {i:>5}  " + " ".join(f"{found[n]:>9.4f}" if n in found else f"{'-':>9}" for n in QUANTIZERS))
        return "\n".join(rows)


def with_clip_ratios(config: HadaquantConfig, clips: list[dict[str, float]]) -> HadaquantConfig:
    """``config`` with the found clips as ``layers`` overrides: ``act_clip_ratio`` on every linear
    reading a searched input (q/k/v together, gate/up together), ``k_clip_ratio`` /
    ``v_clip_ratio`` on the layer's attention entry. Other override keys are kept."""
    layers = dict(config.layers)

    def put(key: str, name: str, value: float) -> None:
        ov = layers.get(key)
        layers[key] = dataclasses.replace(ov, **{name: value}) if ov is not None else LayerOverride(**{name: value})

    for i, found in enumerate(clips):
        for quantizer, clip in found.items():
            if quantizer in KV_OVERRIDE_KEYS:
                put(attention_key(i), KV_OVERRIDE_KEYS[quantizer], clip)
            else:
                for linear in QUANTIZER_LINEARS[quantizer]:
                    put(f"model.layers.{i}.{linear}", "act_clip_ratio", clip)
    return dataclasses.replace(config, layers=layers)


# ---------------------------------------------------------------------------------------------
# Full-precision targets
# ---------------------------------------------------------------------------------------------


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@dataclass
class FullPrecisionReference:
    """What the search compares against, recorded before the weights are quantized: every
    decoder layer's output in the full-precision model (``outputs[layer][micro-batch]``, float32
    on the CPU), and for ``target="layer"`` each layer's full-precision parameters."""

    outputs: list[list[torch.Tensor]]
    micro_batch: int
    layer_states: list[dict[str, torch.Tensor]] | None = None


def reference_layer_outputs(model: nn.Module, config: HadaquantConfig, calib_ids: torch.Tensor, *,
                            micro_batch: int = 4, keep_layers: bool = False,
                            progress: bool = True) -> FullPrecisionReference:
    """The full-precision reference of :func:`search_clip_ratios` (call it before the weights are
    quantized; the online rotations of ``config`` are applied, activations and KV are not
    quantized), on micro-batches of ``micro_batch`` rows of ``calib_ids``. ``keep_layers``: also
    keep a CPU copy of every decoder layer's parameters (for ``target="layer"``)."""
    device = next(model.parameters()).device
    layers = model.model.layers
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.register_forward_hook(
        lambda mod, args, out, i=i: outputs[i].append(_layer_output(out).detach().float().cpu()))
        for i, layer in enumerate(layers)]
    # R4's transpose is fused into down_proj: the model is only itself with the online R4.
    sim = attach_simulation(model, _start_config(config, 16))
    try:
        with torch.no_grad():
            for ids in tqdm(calib_ids.split(micro_batch), desc="gbs reference", unit="batch", disable=not progress):
                model.model(input_ids=ids.to(device), use_cache=False)
    finally:
        sim.detach()
        for handle in handles:
            handle.remove()
    states = None
    if keep_layers:
        states = [{k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()} for layer in layers]
    return FullPrecisionReference(outputs, micro_batch, states)


# ---------------------------------------------------------------------------------------------
# Staged decoder layer with batched candidates
# ---------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the capturing attention function: carries Q, K, V after RoPE and the rest."""

    def __init__(self, query, key, value, mask, kwargs):
        super().__init__()
        self.qkv, self.mask, self.kwargs = (query, key, value), mask, kwargs


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    if getattr(module, "hq_gbs_passthrough", False):  # the staging check runs the plain layer
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    raise _Captured(query, key, value, attention_mask, kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capturing_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


def _match(t, n: int):
    """``t`` tiled along its batch dim to ``n`` rows (tensors of batch 1 broadcast; tuples,
    lists and dicts recursively; anything else unchanged)."""
    if isinstance(t, torch.Tensor):
        if t.dim() == 0 or t.shape[0] in (1, n):
            return t
        if n % t.shape[0]:
            raise ValueError(f"cannot tile a batch of {t.shape[0]} to {n}")
        return t.repeat(n // t.shape[0], *([1] * (t.dim() - 1)))
    if isinstance(t, (tuple, list)):
        return type(t)(_match(x, n) for x in t)
    if isinstance(t, dict):
        return {k: _match(v, n) for k, v in t.items()}
    return t


class _OnlineHadamard:
    """An online rotation as the simulator applies it (R3: Hadamard over head_dim; R4:
    block-diagonal over the intermediate size). On CUDA it is the FWHT kernel; on the CPU, where
    the torch reference's butterflies would take most of the search's time, it is two GEMMs with
    the dense factors of ``H_n = H_k ⊗ H_P`` (``n = k·P``), built once."""

    def __init__(self, size: int, block: int | None, device: torch.device):
        self.size, self.block = size, block or size
        self.factors = None
        if device.type != "cuda":
            f = hadamard_factor(self.block)
            # The reference applied to the identity: exactly its matrices, scale 1/sqrt(n) split.
            self.factors = (
                hadamard_transform_reference(torch.eye(f.k, dtype=torch.float64)).to(torch.float32),
                hadamard_transform_reference(torch.eye(f.pow2, dtype=torch.float64)).to(torch.float32),
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"online Hadamard expects {self.size} channels, got {x.shape[-1]}")
        if self.factors is None:
            return block_hadamard_transform(x, self.block)
        hk, hp = (f.to(x.device, x.dtype) for f in self.factors)
        k, p = hk.shape[0], hp.shape[0]
        y = x.reshape(-1, k, p) @ hp  # (x @ kron(Hk, Hp))[a, b] = Σ Hk[i, a] x[i, j] Hp[j, b]
        if k > 1:
            y = (y.transpose(1, 2) @ hk).transpose(1, 2)
        return y.reshape(x.shape)


def _add_tiled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` where one of them may carry ``C`` candidates stacked on the batch dim."""
    if a.shape[0] == b.shape[0]:
        return a + b
    big, small = (a, b) if a.shape[0] > b.shape[0] else (b, a)
    return (big.view(-1, *small.shape) + small).view(big.shape)


def _cast_floats(t, dtype: torch.dtype):
    """Floating tensors in ``t`` (recursively through tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype) if t.is_floating_point() else t
    if isinstance(t, (tuple, list)):
        return type(t)(_cast_floats(x, dtype) for x in t)
    if isinstance(t, dict):
        return {k: _cast_floats(v, dtype) for k, v in t.items()}
    return t


@dataclass(frozen=True)
class _Quantizer:
    name: str
    bits: int  # target bits; 16: not searched, never quantized
    symmetric: bool
    kv: bool  # K/V cache (float16 scales) rather than a linear input
    default: float  # the fixed clip of the config

    def apply(self, x: torch.Tensor, setting) -> torch.Tensor:
        """``setting``: None (off), ``(bits, clip)`` or ``(bits, tensor of C clips)`` → the batch
        grows from B to C·B, candidate-major."""
        if setting is None:
            return x
        bits, clip = setting
        if isinstance(clip, torch.Tensor):
            return fake_quantize_candidates(x, bits, clip, self.symmetric, kv=self.kv).flatten(0, 1)
        return (fake_quantize_kv if self.kv else fake_quantize_per_token)(x, bits, clip, self.symmetric)


def _layer_quantizers(config: HadaquantConfig, i: int) -> dict[str, _Quantizer]:
    out = {}
    for name in QUANTIZERS:
        if name in KV_OVERRIDE_KEYS:
            k, v = config.effective_kv_specs(attention_key(i))
            spec = k if name == "k_cache" else v
            out[name] = _Quantizer(name, spec.bits, spec.symmetric, True, spec.clip_ratio)
        else:
            spec = config.effective_act_spec(f"model.layers.{i}.{QUANTIZER_LINEARS[name][0]}")
            out[name] = _Quantizer(name, spec.bits, spec.symmetric, False, spec.clip_ratio)
    return out


class _StagedLayer:
    """One decoder layer on the calibration micro-batches, run from any quantizer onward.

    ``cache`` holds, per micro-batch, each stage's input at the fixed settings (see the module
    docstring); ``forward_from(name, m, settings)`` recomputes from quantizer ``name`` on.
    """

    def __init__(self, layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], *,
                 r3: _OnlineHadamard | None, r4: _OnlineHadamard | None):
        self.layer, self.attn, self.mlp = layer, layer.self_attn, layer.mlp
        self.hidden, self.kwargs = hidden, kwargs
        self.r3, self.r4 = r3, r4
        self.cache: dict[str, list] = {"x1": [layer.input_layernorm(h) for h in hidden]}

    # -- stages -------------------------------------------------------------------------------

    def qkv(self, m: int, q: _Quantizer, setting):
        x = q.apply(self.cache["x1"][m], setting)
        try:
            self.attn(hidden_states=x, **_match(self.kwargs[m], x.shape[0]))
        except _Captured as c:
            return c
        raise RuntimeError(f"{type(self.attn).__name__} never called its attention function")

    def context(self, cap: _Captured, qs: dict[str, _Quantizer], settings: dict) -> torch.Tensor:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        query, key, value = cap.qkv
        if self.r3 is not None:
            query, key = self.r3(query), self.r3(key)
        key = qs["k_cache"].apply(key, settings["k_cache"])
        value = qs["v_cache"].apply(value, settings["v_cache"])
        n = max(query.shape[0], key.shape[0], value.shape[0])
        query, key, value = _match(query, n), _match(key, n), _match(value, n)
        out, _ = sdpa_attention_forward(self.attn, query, key, value, _match(cap.mask, n), **_match(cap.kwargs, n))
        return out.reshape(n, out.shape[1], -1)

    def mid(self, m: int, ctx: torch.Tensor, q: _Quantizer, setting) -> torch.Tensor:
        return _add_tiled(self.hidden[m], self.attn.o_proj(q.apply(ctx, setting)))

    def down_input(self, x2: torch.Tensor, q: _Quantizer, setting) -> torch.Tensor:
        x = q.apply(x2, setting)
        y = self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)
        return y if self.r4 is None else self.r4(y)

    def out(self, h_mid: torch.Tensor, dn: torch.Tensor, q: _Quantizer, setting) -> torch.Tensor:
        return _add_tiled(h_mid, self.mlp.down_proj(q.apply(dn, setting)))

    # -- from a quantizer on ------------------------------------------------------------------

    def forward_from(self, name: str, m: int, qs: dict[str, _Quantizer], settings: dict) -> torch.Tensor:
        start = QUANTIZERS.index(name)
        c = self.cache
        ctx = h_mid = x2 = dn = None
        if start <= QUANTIZERS.index("v_cache"):
            cap = self.qkv(m, qs["qkv"], settings["qkv"]) if start == 0 else c["qkv"][m]
            ctx = self.context(cap, qs, settings)
        if start <= QUANTIZERS.index("o_proj"):
            ctx = c["ctx"][m] if ctx is None else ctx
            h_mid = self.mid(m, ctx, qs["o_proj"], settings["o_proj"])
            x2 = self.layer.post_attention_layernorm(h_mid)
        if start <= QUANTIZERS.index("gate_up"):
            if h_mid is None:
                h_mid, x2 = c["mid"][m], c["x2"][m]
            dn = self.down_input(x2, qs["gate_up"], settings["gate_up"])
        if dn is None:
            h_mid, dn = c["mid"][m], c["dn"][m]
        return self.out(h_mid, dn, qs["down_proj"], settings["down_proj"])

    def fix(self, name: str, qs: dict[str, _Quantizer], settings: dict) -> list[torch.Tensor] | None:
        """Cache the stage after quantizer ``name`` at the (now fixed) settings; after down_proj
        return the layer's outputs."""
        c, n = self.cache, len(self.hidden)
        if name == "qkv":
            c["qkv"] = [self.qkv(m, qs["qkv"], settings["qkv"]) for m in range(n)]
        elif name == "v_cache":
            c["ctx"] = [self.context(cap, qs, settings) for cap in c["qkv"]]
            del c["qkv"]
        elif name == "o_proj":
            c["mid"] = [self.mid(m, c["ctx"][m], qs["o_proj"], settings["o_proj"]) for m in range(n)]
            c["x2"] = [self.layer.post_attention_layernorm(h) for h in c["mid"]]
            del c["ctx"]
        elif name == "gate_up":
            c["dn"] = [self.down_input(x2, qs["gate_up"], settings["gate_up"]) for x2 in c["x2"]]
            del c["x2"]
        elif name == "down_proj":
            return [self.out(c["mid"][m], c["dn"][m], qs["down_proj"], settings["down_proj"]) for m in range(n)]
        return None


def _normalized_errors(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ``‖out − target‖² / ‖target‖²`` for each of the ``C`` stacked candidates
    (float32)."""
    c = out.shape[0] // target.shape[0]
    target = target.float()
    err = out.view(c, *target.shape).float() - target
    num = err.square_().sum(-1)
    den = target.square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return num.div_(den).flatten(1).sum(1)


def _check_staging(staged: _StagedLayer, qs: dict[str, _Quantizer], kwargs: dict) -> None:
    """Refuse a decoder layer whose forward is not the staged one (a new architecture)."""
    off = dict.fromkeys(QUANTIZERS)
    got = staged.forward_from("qkv", 0, qs, off)
    hook = None
    if staged.r4 is not None:  # R4 is online: outside the model's own forward
        hook = staged.mlp.down_proj.register_forward_pre_hook(
            lambda m, a: (block_hadamard_transform(a[0], staged.r4.block), *a[1:]))
    staged.attn.hq_gbs_passthrough = True
    try:
        ref = _layer_output(staged.layer(staged.hidden[0], **kwargs))
    finally:
        del staged.attn.hq_gbs_passthrough
        if hook is not None:
            hook.remove()
    if float((got - ref).norm()) > 1e-4 * float(ref.norm()):
        raise NotImplementedError(
            f"{type(staged.layer).__name__}: the decoder layer is not the pre-norm attention + gated "
            "MLP that the clip search's staged forward assumes"
        )


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


def _start_config(config: HadaquantConfig, start_bits: int | None) -> HadaquantConfig:
    if start_bits is None:
        return config
    return dataclasses.replace(
        config,
        activation=dataclasses.replace(config.activation, bits=start_bits),
        kv_cache=dataclasses.replace(config.kv_cache, bits=start_bits),
    )


def _layer_inputs(model: nn.Module, config: HadaquantConfig, chunks, device) -> list[list[torch.Tensor]]:
    """Every decoder layer's input in the simulated model ``config`` describes (one pass)."""
    layers = model.model.layers
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(mod, args, kwargs, i):
        x = args[0] if args else kwargs["hidden_states"]
        inputs[i].append(x.detach().float())

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    sim = attach_simulation(model, config)
    try:
        for ids in chunks:
            model.model(input_ids=ids.to(device), use_cache=False)
    finally:
        sim.detach()
        for handle in handles:
            handle.remove()
    return inputs


TARGETS = ("model", "layer")


def search_clip_ratios(
    model: nn.Module,
    config: HadaquantConfig,
    calib_ids: torch.Tensor,
    reference: FullPrecisionReference,
    *,
    start_bits: int | None = None,
    direction: str = "forward",
    rounds: int = 4,
    target: str = "layer",
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ClipSearch:
    """GBS over every decoder layer of ``model`` (weights already quantized as they will be
    served; no simulation hooks attached) on ``calib_ids [S, T]``, against ``reference`` (from
    :func:`reference_layer_outputs` on the same ids, before the weights were quantized). Returns
    the found clips; :func:`with_clip_ratios` puts them in a config.

    ``target``: ``"layer"`` compares each layer's output with the full-precision layer applied
    to the same (quantized-stream) input; ``"model"`` with the full-precision model's output
    (module docstring: why "layer" is the default).
    ``compute_dtype``: the searched layer runs in this dtype (a copy of it, bfloat16 as vLLM
    serves, several times faster on CPUs with AMX); the fake quantization and the loss are
    float32 either way.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if start_bits is not None and (isinstance(start_bits, bool) or start_bits not in ACT_BITS):
        raise ValueError(f"start_bits must be None (the target bits) or one of {ACT_BITS}, got {start_bits!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be ≥ 0, got {rounds}")
    if len(set(getattr(model.config, "layer_types", None) or ())) > 1:
        raise NotImplementedError("the clip search gives every layer the attention mask of layer 0; this model "
                                  f"mixes attention kinds {sorted(set(model.config.layer_types))}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    layers = model.model.layers
    chunks = calib_ids.split(reference.micro_batch)
    if len(reference.outputs) != len(layers) or any(len(r) != len(chunks) for r in reference.outputs):
        raise ValueError("the reference does not match the model's layers and the calibration micro-batches "
                         "(make it with reference_layer_outputs on the same calib_ids)")
    if target == "layer" and reference.layer_states is None:
        raise ValueError('target="layer" needs the reference made with keep_layers=True')
    rot = config.rotation
    r3 = None if rot.r3 is None else _OnlineHadamard(rot.r3["size"], None, device)
    r4 = None if rot.r4 is None else _OnlineHadamard(rot.r4["size"], rot.r4_block_size, device)
    n_tokens = calib_ids.numel()
    quantizers = [_layer_quantizers(config, i) for i in range(len(layers))]
    searched = [[n for n in QUANTIZERS if qs[n].bits < 16] for qs in quantizers]
    defaults = {n: quantizers[0][n].default for n in QUANTIZERS}
    clips: list[dict[str, float]] = [{} for _ in layers]
    losses: list[dict[str, dict[float, float]]] = [{} for _ in layers]
    order = list(range(len(layers))) if direction == "forward" else list(range(len(layers)))[::-1]
    off = dict.fromkeys(QUANTIZERS)

    def unvisited(q: _Quantizer):
        bits = q.bits if start_bits is None else start_bits
        return None if q.bits >= 16 or bits >= 16 else (bits, q.default)

    def working_copy(layer: nn.Module) -> nn.Module:
        """The layer in ``compute_dtype``: a copy, since the float32 weights hold the exact
        dequantized values (not all of them are bfloat16 numbers)."""
        return layer if compute_dtype == torch.float32 else copy.deepcopy(layer).to(compute_dtype)

    previous_attention = model.config._attn_implementation
    with torch.no_grad():
        start_inputs = None
        if direction == "backward":
            start_inputs = _layer_inputs(model, _start_config(config, start_bits), chunks, device)
        _register_capture()
        model.set_attn_implementation(CAPTURE_ATTENTION)
        bar = tqdm(total=sum(len(s) for s in searched), desc="gbs", unit="clip", disable=not progress)
        try:
            firsts = [_capture_input(layers[0], lambda ids=ids: model(input_ids=ids.to(device), use_cache=False),
                                     with_kwargs=True) for ids in chunks]
            kwargs32 = [kw for _, kw in firsts]
            kwargs = _cast_floats(kwargs32, compute_dtype)
            hidden = [x.to(compute_dtype) for x, _ in firsts]
            for step, i in enumerate(order):
                qs = quantizers[i]
                inputs = hidden if direction == "forward" else [h.to(compute_dtype) for h in start_inputs[i]]
                if step == 0:  # float32, for a tight tolerance
                    _check_staging(_StagedLayer(layers[i], [inputs[0].float()], kwargs32[:1], r3=r3, r4=r4),
                                   qs, kwargs32[0])
                if target == "model":
                    targets = [t.to(device) for t in reference.outputs[i]]
                else:
                    fp_layer = copy.deepcopy(layers[i])
                    fp_layer.load_state_dict(reference.layer_states[i])
                    fp = _StagedLayer(fp_layer, [h.float() for h in inputs], kwargs32, r3=r3, r4=r4)
                    targets = [fp.forward_from("qkv", m, qs, off).float() for m in range(len(chunks))]
                    del fp, fp_layer
                staged = _StagedLayer(working_copy(layers[i]), inputs, kwargs, r3=r3, r4=r4)
                settings = {n: unvisited(qs[n]) for n in QUANTIZERS}
                outputs = None
                for name in QUANTIZERS:
                    q = qs[name]
                    if q.bits < 16:
                        bar.set_postfix_str(f"layer {i} {name}")

                        def losses_of(cands: list[float], name=name, q=q) -> list[float]:
                            trial = dict(settings, **{name: (q.bits, torch.tensor(cands, dtype=torch.float64))})
                            total = torch.zeros(len(cands), dtype=torch.float64)
                            for m in range(len(chunks)):
                                out = staged.forward_from(name, m, qs, trial)
                                total += _normalized_errors(out, targets[m]).double().cpu()
                            return (total / n_tokens).tolist()

                        best, tried = bisect_clip(losses_of, q.default, rounds=rounds)
                        settings[name] = (q.bits, best)
                        clips[i][name], losses[i][name] = best, tried
                        bar.update(1)
                    else:
                        settings[name] = None
                    outputs = staged.fix(name, qs, settings)
                if direction == "forward":
                    hidden = outputs
                del staged, targets
        finally:
            bar.close()
            model.set_attn_implementation(previous_attention)
    options = {"start_bits": start_bits, "direction": direction, "rounds": rounds, "target": target,
               "dtype": str(compute_dtype).removeprefix("torch.")}
    return ClipSearch(clips, losses, defaults, time.perf_counter() - t0, options)


# ---------------------------------------------------------------------------------------------
# The pipeline's entry points (options: hq_vllm.offline.pipeline.QuantizeOptions)
# ---------------------------------------------------------------------------------------------

CLIP_SEARCHES = ("fixed", "gbs")
DTYPES = ("bfloat16", "float32")
MICRO_BATCH_TOKENS = 1024  # calibration tokens per micro-batch (times the candidates of a round)


def check_clip_search_options(options) -> None:
    """Refuse bad clip-search options when the options are made, not after the weights."""
    if options.clip_search not in CLIP_SEARCHES:
        raise ValueError(f"clip_search must be one of {', '.join(CLIP_SEARCHES)}, got {options.clip_search!r}")
    if options.gbs_direction not in DIRECTIONS:
        raise ValueError(f"gbs_direction must be one of {', '.join(DIRECTIONS)}, got {options.gbs_direction!r}")
    sb = options.gbs_start_bits
    if sb is not None and (isinstance(sb, bool) or sb not in ACT_BITS):
        raise ValueError(f"gbs_start_bits must be None (the target bits) or one of {ACT_BITS}, got {sb!r}")
    if not (options.gbs_sequences > 0 and options.gbs_seq_len > 1 and options.gbs_rounds >= 0):
        raise ValueError("GBS needs gbs_sequences > 0, gbs_seq_len > 1 and gbs_rounds >= 0")
    if options.gbs_target not in TARGETS:
        raise ValueError(f"gbs_target must be one of {', '.join(TARGETS)}, got {options.gbs_target!r}")
    if options.gbs_dtype not in DTYPES:
        raise ValueError(f"gbs_dtype must be one of {', '.join(DTYPES)}, got {options.gbs_dtype!r}")


def clip_search_record(options) -> dict:
    """What goes into the checkpoint's ``calibration`` about the clip search (nothing when the
    clips are fixed, so such checkpoints are as before). No timings: same options, same file."""
    if options.clip_search != "gbs":
        return {}
    return {"clip_search": "gbs", "gbs": {
        "dataset": "boolq-calibration", "n_samples": options.gbs_sequences, "seq_len": options.gbs_seq_len,
        "seed": options.seed, "start_bits": options.gbs_start_bits, "direction": options.gbs_direction,
        "rounds": options.gbs_rounds, "grid": list(GRID), "dtype": options.gbs_dtype,
        "objective": f"normalized MSE of each decoder layer's output vs the full-precision {options.gbs_target}",
    }}


@dataclass
class _PendingSearch:
    ids: torch.Tensor
    reference: FullPrecisionReference
    options: object
    progress: bool
    reference_seconds: float = 0.0

    def finish(self, model: nn.Module, config: HadaquantConfig) -> tuple[HadaquantConfig, ClipSearch]:
        """Search on the quantized model; the config with the found clips, and the result."""
        o = self.options
        result = search_clip_ratios(model, config, self.ids, self.reference, start_bits=o.gbs_start_bits,
                                    direction=o.gbs_direction, rounds=o.gbs_rounds, target=o.gbs_target,
                                    compute_dtype=getattr(torch, o.gbs_dtype), progress=self.progress)
        result.seconds += self.reference_seconds
        return with_clip_ratios(config, result.clips), result


def begin_clip_search(model: nn.Module, config: HadaquantConfig, tokenizer, options, *,
                    progress: bool = True) -> _PendingSearch | None:
    """Start the clip search before the weights are quantized (it needs the full-precision
    layer outputs); ``.finish(model, config)`` after them. None when ``options.clip_search`` is
    ``"fixed"`` or nothing is quantized at run time."""
    from hq_vllm.offline.data import calibration_batches

    if options.clip_search != "gbs":
        return None
    if not any(q.bits < 16 for i in range(len(model.model.layers)) for q in _layer_quantizers(config, i).values()):
        return None
    t0 = time.perf_counter()
    ids = calibration_batches(tokenizer, options.gbs_seq_len, options.gbs_sequences, options.seed)
    micro_batch = max(1, MICRO_BATCH_TOKENS // options.gbs_seq_len)
    reference = reference_layer_outputs(model, config, ids, micro_batch=micro_batch,
                                        keep_layers=options.gbs_target == "layer", progress=progress)
    return _PendingSearch(ids, reference, options, progress, time.perf_counter() - t0)
