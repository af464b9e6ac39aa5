"""The one definition of the hadaquant checkpoint format (version 1).

The offline tool (``hq_vllm.offline``) writes checkpoints with these definitions and the vLLM
plugin reads them with the same ones, so a mismatch between the two halves is impossible by
construction. Everything here is strict: an unknown key, a wrong type, an out-of-range value or a
newer ``format_version`` is a :class:`CheckpointFormatError` that names the offending key and
value, raised when the config is read, not deep inside a kernel.

Imports only torch, json and ``hq_vllm.kernels`` (safetensors ``safe_open`` handles are used
duck-typed); never vllm, never ``hq_vllm.offline``.

Checkpoint directory
--------------------
A Hugging Face model directory: ``config.json``, safetensors shard(s) (``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``) and the tokenizer
files. ``config.json["quantization_config"]`` is :meth:`HadaquantConfig.to_dict`, which is all
vLLM needs to pick the plugin (``"quant_method": "hadaquant"``). ``config.json`` describes the
model as served: after dimension expansion its ``hidden_size`` / ``intermediate_size`` are the
zero-padded sizes (the padded model is an ordinary model of that size, so vLLM builds it without
special handling), and ``rotation`` records both the padded and the original sizes.

Tensors of one linear layer ``prefix`` (an HF module name such as
``model.layers.0.self_attn.q_proj``) with ``N`` outputs, ``K`` inputs, ``b``-bit weights and group
size ``G`` (``G = K`` when ``group_size == -1``, per output channel):

===================  =========  =============  ==============================================
name                 dtype      shape          meaning
===================  =========  =============  ==============================================
``prefix.qweight``   int32      [b*K/32, N]    codes ``c`` in [0, 2**b), packed as documented
                                               in ``kernels/packing.py`` (K-major, blocks of
                                               32 input channels; dense fields for b = 2, 4,
                                               8, bit planes for b = 3, 5, 6, 7)
``prefix.scales``    float16    [K/G, N]       one scale per group and output channel,
                                               transposed to K-major like ``qweight``
                                               (``[1, N]`` per output channel)
``prefix.qzeros``    uint8      [K/G, N]       integer zero points, asymmetric weights only
``prefix.bias``      unchanged  [N]            only when the model has one (Qwen2 q/k/v)
===================  =========  =============  ==============================================

Dequantization (the reference is :func:`unpack_linear`):
``w[n, k] = (c[n, k] - z[k // G, n]) * s[k // G, n]`` computed in float32, where ``z`` is
``qzeros`` for asymmetric weights and the constant ``2**(b-1)`` for symmetric ones (symmetric codes
are the signed values ``q in [-2**(b-1), 2**(b-1) - 1]`` stored as ``c = q + 2**(b-1)``).

A linear whose effective weight bits are 16 is stored unquantized as ``prefix.weight`` (bfloat16,
``[N, K]``). ``lm_head`` is kept at 16 bits unless ``layers["lm_head"]`` overrides it; embeddings
and norms are never quantized and keep their HF names.

``quantization_config`` schema (version 1)
------------------------------------------
Every key below is written by :meth:`HadaquantConfig.to_dict`. When reading, a missing key takes
the default shown (defaults are part of format version 1 and never change without a version bump);
an unknown key is an error.

* ``quant_method``: ``"hadaquant"`` (required).
* ``format_version``: ``1`` (required; a newer version is refused with "upgrade hadaquant").
* ``weight`` (:class:`WeightQuantSpec`): ``bits`` in 2..8 or 16 (16 = not quantized),
  ``group_size`` -1 (per output channel) or a positive multiple of 32, ``symmetric``,
  ``mse_clip`` (provenance: whether the clip search was used).
* ``activation`` (:class:`ActQuantSpec`): dynamic per-token input quantization of every quantized
  linear; ``bits`` in 2..8 or 16, ``clip_ratio`` in (0, 1], ``symmetric``.
* ``kv_cache`` (:class:`KVCacheSpec`): per token and KV head; same keys, asymmetric by default.
* ``rotation`` (:class:`RotationSpec`), each slot ``null`` (not applied) or a dict:

  - ``r1`` (residual stream, fused offline): ``kind`` in ``hadamard``, ``random_hadamard``,
    ``walsh`` (sequency-ordered), ``grouped_walsh`` (block-diagonal, needs ``group_size``
    dividing ``size``), ``random_orthogonal``; ``size`` = ``config.json`` hidden size;
    ``seed`` exactly for the random kinds; optional ``factor_k`` for the Hadamard kinds (as r4).
  - ``r2`` (per head, fused into v_proj / o_proj): as r1 without ``grouped_walsh``;
    ``size`` = head_dim.
  - ``r3`` (online on Q and K after RoPE): ``kind`` = ``hadamard``, ``size`` = head_dim,
    ``factor_k`` (default 1).
  - ``r4`` (online on the down_proj input, transpose fused offline): ``kind`` = ``hadamard``,
    ``size`` = ``config.json`` intermediate size, ``factor_k`` required, optional ``blocks``
    (default 1, written only when larger, so a one-block checkpoint reads in any version-1
    reader and a reader that predates the key refuses a block-diagonal one instead of serving
    it with the wrong matrix). The matrix is block-diagonal: ``blocks`` equal diagonal
    blocks of order ``B = size / blocks``, each ``H_K (x) H_{2^m}`` / sqrt(B) with
    ``K = factor_k`` (so ``factor_k`` describes one block: ``B / factor_k`` must be a power of
    two). ``blocks = 1`` is one Hadamard over the whole intermediate size. Why blocks: under
    tensor parallelism down_proj is row-parallel and rank ``r`` of ``tp`` holds input channels
    ``[r*size/tp, (r+1)*size/tp)``, a union of whole blocks exactly when ``tp`` divides
    ``blocks``; each rank then rotates its own slice block by block, with no communication.
    The block-diagonal matrix is orthogonal, so the fused model is as exact as with one block;
    the online transform does the same ``K * size`` multiply-adds per token for its dense
    factors (a block of ``size / blocks`` has the same ``K`` as the whole size, when it has one)
    and a shorter butterfly; blocks whose power-of-two part drops below 64 tile worse in the
    GPU kernel (``kernels/fwht.py``), so the offline tool's default keeps them at least 64.
  - ``expanded_hidden_size`` / ``expanded_intermediate_size``: ``null``, or the zero-padded size
    (then equal to ``r1.size`` / ``r4.size`` and to ``config.json``'s size);
    ``original_hidden_size`` / ``original_intermediate_size``: the source model's size before
    padding (``null`` when not expanded; smaller than the padded size).
* ``layers``: ``{HF linear name: {"weight_bits", "act_bits", "act_clip_ratio"}}`` per-layer
  overrides (``null`` = inherit). q/k/v_proj of one block share an input and vLLM merges them into
  one ``qkv_proj`` (gate/up_proj into ``gate_up_proj``), so siblings must agree on all three.
  Per-layer KV-cache clip ratios (what the gradual binary search finds) are entries keyed by the
  attention layer's vLLM prefix ``model.layers.<i>.self_attn.attn``, with only the keys
  ``k_clip_ratio`` and/or ``v_clip_ratio`` (each in (0, 1]; a missing one inherits
  ``kv_cache.clip_ratio``; bits and symmetry stay global). They are optional: a checkpoint
  without them is exactly as before, and a reader that predates them refuses such an entry
  ("unknown key") instead of serving every layer at the global clip. A linear entry with a KV
  key, or an attention entry with a linear key, is an error naming the key.
* ``tp_sizes``: tensor-parallel sizes the checkpoint was checked for (sorted, unique): the
  row-parallel linears (o_proj, down_proj) are split along K, and each shard must hold whole
  32-channel packing blocks and whole groups (:func:`validate_tensors` checks it); with an
  ``r4``, every entry must divide ``rotation.r4.blocks`` (checked when the config is read).
* ``recipe``: free text naming the recipe; ``calibration``: free-form JSON provenance.

Example::

    {
      "quant_method": "hadaquant",
      "format_version": 1,
      "weight": {"bits": 3, "group_size": 128, "symmetric": true, "mse_clip": true},
      "activation": {"bits": 4, "clip_ratio": 0.9, "symmetric": true},
      "kv_cache": {"bits": 3, "clip_ratio": 0.95, "symmetric": false},
      "rotation": {
        "r1": {"kind": "random_hadamard", "seed": 0, "size": 896},
        "r2": {"kind": "hadamard", "size": 64},
        "r3": {"kind": "hadamard", "size": 64, "factor_k": 1},
        "r4": {"kind": "hadamard", "size": 4864, "factor_k": 76, "blocks": 2},
        "expanded_hidden_size": null,
        "expanded_intermediate_size": null,
        "original_hidden_size": null,
        "original_intermediate_size": null
      },
      "layers": {
        "model.layers.0.mlp.down_proj": {"weight_bits": 8, "act_bits": 8, "act_clip_ratio": null}
      },
      "tp_sizes": [1, 2],
      "recipe": "quarot-gptq-w3a4kv3",
      "calibration": {"dataset": "boolq-validation", "n_samples": 128, "seq_len": 2048, "seed": 0}
    }
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hq_vllm.kernels.hadamard import ROTATION_KINDS
from hq_vllm.kernels.packing import pack_codes, unpack_codes

__all__ = [
    "ACT_BITS",
    "FORMAT_VERSION",
    "ONLINE_ROTATION_KINDS",
    "QUANT_METHOD",
    "ROTATION_KINDS",
    "SUPPORTED_ARCHITECTURES",
    "WEIGHT_BITS",
    "ActQuantSpec",
    "CheckpointFormatError",
    "HadaquantConfig",
    "KVCacheSpec",
    "LayerOverride",
    "RotationSpec",
    "SHARED_INPUT_GROUPS",
    "UnsupportedArchitecture",
    "WeightQuantSpec",
    "attention_key",
    "check_architecture",
    "expected_shapes",
    "pack_linear",
    "quantized_tensor_names",
    "unpack_linear",
    "validate_tensors",
]

FORMAT_VERSION = 1
QUANT_METHOD = "hadaquant"

#: HF ``architectures`` entry -> model family. The single source of truth for what we support.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

#: Weight bits: packed integer codes (2..8) or 16 = kept in bfloat16.
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
#: Activation and KV-cache bits: dynamic integer quantization (2..8) or 16 = not quantized.
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)

#: Rotations fused into the weights offline (R1, R2). ``grouped_walsh`` is GSR's block-diagonal
#: Walsh matrix (R1 only); the random kinds need a ``seed`` so the rotation can be rebuilt.
_RANDOM_ROTATION_KINDS = ("random_hadamard", "random_orthogonal")
#: Rotations applied online in the served model (R3, R4): what the FWHT kernels implement,
#: H_K (x) H_{2^m} with ``size = factor_k * 2^m``.
ONLINE_ROTATION_KINDS = ("hadamard",)

_PACK_BLOCK = 32  # input channels per packing block (kernels/packing.py)


class CheckpointFormatError(ValueError):
    """A hadaquant config or checkpoint does not follow the format; the message names the key.

    For a bad value, ``key`` / ``value`` / ``reason`` / ``where`` hold the parts of the message
    (``where`` is the path of the enclosing object, e.g. ``quantization_config.weight``).
    """

    def __init__(self, message: str, *, key: str | None = None, value: Any = None,
                 reason: str | None = None, where: str = "") -> None:
        super().__init__(message)
        self.key, self.value, self.reason, self.where = key, value, reason, where


class UnsupportedArchitecture(ValueError):
    """The model's architecture is not one hadaquant knows how to rotate and serve."""


def _field_error(key: str, value: Any, reason: str, where: str = "") -> CheckpointFormatError:
    path = ".".join(x for x in (where, key) if x)  # key "" = the object at `where` itself
    return CheckpointFormatError(
        f"{path} = {value!r}: {reason}", key=key, value=value, reason=reason, where=where
    )


def _under(e: CheckpointFormatError, where: str) -> CheckpointFormatError:
    """The same error re-anchored at ``where`` (errors without a key already carry a path)."""
    return e if e.reason is None else _field_error(e.key or "", e.value, e.reason, where)


# ---------------------------------------------------------------------------------------------
# Architecture check
# ---------------------------------------------------------------------------------------------


def _hf_get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def check_architecture(hf_config: Any) -> str:
    """Return the model family ("llama", "mistral", "qwen2", "qwen3") of an HF config.

    Accepts the ``config.json`` dict or a ``transformers.PretrainedConfig``. Raises
    :class:`UnsupportedArchitecture` listing the supported architectures, so the user learns at
    the first step (not after an hour of calibration) that the model cannot be handled.
    """
    archs = _hf_get(hf_config, "architectures")
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    if not archs or not isinstance(archs, (list, tuple)):
        raise UnsupportedArchitecture(
            f"config has no 'architectures' list (got {archs!r}); hadaquant supports: {supported}"
        )
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise UnsupportedArchitecture(
            f"unsupported architecture {bad[0]!r}; hadaquant supports: {supported}"
        )
    return SUPPORTED_ARCHITECTURES[archs[0]]


# ---------------------------------------------------------------------------------------------
# Value checks shared by the dataclasses
# ---------------------------------------------------------------------------------------------


def _int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _field_error(key, v, f"must be an integer, got {type(v).__name__}")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _field_error(key, v, f"must be true or false, got {type(v).__name__}")
    return v


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _field_error(key, v, f"must be a string, got {type(v).__name__}")
    return v


def _bits(key: str, v: Any, allowed: tuple[int, ...]) -> int:
    _int(key, v)
    if v not in allowed:
        raise _field_error(key, v, f"out of range: allowed bits are {', '.join(map(str, allowed))}")
    return v


def _clip(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _field_error(key, v, f"must be a number, got {type(v).__name__}")
    if not (0.0 < float(v) <= 1.0):  # also rejects NaN
        raise _field_error(key, v, "clip ratio must lie in (0, 1]")
    return float(v)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalisation inside a frozen dataclass


def _check_version(v: Any) -> int:
    _int("format_version", v)
    if v > FORMAT_VERSION:
        raise _field_error(
            "format_version", v,
            f"this checkpoint is newer than this hadaquant understands (format_version "
            f"{FORMAT_VERSION}); upgrade hadaquant",
        )
    if v < 1:
        raise _field_error("format_version", v, f"invalid; the current version is {FORMAT_VERSION}")
    return v


def _build(cls: type, d: Any, where: str) -> Any:
    """Strict ``cls(**d)``: d must be an object with only ``cls``'s keys; errors get ``where``."""
    if not isinstance(d, Mapping):
        raise CheckpointFormatError(f"{where} must be a JSON object, got {type(d).__name__}: {d!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
        raise CheckpointFormatError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})"
        )
    try:
        return cls(**d)
    except CheckpointFormatError as e:
        raise _under(e, where) from None


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightQuantSpec:
    """How linear weights are quantized: ``bits`` (16 = unquantized), groups of ``group_size``
    input channels per scale (-1 = one scale per output channel), symmetric or asymmetric grid,
    and whether the per-group clip was searched (MSE) rather than taken at absmax."""

    bits: int = 3
    group_size: int = 128
    symmetric: bool = True
    mse_clip: bool = True

    def __post_init__(self) -> None:
        try:
            _bits("bits", self.bits, WEIGHT_BITS)
            gs = _int("group_size", self.group_size)
            if gs != -1 and (gs <= 0 or gs % _PACK_BLOCK):
                raise _field_error(
                    "group_size", gs,
                    f"must be -1 (per output channel) or a positive multiple of {_PACK_BLOCK} "
                    f"(a group must cover whole packing blocks)",
                )
            _bool("symmetric", self.symmetric)
            _bool("mse_clip", self.mse_clip)
        except CheckpointFormatError as e:
            raise _under(e, type(self).__name__) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "weight") -> WeightQuantSpec:
        return _build(cls, d, where)


@dataclass(frozen=True)
class _DynamicQuantSpec:
    """Quantization computed at run time from each row's clipped range: bits, clip, symmetry."""

    bits: int = 16
    clip_ratio: float = 1.0
    symmetric: bool = True

    _WHERE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            _bits("bits", self.bits, ACT_BITS)
            _set(self, "clip_ratio", _clip("clip_ratio", self.clip_ratio))
            _bool("symmetric", self.symmetric)
        except CheckpointFormatError as e:
            raise _under(e, type(self).__name__) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | None = None):
        return _build(cls, d, where or cls._WHERE)


@dataclass(frozen=True)
class ActQuantSpec(_DynamicQuantSpec):
    """Dynamic per-token quantization of a linear's input: scale from the clipped absmax (or
    min/max when asymmetric) of each token's row, computed at run time."""

    _WHERE: ClassVar[str] = "activation"


@dataclass(frozen=True)
class KVCacheSpec(_DynamicQuantSpec):
    """Quantization of K and V in the paged cache, per token and KV head (over head_dim).
    Asymmetric by default: K rows are not centred even after the R3 rotation."""

    symmetric: bool = False

    _WHERE: ClassVar[str] = "kv_cache"


# Allowed keys per rotation slot: (required, optional). Seeds / group sizes are further
# constrained by kind in _check_rotation.
_ROTATION_KEYS = {
    "r1": (("kind", "size"), ("seed", "group_size", "factor_k")),
    "r2": (("kind", "size"), ("seed", "factor_k")),
    "r3": (("kind", "size"), ("factor_k",)),
    "r4": (("kind", "size", "factor_k"), ("blocks",)),
}


def _check_rotation(slot: str, r: Any) -> dict[str, Any] | None:
    """Validate one rotation dict and return a canonical copy (r3 gets ``factor_k`` = 1; r4's
    ``blocks`` is dropped when it is the default 1)."""
    if r is None:
        return None
    if not isinstance(r, Mapping):
        raise _field_error(slot, r, "must be null or an object")
    required, optional = _ROTATION_KEYS[slot]
    for k in r:
        if k not in required + optional:
            raise _field_error(
                f"{slot}.{k}", r[k], f"unknown key (allowed: {', '.join(required + optional)})"
            )
    for k in required:
        if k not in r:
            raise _field_error(slot, dict(r), f"missing required key {k!r}")
    out = dict(r)
    kind = _str(f"{slot}.kind", r["kind"])
    kinds = ONLINE_ROTATION_KINDS if slot in ("r3", "r4") else ROTATION_KINDS
    if slot == "r2":
        kinds = tuple(k for k in kinds if k != "grouped_walsh")
    if kind not in kinds:
        raise _field_error(f"{slot}.kind", kind, f"unknown rotation kind (allowed: {', '.join(kinds)})")
    size = _int(f"{slot}.size", r["size"])
    if size <= 0:
        raise _field_error(f"{slot}.size", size, "must be positive")
    if slot in ("r1", "r2"):
        if kind in _RANDOM_ROTATION_KINDS:
            if "seed" not in r:
                raise _field_error(slot, dict(r), f"kind {kind!r} needs a 'seed' to be reproducible")
            _int(f"{slot}.seed", r["seed"])
        elif "seed" in r:
            raise _field_error(f"{slot}.seed", r["seed"], f"kind {kind!r} is deterministic; no seed")
        if kind == "grouped_walsh":
            if "group_size" not in r:
                raise _field_error(slot, dict(r), "kind 'grouped_walsh' needs 'group_size'")
            gs = _int(f"{slot}.group_size", r["group_size"])
            if gs <= 0 or size % gs:
                raise _field_error(f"{slot}.group_size", gs, f"must be positive and divide size {size}")
        elif "group_size" in r:
            raise _field_error(f"{slot}.group_size", r["group_size"], "only for kind 'grouped_walsh'")
        if "factor_k" in r and kind not in ("hadamard", "random_hadamard"):
            raise _field_error(f"{slot}.factor_k", r["factor_k"], "only for the Hadamard kinds")
    block, what = size, f"size {size}"
    if slot == "r4":
        blocks = _int("r4.blocks", r.get("blocks", 1))
        if blocks <= 0 or size % blocks:
            raise _field_error("r4.blocks", blocks, f"must be a positive divisor of size {size}")
        out.pop("blocks", None)
        if blocks > 1:
            out["blocks"] = blocks
            block, what = size // blocks, f"the block size (size / blocks = {size} / {blocks})"
    if "factor_k" in r or slot in ("r3", "r4"):
        fk = _int(f"{slot}.factor_k", r.get("factor_k", 1))
        if fk <= 0 or block % fk or not _is_pow2(block // fk):
            raise _field_error(
                f"{slot}.factor_k", fk,
                f"{what} must be factor_k times a power of two (H_K (x) H_2^m)",
            )
        out["factor_k"] = fk
    return out


@dataclass(frozen=True)
class RotationSpec:
    """Which rotations were applied. R1 and R2 are fused into the weights (recorded for
    provenance and so the plugin can rotate at load time consistently); R3 and R4 must be applied
    online by the served model. ``expanded_*_size`` are the zero-padded sizes when dimension
    expansion was needed for a Hadamard order to exist (``null`` = no padding) and
    ``original_*_size`` the sizes before padding."""

    r1: dict[str, Any] | None = None
    r2: dict[str, Any] | None = None
    r3: dict[str, Any] | None = None
    r4: dict[str, Any] | None = None
    expanded_hidden_size: int | None = None
    expanded_intermediate_size: int | None = None
    original_hidden_size: int | None = None
    original_intermediate_size: int | None = None

    def __post_init__(self) -> None:
        try:
            for slot in ("r1", "r2", "r3", "r4"):
                _set(self, slot, _check_rotation(slot, getattr(self, slot)))
            for key, slot in (("expanded_hidden_size", "r1"), ("expanded_intermediate_size", "r4")):
                v = getattr(self, key)
                if v is None:
                    continue
                if _int(key, v) <= 0:
                    raise _field_error(key, v, "must be positive or null")
                r = getattr(self, slot)
                if r is None or r["size"] != v:
                    raise _field_error(
                        key, v, f"padding only exists for a rotation: {slot}.size must equal it "
                        f"(got {slot} = {r!r})",
                    )
            for key, padded_key in (("original_hidden_size", "expanded_hidden_size"),
                                    ("original_intermediate_size", "expanded_intermediate_size")):
                v, padded = getattr(self, key), getattr(self, padded_key)
                if v is None:
                    continue
                if _int(key, v) <= 0:
                    raise _field_error(key, v, "must be positive or null")
                if padded is None or v >= padded:
                    raise _field_error(
                        key, v, f"an original size needs a larger {padded_key} (got {padded!r})"
                    )
        except CheckpointFormatError as e:
            raise _under(e, type(self).__name__) from None

    @property
    def r4_blocks(self) -> int:
        """Number of diagonal blocks of the online R4 (1 without one, or when not given)."""
        return 1 if self.r4 is None else self.r4.get("blocks", 1)

    @property
    def r4_block_size(self) -> int | None:
        """Order of one diagonal block of the online R4 (``r4.size / r4.blocks``), or None
        without an R4: what the served model and the simulator rotate at a time."""
        return None if self.r4 is None else self.r4["size"] // self.r4_blocks

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "rotation") -> RotationSpec:
        return _build(cls, d, where)


@dataclass(frozen=True)
class LayerOverride:
    """Per-linear deviation from the global specs (mixed precision, searched clip ratios), or,
    for an attention entry (``model.layers.<i>.self_attn.attn``), the layer's K and V cache clip
    ratios. ``None`` inherits the global value."""

    weight_bits: int | None = None
    act_bits: int | None = None
    act_clip_ratio: float | None = None
    k_clip_ratio: float | None = None
    v_clip_ratio: float | None = None

    def __post_init__(self) -> None:
        try:
            if self.weight_bits is not None:
                _bits("weight_bits", self.weight_bits, WEIGHT_BITS)
            if self.act_bits is not None:
                _bits("act_bits", self.act_bits, ACT_BITS)
            for key in ("act_clip_ratio",) + _KV_OVERRIDE_KEYS:
                if getattr(self, key) is not None:
                    _set(self, key, _clip(key, getattr(self, key)))
            if all(getattr(self, f.name) is None for f in dataclasses.fields(self)):
                raise _field_error(
                    "", {}, "an override must set at least one of weight_bits, act_bits, "
                    "act_clip_ratio (linears) or k_clip_ratio, v_clip_ratio (attention)",
                )
        except CheckpointFormatError as e:
            raise _under(e, type(self).__name__) from None

    @property
    def is_kv(self) -> bool:
        """True when only KV keys are set: the override of an attention layer."""
        return all(getattr(self, k) is None for k in _LINEAR_OVERRIDE_KEYS)

    def to_dict(self) -> dict[str, Any]:
        """A linear entry as always (its three keys, nulls included); the KV keys only where
        set, so checkpoints without KV entries read in readers that predate them."""
        d = dataclasses.asdict(self)
        kv = {k: d.pop(k) for k in _KV_OVERRIDE_KEYS}
        if self.is_kv:
            d = {}
        d.update({k: v for k, v in kv.items() if v is not None})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> LayerOverride:
        return _build(cls, d, where)


# ---------------------------------------------------------------------------------------------
# Linear module names
# ---------------------------------------------------------------------------------------------

_BLOCK_LINEAR_RE = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn\.(?:q|k|v|o|qkv)_proj|mlp\.(?:gate|up|down|gate_up)_proj)$"
)
#: ``layers`` key of an attention layer's KV-cache override (its vLLM ``Attention`` prefix).
_ATTENTION_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn$")
#: Where the plugin finds the layer index in an attention prefix (also ``...self_attn``).
_ATTENTION_PREFIX_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn(?:\.attn)?$")
_LINEAR_OVERRIDE_KEYS = ("weight_bits", "act_bits", "act_clip_ratio")
_KV_OVERRIDE_KEYS = ("k_clip_ratio", "v_clip_ratio")


def attention_key(layer: int) -> str:
    """The ``layers`` key of decoder layer ``layer``'s KV-cache override."""
    return f"model.layers.{layer}.self_attn.attn"
#: Linears that read the same input; vLLM merges each group into one layer (the key's name).
SHARED_INPUT_GROUPS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_SIBLINGS = {m: group for group in SHARED_INPUT_GROUPS.values() for m in group}
#: Row-parallel linears: tensor parallelism splits their input dimension K.
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def _parse_linear(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.down_proj`` -> (3, "mlp.down_proj"); ``lm_head`` -> (None, "lm_head")."""
    if name == "lm_head":
        return None, "lm_head"
    m = _BLOCK_LINEAR_RE.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(
            f"{name!r} is not a linear layer hadaquant quantizes: expected lm_head or "
            f"model.layers.<i>.self_attn.{{q,k,v,o,qkv}}_proj / model.layers.<i>.mlp."
            f"{{gate,up,down,gate_up}}_proj"
        )
    return int(m.group(1)), m.group(2)


def _members(name: str) -> list[str]:
    """HF names of the linears behind ``name`` (a vLLM merged name expands to its parts)."""
    layer, local = _parse_linear(name)
    if local in SHARED_INPUT_GROUPS:
        return [f"model.layers.{layer}.{m}" for m in SHARED_INPUT_GROUPS[local]]
    return [name]


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HadaquantConfig:
    """Everything decided offline; serialised as ``config.json["quantization_config"]``."""

    format_version: int = FORMAT_VERSION
    weight: WeightQuantSpec = field(default_factory=WeightQuantSpec)
    activation: ActQuantSpec = field(default_factory=ActQuantSpec)
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    rotation: RotationSpec = field(default_factory=RotationSpec)
    layers: dict[str, LayerOverride] = field(default_factory=dict)
    tp_sizes: list[int] = field(default_factory=lambda: [1])
    recipe: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._validate()
        except CheckpointFormatError as e:
            raise _under(e, e.where or type(self).__name__) from None

    def _validate(self) -> None:
        _check_version(self.format_version)
        for key, cls in (("weight", WeightQuantSpec), ("activation", ActQuantSpec),
                         ("kv_cache", KVCacheSpec), ("rotation", RotationSpec)):
            if not isinstance(getattr(self, key), cls):
                raise _field_error(key, getattr(self, key), f"must be a {cls.__name__}")
        if not isinstance(self.layers, Mapping):
            raise _field_error("layers", self.layers, "must be an object {module name: override}")
        for name, ov in self.layers.items():
            if isinstance(name, str) and _ATTENTION_KEY_RE.match(name):
                if not isinstance(ov, LayerOverride):
                    raise _field_error(f"layers[{name!r}]", ov, "must be a LayerOverride")
                for key in _LINEAR_OVERRIDE_KEYS:
                    if getattr(ov, key) is not None:
                        raise _field_error(
                            f"layers[{name!r}].{key}", getattr(ov, key),
                            f"an attention entry takes only {', '.join(_KV_OVERRIDE_KEYS)}",
                        )
                continue
            try:
                _, local = _parse_linear(name)
            except ValueError:
                raise _field_error(
                    "layers", name, "unknown key: not a linear hadaquant quantizes (expected "
                    "lm_head or model.layers.<i>.self_attn.{q,k,v,o}_proj / "
                    "model.layers.<i>.mlp.{gate,up,down}_proj) nor an attention layer "
                    "(model.layers.<i>.self_attn.attn)",
                ) from None
            for key in _KV_OVERRIDE_KEYS:
                if isinstance(ov, LayerOverride) and getattr(ov, key) is not None:
                    layer = _parse_linear(name)[0]
                    where = "" if layer is None else f" ({attention_key(layer)})"
                    raise _field_error(
                        f"layers[{name!r}].{key}", getattr(ov, key),
                        f"a KV-cache clip belongs to the layer's attention entry{where}, not a linear",
                    )
            if local in SHARED_INPUT_GROUPS:
                raise _field_error(
                    "layers", name, "unknown key: a vLLM merged name; override its HF parts "
                    f"({', '.join(SHARED_INPUT_GROUPS[local])}) instead",
                )
            if not isinstance(ov, LayerOverride):
                raise _field_error(f"layers[{name!r}]", ov, "must be a LayerOverride")
        _set(self, "layers", {k: self.layers[k] for k in sorted(self.layers)})
        self._check_siblings()
        if not isinstance(self.tp_sizes, (list, tuple)) or not self.tp_sizes:
            raise _field_error("tp_sizes", self.tp_sizes, "must be a non-empty list of integers")
        for t in self.tp_sizes:
            if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
                raise _field_error("tp_sizes", self.tp_sizes, f"entries must be positive integers, got {t!r}")
        _set(self, "tp_sizes", sorted(set(self.tp_sizes)))
        blocks = self.rotation.r4_blocks
        bad = [t for t in self.tp_sizes if self.rotation.r4 is not None and blocks % t]
        if bad:
            raise _field_error(
                "tp_sizes", self.tp_sizes,
                f"tensor parallel size {bad[0]} does not divide rotation.r4.blocks = {blocks}: "
                "each rank must hold whole blocks of the online R4 rotation",
            )
        _str("recipe", self.recipe)
        if not isinstance(self.calibration, Mapping) or not all(
            isinstance(k, str) for k in self.calibration
        ):
            raise _field_error("calibration", self.calibration, "must be an object with string keys")
        try:
            json.dumps(self.calibration, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise _field_error("calibration", self.calibration, f"must be plain JSON: {e}") from None
        _set(self, "calibration", copy.deepcopy(dict(self.calibration)))

    def _check_siblings(self) -> None:
        """q/k/v (and gate/up) become one vLLM layer with one input quantizer and one packed
        weight, so their effective weight bits, activation bits and clip ratio must agree."""
        for name in self.layers:
            if _ATTENTION_KEY_RE.match(name):
                continue
            layer, local = _parse_linear(name)
            if local not in _SIBLINGS:
                continue
            group = [f"model.layers.{layer}.{m}" for m in _SIBLINGS[local]]
            ref = self._settings(group[0])
            for member in group[1:]:
                got = self._settings(member)
                for key in ref:
                    if got[key] != ref[key]:
                        raise _field_error(
                            f"layers[{member!r}].{key}", got[key],
                            f"effective value disagrees with {group[0]} ({key} = {ref[key]!r}); "
                            f"{', '.join(m.rsplit('.', 1)[1] for m in group)} share one input "
                            f"and vLLM merges them into one layer",
                        )

    def _settings(self, member: str) -> dict[str, Any]:
        w, a = self._weight_spec_of(member), self._act_spec_of(member)
        return {"weight_bits": w.bits, "act_bits": a.bits, "act_clip_ratio": a.clip_ratio}

    def _weight_spec_of(self, member: str) -> WeightQuantSpec:
        spec = self.weight if member != "lm_head" else dataclasses.replace(self.weight, bits=16)
        ov = self.layers.get(member)
        if ov is not None and ov.weight_bits is not None:
            spec = dataclasses.replace(spec, bits=ov.weight_bits)
        return spec

    def _act_spec_of(self, member: str) -> ActQuantSpec:
        spec = self.activation if member != "lm_head" else dataclasses.replace(self.activation, bits=16)
        ov = self.layers.get(member)
        if ov is not None and ov.act_bits is not None:
            spec = dataclasses.replace(spec, bits=ov.act_bits)
        if ov is not None and ov.act_clip_ratio is not None:
            spec = dataclasses.replace(spec, clip_ratio=ov.act_clip_ratio)
        return spec

    def effective_weight_spec(self, module_name: str) -> WeightQuantSpec:
        """Weight spec of one linear, by HF name or vLLM merged name (``...qkv_proj``,
        ``...gate_up_proj``). ``lm_head`` is 16 bits unless overridden."""
        return self._weight_spec_of(_members(module_name)[0])

    def effective_act_spec(self, module_name: str) -> ActQuantSpec:
        """Input-activation spec of one linear, by HF name or vLLM merged name."""
        return self._act_spec_of(_members(module_name)[0])

    def effective_kv_specs(self, attention_prefix: str) -> tuple[KVCacheSpec, KVCacheSpec]:
        """The (K, V) cache specs of one attention layer, by its vLLM prefix
        (``model.layers.<i>.self_attn.attn``; ``...self_attn`` and other model prefixes
        before ``layers.<i>`` work too): ``kv_cache`` with the layer's ``k_clip_ratio`` /
        ``v_clip_ratio`` override where one is recorded."""
        m = _ATTENTION_PREFIX_RE.search(attention_prefix) if isinstance(attention_prefix, str) else None
        if m is None:
            if any(_ATTENTION_KEY_RE.match(name) for name in self.layers):
                raise CheckpointFormatError(
                    f"attention layer {attention_prefix!r}: no layer index in its name, but this "
                    "checkpoint records per-layer KV-cache clip ratios (layers['model.layers.<i>."
                    "self_attn.attn'])"
                )
            return self.kv_cache, self.kv_cache
        ov = self.layers.get(attention_key(int(m.group(1))))
        k = v = self.kv_cache
        if ov is not None and ov.k_clip_ratio is not None:
            k = dataclasses.replace(k, clip_ratio=ov.k_clip_ratio)
        if ov is not None and ov.v_clip_ratio is not None:
            v = dataclasses.replace(v, clip_ratio=ov.v_clip_ratio)
        return k, v

    def check_model(self, hf_config: Any) -> str:
        """Check that this config fits the model described by ``hf_config`` (dict or
        PretrainedConfig, the served model: padded sizes when expanded): supported architecture,
        rotation sizes, expanded sizes and override layer indices. Returns the model family."""
        family = check_architecture(hf_config)

        def need(key: str) -> int:
            v = _hf_get(hf_config, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise CheckpointFormatError(f"model config: {key} = {v!r} is not a positive integer")
            return v

        hidden, inter, n_layers = need("hidden_size"), need("intermediate_size"), need("num_hidden_layers")
        head_dim = _hf_get(hf_config, "head_dim") or hidden // need("num_attention_heads")
        rot = self.rotation
        checks = [
            ("rotation.r1.size", rot.r1 and rot.r1["size"], hidden),
            ("rotation.r2.size", rot.r2 and rot.r2["size"], head_dim),
            ("rotation.r3.size", rot.r3 and rot.r3["size"], head_dim),
            ("rotation.r4.size", rot.r4 and rot.r4["size"], inter),
            ("rotation.expanded_hidden_size", rot.expanded_hidden_size, hidden),
            ("rotation.expanded_intermediate_size", rot.expanded_intermediate_size, inter),
        ]
        for key, got, want in checks:
            if got is not None and got != want:
                raise CheckpointFormatError(
                    f"{key} = {got}: the model (config.json, padded sizes when expanded) has {want}"
                )
        for name in self.layers:
            attn = _ATTENTION_KEY_RE.match(name)
            layer = int(attn.group(1)) if attn else _parse_linear(name)[0]
            if layer is not None and layer >= n_layers:
                raise CheckpointFormatError(
                    f"layers[{name!r}]: the model has only {n_layers} layers"
                )
        return family

    def to_dict(self) -> dict[str, Any]:
        """Exactly what goes in ``config.json["quantization_config"]``."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "kv_cache": self.kv_cache.to_dict(),
            "rotation": self.rotation.to_dict(),
            "layers": {name: ov.to_dict() for name, ov in sorted(self.layers.items())},
            "tp_sizes": list(self.tp_sizes),
            "recipe": self.recipe,
            "calibration": copy.deepcopy(self.calibration),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HadaquantConfig:
        """Parse ``config.json["quantization_config"]`` strictly (see the module docstring)."""
        where = "quantization_config"
        if not isinstance(d, Mapping):
            raise CheckpointFormatError(f"{where} must be a JSON object, got {type(d).__name__}")
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointFormatError(
                f"{where}.quant_method = {d.get('quant_method')!r}: expected {QUANT_METHOD!r}"
            )
        if "format_version" not in d:
            raise CheckpointFormatError(f"{where}.format_version is missing")
        # Check the version first: a newer file may use keys this version does not know.
        version = d["format_version"]
        try:
            _check_version(version)
        except CheckpointFormatError as e:
            raise _under(e, where) from None
        allowed = ["quant_method"] + [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in allowed)
        if unknown:
            raise CheckpointFormatError(
                f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})"
            )
        kw: dict[str, Any] = {"format_version": version}
        for key, spec_cls in (("weight", WeightQuantSpec), ("activation", ActQuantSpec),
                              ("kv_cache", KVCacheSpec), ("rotation", RotationSpec)):
            if key in d:
                kw[key] = _build(spec_cls, d[key], f"{where}.{key}")
        if "layers" in d:
            layers = d["layers"]
            if not isinstance(layers, Mapping):
                raise CheckpointFormatError(f"{where}.layers must be an object, got {layers!r}")
            kw["layers"] = {
                name: _build(LayerOverride, ov, f"{where}.layers[{name!r}]")
                for name, ov in layers.items()
            }
        for key in ("tp_sizes", "recipe", "calibration"):
            if key in d:
                kw[key] = copy.deepcopy(d[key])
        try:
            return cls(**kw)
        except CheckpointFormatError as e:
            raise _under(e, where) from None


# ---------------------------------------------------------------------------------------------
# Tensors of a quantized linear
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
}


def quantized_tensor_names(prefix: str, spec: WeightQuantSpec) -> list[str]:
    """Names of the tensors a linear ``prefix`` must have (``prefix.bias`` is optional)."""
    if spec.bits == 16:
        return [f"{prefix}.weight"]
    names = [f"{prefix}.qweight", f"{prefix}.scales"]
    if not spec.symmetric:
        names.append(f"{prefix}.qzeros")
    return names


def _n_groups(prefix: str, n: int, k: int, spec: WeightQuantSpec) -> int:
    if k % _PACK_BLOCK:
        raise CheckpointFormatError(
            f"{prefix}: weight shape [N={n}, K={k}] cannot be packed: K must be a multiple of "
            f"{_PACK_BLOCK}"
        )
    if spec.group_size == -1:
        return 1
    if k % spec.group_size:
        raise CheckpointFormatError(
            f"{prefix}: weight shape [N={n}, K={k}]: K is not a multiple of group_size "
            f"{spec.group_size}"
        )
    return k // spec.group_size


def expected_shapes(
    prefix: str, n: int, k: int, spec: WeightQuantSpec
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{tensor name: (shape, dtype)}`` for a linear with ``n`` outputs and ``k`` inputs."""
    if spec.bits == 16:
        return {f"{prefix}.weight": ((n, k), torch.bfloat16)}
    g = _n_groups(prefix, n, k, spec)
    out = {
        f"{prefix}.qweight": ((spec.bits * k // _PACK_BLOCK, n), torch.int32),
        f"{prefix}.scales": ((g, n), torch.float16),
    }
    if not spec.symmetric:
        out[f"{prefix}.qzeros"] = ((g, n), torch.uint8)
    return out


def _tensor_meta(source: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes from a dict of tensors, a ``safe_open`` handle or a list of
    either (the shards of one checkpoint), without reading tensor data from disk."""
    if isinstance(source, Mapping):
        return {name: (tuple(t.shape), t.dtype) for name, t in source.items()}
    if hasattr(source, "get_slice") and hasattr(source, "keys"):
        out = {}
        for name in source.keys():
            sl = source.get_slice(name)
            out[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
        return out
    if isinstance(source, (list, tuple)):
        out = {}
        for part in source:
            meta = _tensor_meta(part)
            dup = sorted(set(meta) & set(out))
            if dup:
                raise CheckpointFormatError(f"tensor {dup[0]!r} appears in more than one shard")
            out.update(meta)
        return out
    raise TypeError(f"expected a dict of tensors or a safetensors safe_open handle, got {type(source)}")


def _get_tensor(source: Any, name: str) -> torch.Tensor:
    if isinstance(source, Mapping):
        if name not in source:
            raise CheckpointFormatError(f"missing tensor {name!r}")
        return source[name]
    if isinstance(source, (list, tuple)):
        for part in source:
            if name in (part.keys() if not isinstance(part, Mapping) else part):
                return _get_tensor(part, name)
        raise CheckpointFormatError(f"missing tensor {name!r}")
    if name not in source.keys():
        raise CheckpointFormatError(f"missing tensor {name!r}")
    return source.get_tensor(name)


def validate_tensors(source: Any, linears: Mapping[str, tuple[int, int]], config: HadaquantConfig) -> None:
    """Check that every linear in ``linears`` (``{HF prefix: (n, k)}``) has exactly the tensors,
    shapes and dtypes the format prescribes for its effective weight spec, and that the
    row-parallel linears split evenly for every size in ``config.tp_sizes`` (that each size
    also divides ``rotation.r4.blocks`` is part of the config itself: ``HadaquantConfig``
    refuses it).

    ``source`` is a dict of tensors, a ``safe_open`` handle or a list of them. Raises one
    :class:`CheckpointFormatError` listing every problem found, each naming its tensor.
    """
    meta = _tensor_meta(source)
    problems: list[str] = []
    for prefix in sorted(linears):
        n, k = linears[prefix]
        try:
            spec = config.effective_weight_spec(prefix)
            expected = expected_shapes(prefix, n, k, spec)
        except (CheckpointFormatError, ValueError) as e:
            problems.append(str(e))
            continue
        for name, (shape, dtype) in expected.items():
            if name not in meta:
                problems.append(
                    f"missing tensor {name} (expected {list(shape)} {dtype} for the "
                    f"{spec.bits}-bit linear {prefix})"
                )
            elif meta[name] != (shape, dtype):
                got_shape, got_dtype = meta[name]
                problems.append(
                    f"tensor {name} is {list(got_shape)} {got_dtype}, expected {list(shape)} {dtype}"
                )
        stray = f"{prefix}.qweight" if spec.bits == 16 else f"{prefix}.weight"
        if stray in meta:
            problems.append(
                f"unexpected tensor {stray}: {prefix} is {spec.bits}-bit per the config, "
                f"so it must be stored as {', '.join(expected)}"
            )
        bias = f"{prefix}.bias"
        if bias in meta and meta[bias][0] != (n,):
            problems.append(f"tensor {bias} is {list(meta[bias][0])}, expected [{n}]")
        if spec.bits != 16 and prefix != "lm_head" and _parse_linear(prefix)[1] in _ROW_PARALLEL:
            unit = _PACK_BLOCK if spec.group_size == -1 else math.lcm(_PACK_BLOCK, spec.group_size)
            for tp in config.tp_sizes:
                if k % tp or (k // tp) % unit:
                    problems.append(
                        f"{prefix}: tensor parallel size {tp} (in tp_sizes) splits K = {k} into "
                        f"shards that are not multiples of {unit} (packing block / group size)"
                    )
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointFormatError("; ".join(problems[:10]) + more)


def pack_linear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    spec: WeightQuantSpec,
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Turn quantizer output (codes uint8 ``[N, K]``, scales ``[N, K/G]``, zeros uint8
    ``[N, K/G]`` or None) into checkpoint tensors: ``qweight``, ``scales`` (float16, K-major)
    and, for asymmetric specs, ``qzeros``; keys are ``prefix.<name>`` (bare names if no prefix).
    """
    label = prefix or "linear"
    if spec.bits == 16:
        raise CheckpointFormatError(f"{label}: a 16-bit linear is stored as its weight, not packed")
    if codes.dim() != 2:
        raise CheckpointFormatError(f"{label}: codes must be [N, K], got {tuple(codes.shape)}")
    n, k = codes.shape
    g = _n_groups(label, n, k, spec)
    if tuple(scales.shape) != (n, g):
        raise CheckpointFormatError(f"{label}: scales must be [{n}, {g}], got {tuple(scales.shape)}")
    if spec.symmetric != (zeros is None):
        raise CheckpointFormatError(
            f"{label}: zeros must be {'None' if spec.symmetric else 'given'} for a "
            f"{'symmetric' if spec.symmetric else 'asymmetric'} spec"
        )
    p = f"{prefix}." if prefix else ""
    try:
        out = {
            f"{p}qweight": pack_codes(codes, spec.bits),
            f"{p}scales": scales.t().to(torch.float16).contiguous(),
        }
    except ValueError as e:
        raise CheckpointFormatError(f"{label}: {e}") from None
    if zeros is not None:
        if tuple(zeros.shape) != (n, g):
            raise CheckpointFormatError(f"{label}: zeros must be [{n}, {g}], got {tuple(zeros.shape)}")
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 2**spec.bits):
            raise CheckpointFormatError(f"{label}: zeros must lie in [0, {2**spec.bits - 1}]")
        out[f"{p}qzeros"] = zeros.t().to(torch.uint8).contiguous()
    return out


def unpack_linear(tensors: Any, prefix: str, spec: WeightQuantSpec, k: int) -> torch.Tensor:
    """Dequantized float32 weight ``[N, K]`` of linear ``prefix``: ``(c - z) * s`` per group.

    The reference for the plugin's kernels and for tests; same float32 operations, in the same
    order, as ``hq_vllm.offline.quantize.dequantize_weight``, so both agree bit for bit.
    """
    if spec.bits == 16:
        return _get_tensor(tensors, f"{prefix}.weight").float()
    qweight = _get_tensor(tensors, f"{prefix}.qweight")
    codes = unpack_codes(qweight, spec.bits, k)
    n = codes.shape[0]
    g = _n_groups(prefix, n, k, spec)
    scales = _get_tensor(tensors, f"{prefix}.scales").float().t()  # [N, G]
    if spec.symmetric:
        zeros = torch.full_like(scales, float(2 ** (spec.bits - 1)))
    else:
        zeros = _get_tensor(tensors, f"{prefix}.qzeros").float().t()
    if tuple(scales.shape) != (n, g) or tuple(zeros.shape) != (n, g):
        raise CheckpointFormatError(f"{prefix}: scales/qzeros must be [{g}, {n}]")
    w = (codes.float().view(n, g, k // g) - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.view(n, k)
