"""``vllm serve PLAIN_HF_MODEL --quantization hadaquant``: quantize at load time, no offline step.

A plain Hugging Face model has no hadaquant ``quantization_config``, so vLLM builds
``HadaquantQuantizationConfig()`` without one; that config is then *online*: every decoder linear
(q/k/v/o/gate/up/down, and vLLM's merged ``qkv_proj`` / ``gate_up_proj``) gets
:class:`HadaquantOnlineLinearMethod`, which needs no rotation fused offline. For a linear with
``K`` inputs on this rank and ``H_K`` the orthonormal Hadamard matrix of order ``K``
(``hq_vllm.kernels.hadamard``; Paley constructions for sizes such as 576 or 1536):

* at load: ``W_rot = W @ H_K`` (each row rotated), then round-to-nearest group-wise on
  ``W_rot`` with the offline tool's grid (``hq_vllm.kernels.quant.rtn_quantize``: symmetric by
  default, float16 scales rounded up, zero-scale guard), packed as a checkpoint would store it;
* per token: ``x_rot = x @ H_K`` (``hadamard_transform``), dynamic per-token activation
  quantization of ``x_rot``, then ``x_rot @ deq(W_rot)^T + bias``.

Because ``H_K`` is orthogonal, ``x W^T = (x H_K)(W H_K)^T``: with 16-bit weights and activations
this is the unquantized model up to float rounding; the rotation spreads outlier channels over
all ``K`` so that low-bit grids fit. ``K`` is rank-local: a row-parallel shard (o_proj,
down_proj under tensor parallelism) rotates its own ``K / tp`` slice of the input and of the
weight, so each shard's partial product, and hence their sum, is unchanged.

Settings come from ``--hf-overrides '{"hadaquant": {...}}'`` (vLLM sets the dict as the
attribute ``hadaquant`` of the model's HF config, which :meth:`maybe_update_config` receives).
Keys and defaults (:class:`OnlineSettings`): ``weight_bits`` 4, ``group_size`` 128 (when not given,
lowered to 64 or 32 until it divides every linear's input size, e.g. 64 for SmolLM2's 576),
``weight_symmetric`` true, ``mse_clip`` false, ``act_bits`` 16, ``act_clip_ratio`` 0.9,
``kv_bits`` 16, ``kv_clip_ratio`` 0.95 (a clip ratio is 1.0 when its bits are 16). They become
an ordinary :class:`hq_vllm.format.HadaquantConfig` (``kv_cache`` from the kv keys, and
``rotation.r3`` = Hadamard over head_dim when ``kv_bits`` < 16, which the attention side reads as
for a checkpoint); ``rotation.r1/r2/r4`` stay null, as nothing was fused offline.

This module imports vllm at its top; :mod:`hq_vllm.quant_method` imports it lazily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from hq_vllm.format import (
    ActQuantSpec,
    CheckpointFormatError,
    HadaquantConfig,
    KVCacheSpec,
    RotationSpec,
    WeightQuantSpec,
    check_architecture,
    pack_linear,
    unpack_linear,
)
from hq_vllm.kernels.fwht import hadamard_transform
from hq_vllm.kernels.hadamard import UnsupportedHadamardSize, hadamard_factor, is_supported
from hq_vllm.kernels.quant import rtn_quantize
from hq_vllm.quant_method import quantize_linear_input  # noqa: F401  (registers the op we call)

__all__ = [
    "SETTINGS_KEY",
    "HadaquantOnlineLinearMethod",
    "OnlineSettings",
    "default_online_config",
    "online_config",
    "online_linear_method",
    "parse_online_settings",
    "reject_online_settings",
]

#: The ``--hf-overrides`` key (and HF config attribute) holding the online settings.
SETTINGS_KEY = "hadaquant"
_WHERE = f"hf_overrides.{SETTINGS_KEY}"
_PACK_BLOCK = 32  # input channels per packing block (kernels/packing.py)
_DEFAULT_GROUP_SIZE = 128
_MIN_GROUP_SIZE = 32
_TP_CANDIDATES = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineSettings:
    """What ``--hf-overrides '{"hadaquant": {...}}'`` may set; ``None`` = the documented default
    that depends on another value (group size on the model's sizes, clip ratios on the bits)."""

    weight_bits: int = 4
    group_size: int | None = None
    weight_symmetric: bool = True
    mse_clip: bool = False
    act_bits: int = 16
    act_clip_ratio: float | None = None
    kv_bits: int = 16
    kv_clip_ratio: float | None = None

    def weight_spec(self, group_size: int) -> WeightQuantSpec:
        return _spec(WeightQuantSpec, {"weight_bits": "bits", "group_size": "group_size",
                                       "weight_symmetric": "symmetric", "mse_clip": "mse_clip"},
                     {"weight_bits": self.weight_bits, "group_size": group_size,
                      "weight_symmetric": self.weight_symmetric, "mse_clip": self.mse_clip})

    def act_spec(self) -> ActQuantSpec:
        clip = self.act_clip_ratio
        if clip is None:
            clip = 0.9 if self.act_bits < 16 else 1.0
        return _spec(ActQuantSpec, {"act_bits": "bits", "act_clip_ratio": "clip_ratio"},
                     {"act_bits": self.act_bits, "act_clip_ratio": clip}, symmetric=True)

    def kv_spec(self) -> KVCacheSpec:
        clip = self.kv_clip_ratio
        if clip is None:
            clip = 0.95 if self.kv_bits < 16 else 1.0
        return _spec(KVCacheSpec, {"kv_bits": "bits", "kv_clip_ratio": "clip_ratio"},
                     {"kv_bits": self.kv_bits, "kv_clip_ratio": clip})


def _settings_error(key: str, value: Any, reason: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{_WHERE}.{key} = {value!r}: {reason}", key=key, value=value,
                                 reason=reason, where=_WHERE)


def _spec(cls: type, fields: dict[str, str], values: dict[str, Any], **fixed: Any):
    """``cls(...)`` from settings keys; the format's range checks, reported under our key names."""
    try:
        return cls(**{fields[k]: v for k, v in values.items()}, **fixed)
    except CheckpointFormatError as e:
        key = next((k for k, f in fields.items() if f == e.key), None)
        if key is None:
            raise
        raise _settings_error(key, values[key], e.reason) from None


def parse_online_settings(raw: Any) -> OnlineSettings:
    """Strictly parse the ``hadaquant`` dict of ``--hf-overrides`` (``None``: all defaults).

    Every value is range-checked here, with the format's own checks, so a bad setting fails
    while vLLM builds its config, naming the key (e.g. ``hf_overrides.hadaquant.weight_bits = 9:
    out of range ...``).
    """
    if raw is None:
        return OnlineSettings()
    allowed = [f.name for f in dataclasses.fields(OnlineSettings)]
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(
            f"{_WHERE} must be a JSON object with keys {', '.join(allowed)}; got {raw!r}"
        )
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise CheckpointFormatError(
            f"{_WHERE}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})", key=unknown[0]
        )
    settings = OnlineSettings(**raw)
    # Check every value now (group size and clip defaults are resolved against the model later).
    gs = settings.group_size
    settings.weight_spec(_DEFAULT_GROUP_SIZE if gs is None else gs)
    settings.act_spec()  # a given clip ratio is checked even where 16 bits ignore it
    settings.kv_spec()
    return settings


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def reject_online_settings(hf_config: Any) -> None:
    """A hadaquant checkpoint's own ``quantization_config`` decides everything: refuse online
    settings given next to it rather than silently ignoring them."""
    if hf_config is not None and _get(hf_config, SETTINGS_KEY) is not None:
        raise CheckpointFormatError(
            f"{_WHERE} is for serving a plain Hugging Face model with --quantization hadaquant; "
            "this model is already a hadaquant checkpoint, whose quantization_config decides the "
            f"bits (drop the {SETTINGS_KEY!r} hf_overrides, or serve the original model)"
        )


# ---------------------------------------------------------------------------------------------
# Settings + model -> HadaquantConfig
# ---------------------------------------------------------------------------------------------


def _model_sizes(hf_config: Any) -> dict[str, int]:
    def need(key: str) -> int:
        v = _get(hf_config, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointFormatError(f"model config: {key} = {v!r} is not a positive integer")
        return v

    hidden, inter, heads = need("hidden_size"), need("intermediate_size"), need("num_attention_heads")
    head_dim = _get(hf_config, "head_dim") or hidden // heads
    return {"hidden": hidden, "intermediate": inter, "heads": heads, "head_dim": head_dim,
            "attn_out": heads * head_dim}


def _fit_group_size(requested: int | None, in_features: list[int]) -> int:
    """An explicit group size must divide every linear's input size; the default (128) is halved
    down to 32 until it does (as ``hadaquant quantize`` does: SmolLM2's 576 gets 64)."""
    if requested is not None:
        bad = sorted({k for k in in_features if requested != -1 and k % requested})
        if bad:
            raise _settings_error(
                "group_size", requested,
                f"must divide every linear's input size (this model has {sorted(set(in_features))}; "
                f"{bad[0]} is not a multiple); use a divisor or -1 (per output channel)",
            )
        return requested
    g = _DEFAULT_GROUP_SIZE
    while g >= _MIN_GROUP_SIZE:
        if all(k % g == 0 for k in in_features):
            return g
        g //= 2
    raise _settings_error(
        "group_size", None,
        f"no default group size (128, 64, 32) divides every linear's input size "
        f"{sorted(set(in_features))}; set group_size to -1 (per output channel)",
    )


def _shard_problem(k: int, weight: WeightQuantSpec) -> str | None:
    """Why ``k`` input channels on one rank cannot be rotated and quantized, or None."""
    if not is_supported(k):
        return f"no Hadamard matrix of order {k} is available for the online rotation"
    if weight.bits < 16:
        if k % _PACK_BLOCK:
            return f"{k} is not a multiple of the packing block ({_PACK_BLOCK})"
        if weight.group_size != -1 and k % weight.group_size:
            return f"{k} is not a multiple of group_size {weight.group_size}"
    return None


def _tp_sizes(sizes: dict[str, int], weight: WeightQuantSpec) -> list[int]:
    """TP degrees whose shards all work: heads and the row-parallel inputs split evenly, and every
    rank-local input size has a Hadamard matrix and whole packing blocks and groups."""
    out = []
    for tp in _TP_CANDIDATES:
        if sizes["heads"] % tp or sizes["intermediate"] % tp:
            continue
        ks = [sizes["hidden"], sizes["attn_out"] // tp, sizes["intermediate"] // tp]
        if all(_shard_problem(k, weight) is None for k in ks):
            out.append(tp)
    return out


def online_config(hf_config: Any) -> HadaquantConfig:
    """The :class:`HadaquantConfig` to serve ``hf_config``'s model with, from its ``hadaquant``
    settings (``--hf-overrides``) or the defaults. Raises a :class:`CheckpointFormatError` naming
    the key, or :class:`hq_vllm.format.UnsupportedArchitecture`, before anything is loaded."""
    settings = parse_online_settings(_get(hf_config, SETTINGS_KEY))
    check_architecture(hf_config)
    sizes = _model_sizes(hf_config)
    in_features = [sizes["hidden"], sizes["attn_out"], sizes["intermediate"]]
    weight = settings.weight_spec(_fit_group_size(settings.group_size, in_features))
    for k in in_features:
        problem = _shard_problem(k, weight)
        if problem is not None:
            raise CheckpointFormatError(
                f"--quantization hadaquant on this model: a linear has {k} input channels and "
                f"{problem}"
            )
    act, kv = settings.act_spec(), settings.kv_spec()
    rotation = RotationSpec()
    if kv.bits < 16:  # R3: Q and K rotated after RoPE so the quantized cache holds rotated K
        head_dim = sizes["head_dim"]
        try:
            factor_k = hadamard_factor(head_dim).k
        except UnsupportedHadamardSize as e:
            raise _settings_error("kv_bits", kv.bits, f"needs the R3 rotation over head_dim: {e}") from None
        rotation = RotationSpec(r3={"kind": "hadamard", "size": head_dim, "factor_k": factor_k})
    return HadaquantConfig(
        weight=weight,
        activation=act,
        kv_cache=kv,
        rotation=rotation,
        tp_sizes=_tp_sizes(sizes, weight) or [1],
        recipe=f"online-rtn-w{weight.bits}a{act.bits}kv{kv.bits}",
        calibration={"weight_method": "rtn", "online_rotation": "hadamard per linear input",
                     "settings": SETTINGS_KEY + " hf_overrides"},
    )


def default_online_config() -> HadaquantConfig:
    """The config before the model is known (vLLM builds the quant config, then calls
    ``maybe_update_config`` with the HF config): the defaults at group size 128."""
    s = OnlineSettings()
    return HadaquantConfig(weight=s.weight_spec(_DEFAULT_GROUP_SIZE), activation=s.act_spec(),
                           kv_cache=s.kv_spec(), recipe="online-rtn")


# ---------------------------------------------------------------------------------------------
# The linear method
# ---------------------------------------------------------------------------------------------


def online_linear_method(quant_config: Any, prefix: str) -> LinearMethodBase:
    """The method for a ``LinearBase`` layer of an online config: a decoder linear (HF or vLLM
    merged name) is rotated and quantized, any other linear stays unquantized."""
    try:
        quant_config.config.effective_weight_spec(prefix)
    except ValueError:  # not model.layers.<i>.{self_attn,mlp}.<proj>
        return UnquantizedLinearMethod()
    return HadaquantOnlineLinearMethod(quant_config, prefix)


@register_weight_loader_v2_supported_method
class HadaquantOnlineLinearMethod(LinearMethodBase):
    """A decoder linear of a plain HF model, rotated and RTN-quantized at load time.

    ``create_weights`` declares the model's 16-bit weight as vLLM's ``ModelWeightParameter``
    (``output_dim = 0``, ``input_dim = 1``, as the unquantized method does), so the v2 loaders
    place merged q/k/v and gate/up shards and take this rank's slice of row-parallel layers.
    ``process_weights_after_loading`` rotates this rank's weight, quantizes it, keeps the packed
    checkpoint tensors (``qweight``, ``scales``, ``qzeros``; buffers, nothing loads into them)
    and, on this torch reference path, the dequantized weight ``hq_weight``; the 16-bit weight
    is dropped.
    """

    def __init__(self, quant_config: Any, prefix: str) -> None:
        config = quant_config.config
        self.prefix = prefix
        self.weight_spec = config.effective_weight_spec(prefix)
        self.act_spec = config.effective_act_spec(prefix)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        k_part = input_size_per_partition
        problem = _shard_problem(k_part, self.weight_spec)
        if problem is not None:
            raise CheckpointFormatError(
                f"{self.prefix}: this rank holds {k_part} of its {input_size} input channels and "
                f"{problem}; choose another tensor_parallel_size or group_size"
            )
        weight_loader = extra_weight_attrs.pop("weight_loader")
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), k_part, dtype=params_dtype),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        layer.hq_input_size_per_partition = k_part

    def rotated_quantized_weight(self, layer: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """Float32 ``deq(RTN(W @ H_K))`` of this rank's ``weight [N_p, K_p]``; also registers the
        packed tensors on ``layer`` (``bits < 16``)."""
        w_rot = hadamard_transform(weight.to(torch.float32))
        spec = self.weight_spec
        if spec.bits == 16:
            return w_rot
        codes, scales, zeros = rtn_quantize(w_rot, spec.bits, spec.group_size, spec.symmetric,
                                            spec.mse_clip)
        tensors = pack_linear(codes, scales, zeros, spec, prefix=self.prefix)
        for name, tensor in tensors.items():
            layer.register_buffer(name.rsplit(".", 1)[1], tensor, persistent=False)
        return unpack_linear(tensors, self.prefix, spec, weight.shape[1])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        with torch.no_grad():
            weight = layer.weight.data
            deq = self.rotated_quantized_weight(layer, weight)
            del layer.weight  # the 16-bit weight is not needed any more
            layer.register_buffer("hq_weight", deq.to(weight.dtype), persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        a = self.act_spec
        # One opaque op (see quant_method.quantize_linear_input): rotation, then act quant.
        x = torch.ops.hadaquant.quantize_linear_input(x, True, a.bits, a.clip_ratio, a.symmetric)
        return F.linear(x, layer.hq_weight, bias)
