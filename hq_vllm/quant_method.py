"""The ``hadaquant`` quantization method for vLLM: config class and linear method.

One file per method, as in ``vllm/model_executor/layers/quantization/``: a
:class:`HadaquantQuantizationConfig` that vLLM builds from ``config.json["quantization_config"]``
(auto-detected from ``"quant_method": "hadaquant"``, or picked with ``--quantization hadaquant``),
and a :class:`HadaquantLinearMethod` that owns the packed weights of one linear layer.

This module imports vllm at its top, so only :func:`hq_vllm.register` (the plugin entry point)
imports it, lazily. Importing it registers the method (decorators, as vLLM's own methods do).

What vLLM computes per quantized linear (the contract is ``hq_vllm.offline.simulate``)::

    x  = block_hadamard_transform(x, r4 block)  # only down_proj, only if rotation.r4 is set
    x  = fake_quantize_per_token(x, act spec)   # dynamic per-token, the layer's bits and clip
    y  = x @ dequant(qweight, scales, qzeros).T + bias

Attention is untouched in this slice: R3 rotates Q and K by the same orthogonal matrix, so
without KV-cache quantization it leaves QK^T unchanged and is skipped; checkpoints with a
quantized KV cache are refused (see :class:`HadaquantQuantizationConfig`) until it lands.

Weights in memory: ``qweight`` / ``scales`` / ``qzeros`` keep the checkpoint's packed layout
(``hq_vllm/format.py``) and stay the source of truth. On CUDA, for 3- and 4-bit weights, they are
all there is: ``apply`` calls the Triton dequant GEMM (``kernels/gemm.py``) through the opaque
custom op ``torch.ops.hadaquant.dequant_gemm``, which reads ``qweight`` directly (no host sync,
so torch.compile and CUDA graphs capture it). Linears whose activations are quantized to <= 8
bits symmetrically go through ``torch.ops.hadaquant.packed_linear`` instead, which at prefill
sizes (:data:`INT8_GEMM_MIN_TOKENS` tokens and more) quantizes the input to int8 codes and runs
the int8 tensor-core GEMM (``kernels/int8_gemm.py``), and below that does exactly the above
(``HADAQUANT_INT8_GEMM=0`` turns the int8 path off). Elsewhere (the CPU platform, other bit
widths) the torch reference path runs: ``process_weights_after_loading`` also materializes the
dequantized weight in the activation dtype (``hq_weight``), which costs 2 bytes (bf16) or 4 bytes
(fp32) per weight on top of the ``bits / 8`` packed bytes, and ``apply`` is ``F.linear`` (bit for
bit the simulator's).

Tensor parallelism, with the parameter classes of ``vllm/model_executor/parameter.py``:

==========  =====================  ==========================================================
tensor      shape on one rank      sharding (column-parallel: qkv, gate_up; row: o, down)
==========  =====================  ==========================================================
qweight     [b*K_p/32, N_p] int32  ``PackedvLLMParameter``: packed along K (input_dim = 0),
                                   so merged q/k/v and gate/up shards are plain column ranges
                                   of N (output_dim = 1) and a row-parallel shard is a range
                                   of whole 32-channel blocks = ``b*K_p/32`` word rows
scales      [K_p/G, N_p] fp16      ``GroupQuantScaleParameter`` (rows = groups, split with K);
                                   per output channel (G = -1): ``[1, N_p]``,
                                   ``ChannelQuantScaleParameter``, replicated on row shards
qzeros      [K_p/G, N_p] uint8     as ``scales`` (asymmetric weights only)
==========  =====================  ==========================================================

The packing factor ``32 / b`` is not an integer for b = 3, 5, 6, 7; it is given as a
``Fraction`` and only matters to vLLM when the packed dim is the output dim, which it never is
here. The checkpoint's ``tp_sizes`` lists the TP degrees whose row shards hold whole packing
blocks and groups, and whole blocks of the online R4 (TP divides ``rotation.r4.blocks``); any
other degree is refused when the model is built. A row-parallel rank quantizes its input
activations per token over its own K_p channels (the scale of its slice), which is the
TP-1 quantizer only when activations are 16-bit.

Where this plugs into vLLM (0.32 line numbers; the same interfaces exist in 0.26):

* ``register_quantization_config`` (``layers/quantization/__init__.py:61``) adds ``hadaquant``
  to the methods; ``ModelConfig._verify_quantization`` (``config/model.py:1370``) then takes
  ``quant_method`` from config.json, so no flag is needed, and ``get_quant_config``
  (``model_loader/weight_utils.py:274``) calls :meth:`from_config` with that dict. With
  ``--quantization hadaquant`` on a model without one, vLLM calls ``cls()`` instead (``:363``).
* ``VllmConfig._get_quantization_config`` (``config/vllm.py:886``) checks the act dtype and
  calls :meth:`maybe_update_config`, in the front-end process: the earliest point to validate
  the checkpoint (architecture, rotation sizes, every tensor's name, shape and dtype).
* ``register_weight_loader_v2_supported_method`` (``layers/linear.py:66``): the linear layers
  hand parameters the v2 loaders when the method's class name is in ``WEIGHT_LOADER_V2_SUPPORTED``.
"""

from __future__ import annotations

import os

from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import (
    QuantizationMethods,
    register_quantization_config,
)
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from hq_vllm.format import (
    ACT_BITS,
    QUANT_METHOD,
    CheckpointFormatError,
    HadaquantConfig,
    unpack_linear,
    validate_tensors,
)
from hq_vllm.kernels.fwht import block_hadamard_transform
from hq_vllm.kernels.hadamard_quant import hadamard_quant  # fused rotation + quantization (CUDA)
from hq_vllm.kernels.gemm import KERNEL_BITS as PACKED_GEMM_BITS  # registers hadaquant::dequant_gemm
from hq_vllm.kernels.gemm import dequant_gemm
from hq_vllm.kernels.int8_gemm import INT8_GEMM_BITS, int8_gemm, quantize_per_token

__all__ = [
    "HadaquantLinearMethod",
    "HadaquantQuantizationConfig",
    "decoder_linear_shapes",
    "fake_quantize_per_token",
]

_PACK_BLOCK = 32  # input channels per packing block (kernels/packing.py)
_ROW_PARALLEL_SUFFIXES = ("self_attn.o_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------------------
# Dynamic activation quantization (torch reference)
# ---------------------------------------------------------------------------------------------


def fake_quantize_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = True
) -> torch.Tensor:
    """Dynamic per-token quantize-dequantize of a linear's input ``[..., K]`` (over the last dim).

    The served model must compute exactly what the offline simulator does
    (``hq_vllm.offline.quantize.fake_quantize_per_token``), but ``hq_vllm`` may not import
    ``hq_vllm.offline``; this is the same float32 arithmetic, operation for operation, and a test
    checks that both agree bit for bit. Symmetric: ``s = clip * absmax / (2**(b-1) - 1)``,
    asymmetric: ``s = clip * (max(x, 0) - min(x, 0)) / (2**b - 1)`` with an integer zero point;
    ``s`` stays float32, a zero row gets float32's smallest normal, rounding is half to even.
    ``bits == 16`` returns ``x`` unchanged.
    """
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio!r}")
    if bits == 16:
        return x
    xf = x.to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        maxq = 2 ** (bits - 1) - 1
        scale = (clip_ratio * xf.abs().amax(-1, keepdim=True) / maxq).clamp(min=tiny)
        q = torch.round(xf / scale).clamp(-maxq - 1, maxq)
        return (q * scale).to(x.dtype)
    maxq = 2**bits - 1
    lo = clip_ratio * xf.amin(-1, keepdim=True).clamp(max=0)
    hi = clip_ratio * xf.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=tiny)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    c = (torch.round(xf / scale) + zero).clamp(0, maxq)
    return ((c - zero) * scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoint checks that need the model's shapes
# ---------------------------------------------------------------------------------------------


def _cfg(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, dict):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def decoder_linear_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """``{HF linear name: (N out, K in)}`` of every decoder linear of a Llama / Mistral / Qwen2 /
    Qwen3 model (they share the block layout), from ``config.json`` values.

    Used to validate the checkpoint's tensors against the format before vLLM starts loading,
    so a missing or mis-shaped tensor is reported by name instead of as a failed assert.
    """
    hidden = _cfg(hf_config, "hidden_size")
    inter = _cfg(hf_config, "intermediate_size")
    n_layers = _cfg(hf_config, "num_hidden_layers")
    heads = _cfg(hf_config, "num_attention_heads")
    kv_heads = _cfg(hf_config, "num_key_value_heads") or heads
    head_dim = _cfg(hf_config, "head_dim") or hidden // heads
    shapes = {}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj"] = (heads * head_dim, hidden)
        shapes[f"{p}.self_attn.k_proj"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.v_proj"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}.self_attn.o_proj"] = (hidden, heads * head_dim)
        shapes[f"{p}.mlp.gate_proj"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj"] = (hidden, inter)
    return shapes


def _validate_checkpoint_tensors(model_dir: Path, hf_config: Any, config: HadaquantConfig) -> None:
    """Check names, shapes and dtypes of every decoder linear's tensors, reading only the
    safetensors headers (no tensor data), and raise one error listing what is wrong."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return  # not a safetensors checkpoint: vLLM's loader reports what it finds
    handles = [safe_open(str(f), framework="pt") for f in files]
    try:
        validate_tensors(handles, decoder_linear_shapes(hf_config), config)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"hadaquant checkpoint {str(model_dir)!r}: {e}") from None


def _with_kv_bits(config: HadaquantConfig, bits: int, hf_config: Any) -> HadaquantConfig:
    """``config`` with a ``bits``-bit KV cache (asymmetric, clip 0.95 unless the checkpoint had a
    quantized cache whose clip and symmetry are kept) and R3 over head_dim."""
    import dataclasses

    from hq_vllm.kernels.hadamard import hadamard_factor

    kv = config.kv_cache
    if kv.bits >= 16:
        kv = dataclasses.replace(kv, clip_ratio=0.95, symmetric=False)
    rotation = config.rotation
    if rotation.r3 is None and hf_config is not None:
        head_dim = _cfg(hf_config, "head_dim") or _cfg(hf_config, "hidden_size") // _cfg(
            hf_config, "num_attention_heads")
        r3 = {"kind": "hadamard", "size": head_dim, "factor_k": hadamard_factor(head_dim).k}
        rotation = dataclasses.replace(rotation, r3=r3)
    return dataclasses.replace(config, kv_cache=dataclasses.replace(kv, bits=bits), rotation=rotation)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@register_quantization_config(QUANT_METHOD)
class HadaquantQuantizationConfig(QuantizationConfig):
    """vLLM's view of a hadaquant checkpoint: the parsed :class:`HadaquantConfig` plus the
    choice of a quantize method per layer."""

    def __init__(self, config: HadaquantConfig | None = None) -> None:
        super().__init__()
        #: True for a plain HF model served with ``--quantization hadaquant``: RTN at load
        #: time with online per-linear rotations (hq_vllm/online.py).
        self.online = config is None
        if config is None:
            # vLLM calls ``cls()`` when ``--quantization hadaquant`` meets a model without a
            # hadaquant ``quantization_config`` (get_config_filenames() is empty); the settings
            # (--hf-overrides '{"hadaquant": {...}}') arrive with the HF config in
            # maybe_update_config, which replaces these defaults.
            from hq_vllm.online import default_online_config

            config = default_online_config()
        self.config = config
        self._checked_tp_size: int | None = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"HadaquantQuantizationConfig(recipe={c.recipe!r}, weight={c.weight}, "
            f"activation={c.activation}, kv_cache={c.kv_cache}, "
            f"r4={c.rotation.r4 is not None}, overrides={len(c.layers)}, tp_sizes={c.tp_sizes})"
        )

    @classmethod
    def get_name(cls) -> QuantizationMethods:
        return QUANT_METHOD  # type: ignore[return-value]

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # float32 is for the CPU reference path and exact comparisons with the simulator.
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # bf16 activations and the planned int8 tensor-core GEMM need Ampere.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Everything lives in config.json["quantization_config"]; no side file.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HadaquantQuantizationConfig:
        """Parse strictly; errors are :class:`CheckpointFormatError` naming the key and value
        (e.g. ``quantization_config.format_version = 99: ... upgrade hadaquant``)."""
        return cls(HadaquantConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None):
        """Check the checkpoint against the model before anything is loaded: supported
        architecture, rotation sizes, and (for a local directory) every linear's tensors.

        vLLM calls this while building its config, in the front-end process, so a bad
        checkpoint fails there with our message instead of deep inside the engine.
        For an online config (plain model), this is where its settings are read and checked.
        """
        from hq_vllm import online

        if self.online:
            if hf_config is not None:
                self.config = online.online_config(hf_config)
                self._apply_requested_kv_cache_dtype(hf_config)
            return
        online.reject_online_settings(hf_config)
        self._apply_requested_kv_cache_dtype(hf_config)
        if hf_config is not None:
            self.config.check_model(hf_config)
            for name, ov in self.config.layers.items():
                if name == "lm_head" and ov.weight_bits not in (None, 16):
                    raise CheckpointFormatError(
                        f"quantization_config.layers['lm_head'].weight_bits = {ov.weight_bits}: "
                        "a quantized lm_head is not supported by the hadaquant vLLM plugin yet"
                    )
        path = Path(model_name)
        if hf_config is not None and path.is_dir():
            _validate_checkpoint_tensors(path, hf_config, self.config)

    def _apply_requested_kv_cache_dtype(self, hf_config: Any) -> None:
        """A KV-cache dtype name asked for at serving time (``hq_int3`` ...; hq_vllm/kv_dtype.py)
        replaces the checkpoint's KV bits, and brings the R3 rotation it needs."""
        from hq_vllm.kv_dtype import requested_kv_bits

        bits = requested_kv_bits(hf_config)
        if bits is not None:
            self.config = _with_kv_bits(self.config, bits, hf_config)

    def _check_tp_size(self) -> None:
        from vllm.distributed import get_tensor_model_parallel_world_size

        tp = get_tensor_model_parallel_world_size()
        if tp == self._checked_tp_size:
            return
        if tp not in self.config.tp_sizes:
            rot = self.config.rotation
            why = "row-parallel shards must hold whole packing blocks and groups"
            if rot.r4 is not None and rot.r4_blocks % tp:
                why = (f"the online R4 rotation has rotation.r4.blocks = {rot.r4_blocks} diagonal "
                       f"blocks of {rot.r4_block_size} channels and each rank must hold whole "
                       f"blocks of down_proj's input, so the TP size must divide "
                       f"rotation.r4.blocks; re-quantize with --r4-blocks a multiple of {tp}")
            raise CheckpointFormatError(
                f"tensor_parallel_size = {tp}: this hadaquant checkpoint can be served at "
                f"tensor_parallel_size {self.config.tp_sizes} only (quantization_config.tp_sizes; "
                f"{why})"
            )
        self._checked_tp_size = tp

    def _kv_cache_method(self, prefix: str, layer_kv_cache_dtype: str | None = None) -> QuantizeMethodBase | None:
        """The packed-KV method for an attention layer, or None for a 16-bit KV cache (then R3
        rotates Q and K by the same orthogonal matrix, the identity on QK^T: nothing to do).
        ``layer_kv_cache_dtype``: the layer's vLLM cache dtype, one of ours where vLLM can
        register dtype names."""
        from hq_vllm.kv_dtype import requested_kv_bits

        bits = requested_kv_bits(None, layer_kv_cache_dtype)
        if bits is not None and bits != self.config.kv_cache.bits:
            self.config = _with_kv_bits(self.config, bits, None)
        if self.config.kv_cache.bits >= 16:
            return None
        from hq_vllm.attention import HadaquantKVCacheMethod, PackedKVSettings

        # The layer's own K and V clips where the checkpoint records searched ones.
        k_spec, v_spec = self.config.effective_kv_specs(prefix)
        settings = PackedKVSettings.from_config(k_spec, self.config.rotation.r3, v_spec)
        return HadaquantKVCacheMethod(self, settings, prefix)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """Decoder linears get :class:`HadaquantLinearMethod`, or
        :class:`HadaquantUnquantizedLinearMethod` when their effective weight bits are 16;
        everything else (lm_head, embeddings, attention) is left to vLLM's defaults (None)."""
        if self.online and isinstance(layer, LinearBase):
            from hq_vllm.online import online_linear_method

            return online_linear_method(self, prefix)
        if isinstance(layer, Attention):
            return self._kv_cache_method(prefix, getattr(layer, "kv_cache_dtype", None))
        if not isinstance(layer, LinearBase):
            # ParallelLMHead / VocabParallelEmbedding: unquantized (lm_head stays 16-bit).
            return None
        self._check_tp_size()
        try:
            spec = self.config.effective_weight_spec(prefix)
        except ValueError as e:
            raise CheckpointFormatError(f"hadaquant: cannot quantize layer {prefix!r}: {e}") from None
        if spec.bits == 16:
            return HadaquantUnquantizedLinearMethod(self, prefix)
        return HadaquantLinearMethod(self, prefix)


# ---------------------------------------------------------------------------------------------
# Linear methods
# ---------------------------------------------------------------------------------------------


#: The fused kernel is on by default on CUDA (``HADAQUANT_FUSED_INPUT=0`` turns it off). It ran
#: inside vLLM 0.26 on the H200 (2026-12-02, docs/GPU.md: the bf16 W3A3KV3 engine within the
#: simulator's spread) after the N = 18944 mismatch was fixed (8.5e-5 of the codes one off there,
#: as at the other sizes: docs/BENCHMARKS.md).
_FUSED_INPUT = os.environ.get("HADAQUANT_FUSED_INPUT", "1") != "0"


def _fused_input_path(x: torch.Tensor, rotate: bool, bits: int, symmetric: bool) -> bool:
    """Whether :func:`quantize_linear_input` runs the fused rotation + quantization kernel."""
    return (_FUSED_INPUT and rotate and symmetric and bits < 16 and x.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16))


@torch.library.custom_op("hadaquant::quantize_linear_input", mutates_args=())
def quantize_linear_input(
    x: torch.Tensor, rotate: bool, bits: int, clip_ratio: float, symmetric: bool,
    block_size: int = 0,
) -> torch.Tensor:
    """Online R4 (``rotate``) then per-token activation fake quantization, as one opaque op.

    ``block_size``: the rotation is block-diagonal over the last dim, blocks of this many
    channels (the shard-local R4, ``rotation.r4.blocks``); 0 = one block over the whole dim.

    Opaque on purpose: under vLLM's default ``torch.compile`` mode, dynamo would otherwise trace
    into the Hadamard construction (data-dependent checks, caches) and fail, and Inductor may
    rewrite ``x / scale`` as ``x * (1 / scale)``, which moves rounding boundaries: the served
    codes would no longer be the simulator's.

    On CUDA, with a rotation, 16-bit activations and symmetric quantization to < 16 bits, both
    steps run as one fused Triton kernel (``kernels/hadamard_quant.py``: one read of x, one
    write), which returns the fake-quantized bf16/fp16 activation rather than int8 codes and
    scales, because the GEMM behind it (the dequant GEMM or ``F.linear``) consumes 16-bit
    activations; the codes entry point (``torch.ops.hadaquant.hadamard_quant``) is there for
    the int8 GEMM. Its values are the unfused path's up to the tensor cores' summation order
    (a small fraction of codes one off). Everything else, and the CPU, keeps the torch path.
    """
    if _fused_input_path(x, rotate, bits, symmetric):
        blocks = x.shape[-1] // block_size if block_size else 1
        return hadamard_quant(x, bits, clip_ratio, blocks, dequantize=True)
    if rotate:
        x = block_hadamard_transform(x, block_size or None)
    out = fake_quantize_per_token(x, bits, clip_ratio, symmetric)
    return out.clone() if out is x else out  # a custom op's output may not alias its input


@quantize_linear_input.register_fake
def _(x: torch.Tensor, rotate: bool, bits: int, clip_ratio: float, symmetric: bool,
      block_size: int = 0) -> torch.Tensor:
    return torch.empty_like(x)


#: Tokens (rows of the linear's input) from which a linear with <= 8-bit symmetric activations
#: runs the int8 tensor-core GEMM on int8 activation codes (``kernels/int8_gemm.py``) instead of
#: fake quantization + the weight-only dequant GEMM. Prefill-sized products only: below this the
#: dequant GEMM's GEMV / dot paths read the packed weight at memory speed, and the int8 GEMM's
#: tiles (16-128 rows) would be mostly padding while it pays the unpack per tile all the same.
#: 64 is a first guess; benchmarks/int8_gemm_bench.py (``--m``) is what should set it.
INT8_GEMM_MIN_TOKENS = 64
#: ``HADAQUANT_INT8_GEMM=0`` keeps every linear on the fake-quantization + dequant GEMM path.
_INT8_GEMM = os.environ.get("HADAQUANT_INT8_GEMM", "1") != "0"


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def int8_gemm_eligible(weight_bits: int, act_bits: int, act_symmetric: bool) -> bool:
    """Whether a packed linear can take the int8 path at all (decided once per layer, at build
    time): activation codes that fit int8 and need no zero point, weights the kernel unpacks
    (any group size the format allows)."""
    return _INT8_GEMM and act_bits <= 8 and act_symmetric and weight_bits in INT8_GEMM_BITS


def quantize_input_codes(
    x: torch.Tensor, rotate: bool, bits: int, clip_ratio: float, block_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online R4 (``rotate``) then symmetric per-token quantization: int8 codes ``[..., K]`` and
    float32 scales ``[...]``, the codes of :func:`quantize_linear_input` (whose output is
    ``codes * scales`` rounded to x.dtype). With a rotation and 16-bit input, the fused kernel
    (``hadamard_quant``, as the fused fake-quantization path); otherwise the rotation, if any,
    then ``quantize_per_token``."""
    if rotate and _fused_input_path(x, rotate, bits, True):
        blocks = x.shape[-1] // block_size if block_size else 1
        return hadamard_quant(x, bits, clip_ratio, blocks)
    if rotate:
        x = block_hadamard_transform(x, block_size or None)
    return quantize_per_token(x, bits, clip_ratio)


def _runs_int8_gemm(x: torch.Tensor, tokens: int) -> bool:
    """The runtime half of the choice: on CUDA (or under the Triton interpreter, for tests:
    the CPU platform never gets here, its layers use ``F.linear``), at prefill sizes."""
    return tokens >= INT8_GEMM_MIN_TOKENS and (x.is_cuda or _interpret_requested())


@torch.library.custom_op("hadaquant::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
    bias: torch.Tensor | None, bits: int, group_size: int, rotate: bool, act_bits: int,
    clip_ratio: float, block_size: int = 0,
) -> torch.Tensor:
    """A packed linear with symmetric <= 8-bit activations: ``y = Q(R4(x)) @ W.T + bias``.

    The token count decides the GEMM, inside this opaque op on purpose: under vLLM's
    torch.compile the token count is symbolic, and a Python branch on it outside an op would be
    traced once (for the profiling run's size) and then used for every size. Here it is a
    plain int per call, also per CUDA-graph capture size, with no host synchronisation.

    * ``tokens >= INT8_GEMM_MIN_TOKENS`` (prefill): int8 codes and per-token scales
      (:func:`quantize_input_codes`), then the int8 tensor-core GEMM. The codes are the
      simulator's; the product is exact in integers and scaled in float32, so the result is
      the simulator's up to float32 summation order and the activation dtype's rounding of the
      fake-quantized input (which this path skips: it is, if anything, closer to exact).
    * otherwise: :func:`quantize_linear_input` and the weight-only dequant GEMM, as for every
      other linear.
    """
    k = x.shape[-1]
    tokens = x.numel() // k if k else 0
    if _runs_int8_gemm(x, tokens):
        codes, a_scales = quantize_input_codes(x, rotate, act_bits, clip_ratio, block_size)
        y = int8_gemm(codes.reshape(tokens, k), a_scales.reshape(tokens), qweight, scales, qzeros, bias,
                      bits, group_size, x.dtype)
        return y.reshape(*x.shape[:-1], qweight.shape[1])
    xq = quantize_linear_input(x, rotate, act_bits, clip_ratio, True, block_size)
    return dequant_gemm(xq, qweight, scales, qzeros, bits, group_size, bias=bias)


@packed_linear.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, rotate, act_bits, clip_ratio, block_size=0):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


class _OnlineInput:
    """What happens to a linear's input before its GEMM: optional R4, then activation quant.

    The R4 is shard-local: ``rotation.r4.blocks`` equal diagonal Hadamard blocks, and a
    row-parallel rank holding input channels ``[r*K/tp, (r+1)*K/tp)`` (whole blocks when tp
    divides ``blocks``) rotates its slice block by block, which is its part of the TP-1 rotation.
    """

    def __init__(self, quant_config: HadaquantQuantizationConfig, prefix: str) -> None:
        config = quant_config.config
        self.prefix = prefix
        self.act_spec = config.effective_act_spec(prefix)
        rot = config.rotation
        down = rot.r4 is not None and prefix.endswith("mlp.down_proj")
        self.r4_size: int | None = rot.r4["size"] if down else None
        self.r4_blocks: int = rot.r4_blocks
        self.r4_block_size: int | None = rot.r4_block_size if down else None

    def check_input_size(self, input_size_per_partition: int) -> None:
        if self.r4_size is not None and input_size_per_partition % self.r4_block_size:
            raise CheckpointFormatError(
                f"{self.prefix}: the online R4 rotation has rotation.r4.blocks = {self.r4_blocks} "
                f"diagonal blocks of {self.r4_block_size} channels (rotation.r4.size = "
                f"{self.r4_size}), and this rank's {input_size_per_partition} down_proj input "
                "channels are not whole blocks; serve at a tensor_parallel_size dividing "
                "rotation.r4.blocks"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_spec
        if self.r4_size is None and a.bits == 16:
            return x
        return torch.ops.hadaquant.quantize_linear_input(
            x, self.r4_size is not None, a.bits, a.clip_ratio, a.symmetric, self.r4_block_size or 0
        )


@register_weight_loader_v2_supported_method
class HadaquantUnquantizedLinearMethod(UnquantizedLinearMethod):
    """A 16-bit linear of a hadaquant checkpoint (a per-layer override): vLLM's unquantized
    weight, but the input still gets the configured R4 and activation quantization (a layer
    can keep 16-bit weights and 8-bit activations)."""

    def __init__(self, quant_config: HadaquantQuantizationConfig, prefix: str) -> None:
        super().__init__()
        self.online_input = _OnlineInput(quant_config, prefix)

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        self.online_input.check_input_size(input_size_per_partition)
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                               output_size, params_dtype, **extra_weight_attrs)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().apply(layer, self.online_input(x), bias)


@register_weight_loader_v2_supported_method
class HadaquantLinearMethod(LinearMethodBase):
    """Packed low-bit weights of one linear (merged qkv / gate_up, o_proj, down_proj).

    ``create_weights`` declares the checkpoint tensors with vLLM parameter classes, so vLLM's
    weight-loader v2 shards them for merged column-parallel and row-parallel layers (see the
    module docstring). ``apply`` is the torch reference path.
    """

    def __init__(self, quant_config: HadaquantQuantizationConfig, prefix: str) -> None:
        self.quant_config = quant_config
        self.prefix = prefix
        self.weight_spec = quant_config.config.effective_weight_spec(prefix)
        self.online_input = _OnlineInput(quant_config, prefix)
        a, w = self.online_input.act_spec, self.weight_spec
        #: prefill through the int8 GEMM (``packed_linear``) where the packed GEMM runs
        self.int8_gemm = int8_gemm_eligible(w.bits, a.bits, a.symmetric)

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
        spec = self.weight_spec
        weight_loader = extra_weight_attrs.get("weight_loader")
        k_part = input_size_per_partition
        n_part = sum(output_partition_sizes)
        group = k_part if spec.group_size == -1 else spec.group_size
        if k_part % _PACK_BLOCK or k_part % group:
            raise CheckpointFormatError(
                f"{self.prefix}: {k_part} input channels on this rank (of {input_size}) are not "
                f"a multiple of the packing block ({_PACK_BLOCK}) and group size "
                f"({spec.group_size}); serve at a tensor_parallel_size from quantization_config."
                f"tp_sizes = {self.quant_config.config.tp_sizes}"
            )
        self.online_input.check_input_size(k_part)

        qweight = PackedvLLMParameter(
            data=torch.empty(spec.bits * k_part // _PACK_BLOCK, n_part, dtype=torch.int32),
            input_dim=0,
            output_dim=1,
            packed_dim=0,
            packed_factor=Fraction(_PACK_BLOCK, spec.bits),
            weight_loader=weight_loader,
        )
        layer.register_parameter("qweight", qweight)

        def group_param(dtype: torch.dtype):
            if spec.group_size == -1:  # one group per output channel: same on every row shard
                return ChannelQuantScaleParameter(
                    data=torch.empty(1, n_part, dtype=dtype), output_dim=1, weight_loader=weight_loader
                )
            return GroupQuantScaleParameter(
                data=torch.empty(k_part // group, n_part, dtype=dtype),
                input_dim=0,
                output_dim=1,
                weight_loader=weight_loader,
            )

        layer.register_parameter("scales", group_param(torch.float16))
        if not spec.symmetric:
            layer.register_parameter("qzeros", group_param(torch.uint8))
        layer.hq_input_size_per_partition = k_part

    def _tensors(self, layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        names = ("qweight", "scales") if self.weight_spec.symmetric else ("qweight", "scales", "qzeros")
        return {f"{self.prefix}.{n}": getattr(layer, n).data for n in names}

    def dequantize_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        """Float32 ``[N_p, K_p]`` weight of this rank, by the format's reference
        (:func:`hq_vllm.format.unpack_linear`), so it matches the simulator bit for bit."""
        return unpack_linear(self._tensors(layer), self.prefix, self.weight_spec,
                             layer.hq_input_size_per_partition)

    def uses_packed_gemm(self, layer: torch.nn.Module) -> bool:
        """GPU path: the packed weights on CUDA, at a bit width the Triton GEMM implements."""
        return layer.qweight.is_cuda and self.weight_spec.bits in PACKED_GEMM_BITS

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.hq_packed_gemm = self.uses_packed_gemm(layer)
        if layer.hq_packed_gemm:
            return  # GPU path: the packed tensors are all the memory this layer takes
        # Torch reference path: keep the packed parameters and add the dequantized weight in
        # the activation dtype (not a parameter: nothing loads into it, it is derived).
        weight = self.dequantize_weight(layer).to(layer.params_dtype)
        layer.register_buffer("hq_weight", weight, persistent=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(layer, "hq_packed_gemm", False):
            spec = self.weight_spec
            qzeros = None if spec.symmetric else layer.qzeros
            if self.int8_gemm:  # the token count picks int8 (prefill) or dequant GEMM, per call
                inp, a = self.online_input, self.online_input.act_spec
                return torch.ops.hadaquant.packed_linear(
                    x, layer.qweight, layer.scales, qzeros, bias, spec.bits, spec.group_size,
                    inp.r4_size is not None, a.bits, a.clip_ratio, inp.r4_block_size or 0)
            return torch.ops.hadaquant.dequant_gemm(self.online_input(x), layer.qweight, layer.scales,
                                                    qzeros, bias, spec.bits, spec.group_size)
        return F.linear(self.online_input(x), layer.hq_weight, bias)
