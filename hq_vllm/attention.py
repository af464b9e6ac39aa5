"""The rotated, packed low-bit KV cache inside vLLM: KV-cache method, attention backend and impl.

What one attention layer computes when the checkpoint's ``kv_cache.bits`` is below 16 (the
contract is the offline simulator, ``hq_vllm.offline.simulate``)::

    K  = R3(K)  after RoPE (head_dim Hadamard);  Q = R3(Q)     # QKᵀ unchanged in exact arithmetic
    cache[slot] = pack(quantize(K), quantize(V))               # per token and KV head
    out = softmax(Q · dequant(K_cache)ᵀ · scale, causal) · dequant(V_cache)

How it plugs into vLLM without a ``--kv-cache-dtype`` flag or a global backend override:

* :meth:`HadaquantQuantizationConfig.get_quant_method <hq_vllm.quant_method>` returns a
  :class:`HadaquantKVCacheMethod` for every ``Attention`` layer. vLLM's ``Attention.__init__``
  calls its ``create_weights(layer)`` at the end (``_init_kv_cache_quant``), after it picked a
  backend for the platform. There we replace the layer's backend by a subclass of that very
  backend (:func:`packed_kv_backend`): the metadata builder, block sizes and layouts stay vLLM's,
  only the page size (``customize_spec``: a ``uint8`` page of :func:`kv_slot_bytes` per token
  and head) and the impl (:class:`HadaquantAttentionImpl`) are ours. Layers of other models in
  the same process are untouched.
* The page shrinks, so vLLM's KV-cache manager fits proportionally more tokens into the same
  memory (its start-up log "KV cache size: N tokens" grows by the same factor).
* No per-tensor scales are loaded (BaseKVCacheMethod's ``k_scale`` / ``v_scale``): scales are per
  token and head, computed at run time and stored in the slot.

Two vLLM lines, told apart by feature (:func:`_backend_customizes_spec`), never by version:

* **0.32** (CPU CI): the backend's ``customize_spec`` returns the spec with ``dtype=uint8`` and
  ``state_content_bytes = kv_slot_bytes(...)``; vLLM derives the page size and the
  ``[num_blocks, H, block_size, C]`` view of the page from the spec.
* **0.26** (the lent GPU): there is no ``customize_spec``; the page size comes from the layer's
  ``Attention.get_kv_cache_spec`` and the tensor's shape from the backend's
  ``get_kv_cache_shape`` / ``get_kv_cache_stride_order``, and the metadata builder is wrapped
  (:func:`_packed_metadata_builder`: full CUDA graphs for pure decode batches only, and only on
  CUDA, where the cache write is the graph-safe kernel; no FA3 scheduler). The layer returns a
  ``TQFullAttentionSpec`` (vLLM's own spec for a packed slot per token and head: page =
  block x KV heads x ``tq_slot_size`` bytes) and the backend subclass gives the same
  ``[num_blocks, H, block_size, slot_bytes]`` uint8 tensor, contiguous. A sliding window is
  kept in that spec's ``sliding_window`` field: vLLM then keeps every block of the request (as
  it does for sliding-window layers served as full attention) and the impl attends within the
  window, so it stays correct but frees no out-of-window blocks.

Attention itself: on CUDA the Triton kernel (``hq_vllm.kernels.paged_attention``: one launch
for decode, prefill, chunked prefill and prefix-cache hits, split-KV for few long decodes; no
host synchronisation), elsewhere (CPU) the plain-torch reference (``hq_vllm.kernels.kv_cache``),
with the same arguments and results. Both attend to what is in the cache, so every kind of batch
is covered. The cache *write* (R3 on K, quantize, pack, store at the slot mapping) is one
Triton launch on CUDA too (``hq_vllm.kernels.kv_write``: the slot mapping is read in the
kernel, padding slots skipped), the torch reference elsewhere (which reads the slot mapping on
the host). Both launches read no device value on the host, so on CUDA the metadata builder lets
vLLM capture full CUDA graphs of pure decode batches (:func:`_packed_metadata_builder`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import torch

from hq_vllm.format import CheckpointFormatError, KVCacheSpec
from hq_vllm.kernels.fwht import hadamard_transform
from hq_vllm.kernels.kv_cache import (
    kv_slot_bytes,
    paged_attention_reference,
    quantize_kv_to_slots,
    write_kv_slots,
)
from hq_vllm.kernels.kv_write import write_kv_cache
from hq_vllm.kernels.paged_attention import paged_attention

__all__ = ["HadaquantAttentionImpl", "HadaquantKVCacheMethod", "PackedKVSettings", "packed_kv_backend"]


@dataclasses.dataclass(frozen=True)
class PackedKVSettings:
    """What one attention layer does to K and V: R3 on or off, bits, clip ratio, symmetry.
    ``clip_ratio`` is K's; ``value_clip_ratio`` V's (None: the same), per layer where the
    checkpoint records searched clips (``HadaquantConfig.effective_kv_specs``)."""

    bits: int
    clip_ratio: float
    symmetric: bool
    r3: bool
    value_clip_ratio: float | None = None

    @classmethod
    def from_config(cls, kv: KVCacheSpec, r3: dict | None, value: KVCacheSpec | None = None) -> PackedKVSettings:
        """``kv``: the layer's K spec; ``value``: its V spec when it differs (same bits and
        symmetry, its own clip)."""
        v_clip = None if value is None or value.clip_ratio == kv.clip_ratio else value.clip_ratio
        return cls(kv.bits, kv.clip_ratio, kv.symmetric, r3 is not None, v_clip)


# ---------------------------------------------------------------------------------------------
# Backend: a subclass of the backend vLLM picked, with our page size and impl
# ---------------------------------------------------------------------------------------------


def _backend_customizes_spec() -> bool:
    """True where the backend sizes KV pages (``AttentionBackend.customize_spec``, vLLM 0.32);
    False where the attention layer does (``Attention.get_kv_cache_spec``, vLLM 0.26)."""
    from vllm.v1.attention.backend import AttentionBackend

    return hasattr(AttentionBackend, "customize_spec")


def _packed_kv_cache_shape(bits: int):
    """``get_kv_cache_shape`` of the packed backend (vLLM 0.26): one uint8 slot per token and
    KV head, ``[num_blocks, num_kv_heads, block_size, kv_slot_bytes(head_size, bits)]``."""

    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, kv_slot_bytes(head_size, bits))

    return get_kv_cache_shape


def _packed_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
    """Physical order = logical order: the page is contiguous ``[H, block_size, slot_bytes]``,
    which is what ``write_kv_slots`` / ``gather_kv`` index (and no cross-layer layout)."""
    return (0, 1, 2, 3, 4) if include_num_layers_dimension else (0, 1, 2, 3)


def _graph_safe_kv_path() -> bool:
    """True where the impl takes the Triton kernels for both the cache write and attention
    (CUDA tensors: :func:`_use_kv_write_kernel`, :func:`_use_attention_kernel`), whose launches
    read no device value on the host and so can be captured in a CUDA graph."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cuda()) and torch.cuda.is_available()


def _cudagraph_support():
    """What the packed backend tells vLLM about full CUDA graphs of attention.

    ``UNIFORM_SINGLE_TOKEN_DECODE`` on CUDA (vLLM then captures full graphs of pure decode
    batches, every request one query token, and runs other batches piecewise with attention
    eager); ``NEVER`` elsewhere (the torch write reads the slot mapping on the host). Why not
    more: ``paged_attention``'s launch shape (query tiles, and the decode-or-prefill plan)
    comes from the host-side ``max_query_len`` at capture, which a replayed mixed batch
    (``ALWAYS``) may exceed; uniform multi-token decodes (``UNIFORM_BATCH``, speculative
    decoding) would replay with the captured length and look safe by the same reading, but
    nothing here has run speculative decoding. Within a decode graph the KV split count is
    fixed at capture; any count gives the right result (the kernel computes the split ranges
    from the real lengths), and ``forward`` plans it for the longest sequence the block table
    holds.
    """
    from vllm.v1.attention.backend import AttentionCGSupport

    if _graph_safe_kv_path():
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    return AttentionCGSupport.NEVER


def _packed_metadata_builder(base_builder: type, cudagraph_support: Any = None) -> type:
    """``base_builder`` (its metadata: block table, sequence lengths, query offsets) with two
    changes: our CUDA-graph support (``cudagraph_support``, default :func:`_cudagraph_support`;
    the base's would describe its own kernels), and no FlashAttention-3 ahead-of-time scheduler
    metadata (it describes a bf16/fp8 cache for FA's own kernel)."""
    support = _cudagraph_support() if cudagraph_support is None else cudagraph_support

    def __init__(self, *args, **kwargs):
        base_builder.__init__(self, *args, **kwargs)
        if hasattr(self, "aot_schedule"):
            self.aot_schedule = False

    def get_cudagraph_support(cls, *args, **kwargs):
        return cls._cudagraph_support  # not the base's (FA computes its own from the FA version)

    name = f"Hadaquant{base_builder.__name__}"
    cls = type(name, (base_builder,), {"__module__": __name__, "__init__": __init__,
                                       "_cudagraph_support": support,
                                       "get_cudagraph_support": classmethod(get_cudagraph_support)})
    cls.__qualname__ = name
    return cls


@functools.cache
def packed_kv_backend(base: type, bits: int) -> type:
    """The attention backend class for ``bits``-bit packed KV on top of ``base`` (vLLM's choice
    for the platform: ``CPU_ATTN`` on CPU, ``FLASH_ATTN`` or ``TRITON_ATTN`` on CUDA). Cached,
    so all layers of a model share one class and vLLM puts them in one attention group."""

    def customize_spec(cls, spec):
        spec = base.customize_spec.__func__(cls, spec) if hasattr(base, "customize_spec") else spec
        if spec.head_size_v != spec.head_size:
            raise CheckpointFormatError(
                f"hadaquant KV cache: head_size_v {spec.head_size_v} != head_size {spec.head_size}"
            )
        return dataclasses.replace(
            spec, dtype=torch.uint8, state_content_bytes=kv_slot_bytes(spec.head_size, bits)
        )

    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"{base.__name__} with a {bits}-bit packed, R3-rotated KV cache (hadaquant).",
        "forward_includes_kv_cache_update": False,
        "hq_kv_bits": bits,
        "customize_spec": classmethod(customize_spec),
        "get_impl_cls": staticmethod(lambda: HadaquantAttentionImpl),
    }
    if not _backend_customizes_spec():  # vLLM 0.26: the backend shapes the page tensor
        namespace["get_kv_cache_shape"] = staticmethod(_packed_kv_cache_shape(bits))
        namespace["get_kv_cache_stride_order"] = staticmethod(_packed_kv_cache_stride_order)
        builder = _packed_metadata_builder(base.get_builder_cls())
        namespace["get_builder_cls"] = staticmethod(lambda: builder)
    name = f"Hadaquant{base.__name__}KV{bits}"
    cls = type(name, (base,), namespace)
    cls.__qualname__ = name
    return cls


# ---------------------------------------------------------------------------------------------
# Impl
# ---------------------------------------------------------------------------------------------


def _use_attention_kernel(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """The Triton kernel on CUDA; the torch reference elsewhere (the CPU platform)."""
    return query.is_cuda and kv_cache.is_cuda


def _use_kv_write_kernel(key: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """The fused Triton cache write on CUDA; the torch path elsewhere (the CPU platform)."""
    return key.is_cuda and kv_cache.is_cuda


def _planned_max_seq_len(attn_metadata: Any, kv_cache: torch.Tensor, on_cuda: bool) -> int | None:
    """The ``max_seq_len`` the attention launch is planned for (it picks the KV split count
    only, never the result). Eager: the metadata's. Inside a CUDA-graph capture: the longest
    sequence the block table can hold (its width x the page size), since vLLM captures decode
    graphs with every sequence 1 token long, and a graph replays for any lengths; planned for 1
    token a captured decode would never split, and few long sequences would leave most SMs
    idle. Splits beyond a sequence's tiles are empty programs."""
    if on_cuda and torch.cuda.is_current_stream_capturing():
        return attn_metadata.block_table.shape[1] * kv_cache.shape[2]
    return getattr(attn_metadata, "max_seq_len", None)


def _attention_impl_base() -> type:
    from vllm.v1.attention.backend import AttentionImpl

    return AttentionImpl


class HadaquantAttentionImpl(_attention_impl_base()):  # type: ignore[misc]
    """Decoder self-attention over the packed cache (Triton kernel on CUDA, torch reference
    elsewhere).

    Built by :class:`HadaquantKVCacheMethod` (not by vLLM's backend selection), with the
    settings of the checkpoint; vLLM then calls :meth:`do_kv_cache_update` (rotate K, quantize,
    pack, store) and :meth:`forward` (rotate Q, attend over the cache) for every step.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None,
        settings: PackedKVSettings,
        layer_name: str = "",
        sliding_window: int | None = None,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.settings = settings
        self.layer_name = layer_name
        # vLLM's own name for "not one of my quantized caches": keeps its fp8 paths away.
        self.kv_cache_dtype = "auto"
        self.sliding_window = sliding_window
        self.logits_soft_cap = None
        self.alibi_slopes = None
        self.sinks = None
        self.kv_sharing_target_layer_name = None

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x) if self.settings.r3 else x

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        s = self.settings
        if _use_kv_write_kernel(key, kv_cache):
            # One launch, the slot mapping read on the device: capturable in a CUDA graph.
            write_kv_cache(key, value, kv_cache, slot_mapping, bits=s.bits, clip_ratio=s.clip_ratio,
                           symmetric=s.symmetric, value_clip_ratio=s.value_clip_ratio, rotate=s.r3)
            return
        n = slot_mapping.shape[0]
        slots = quantize_kv_to_slots(self._rotate(key[:n]), value[:n], s.bits, s.clip_ratio, s.symmetric,
                                     value_clip_ratio=s.value_clip_ratio)
        write_kv_slots(kv_cache, slots, slot_mapping)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("hadaquant attention: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run: no cache, nothing to attend to
            return output
        n = attn_metadata.num_actual_tokens
        q = self._rotate(query[:n])
        args = (q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens, attn_metadata.query_start_loc)
        kwargs = dict(head_dim=self.head_size, bits=self.settings.bits, scale=self.scale,
                      sliding_window=self.sliding_window, output=output[:n])
        if _use_attention_kernel(q, kv_cache):
            # The kernel reads only host-side ints of the metadata (launch shape), never the
            # device tensors' values on the host: safe under CUDA-graph capture.
            paged_attention(*args, **kwargs, max_query_len=getattr(attn_metadata, "max_query_len", None),
                            max_seq_len=_planned_max_seq_len(attn_metadata, kv_cache, q.is_cuda))
        else:
            paged_attention_reference(*args, **kwargs)
        return output


# ---------------------------------------------------------------------------------------------
# KV-cache method: installs the backend and impl on an Attention layer
# ---------------------------------------------------------------------------------------------


def _kv_cache_method_base() -> type:
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    return BaseKVCacheMethod


class HadaquantKVCacheMethod(_kv_cache_method_base()):  # type: ignore[misc]
    """Quantize method of an ``Attention`` layer whose KV cache hadaquant packs.

    A ``BaseKVCacheMethod`` because that is what vLLM's attention layer accepts, but it declares
    no parameters: the checkpoint holds no KV scales (they are dynamic, per token and head).
    """

    def __init__(self, quant_config: Any, settings: PackedKVSettings, prefix: str) -> None:
        super().__init__(quant_config)
        self.settings = settings
        self.prefix = prefix

    def _check_layer(self, layer: torch.nn.Module) -> None:
        from vllm.v1.attention.backend import AttentionType

        problems = []
        if getattr(layer, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            problems.append(f"attention type {layer.attn_type!r} (only decoder self-attention)")
        if getattr(layer, "has_sink", False):
            problems.append("attention sinks")
        if getattr(layer, "kv_sharing_target_layer_name", None) is not None:
            problems.append("cross-layer KV sharing")
        if layer.head_size_v != layer.head_size:
            problems.append(f"head_size_v {layer.head_size_v} != head_size {layer.head_size}")
        impl = layer.impl
        if getattr(impl, "alibi_slopes", None) is not None:
            problems.append("ALiBi")
        if getattr(impl, "logits_soft_cap", None) not in (None, 0, 0.0):
            problems.append(f"logits soft cap {impl.logits_soft_cap}")
        if problems:
            raise CheckpointFormatError(
                f"{self.prefix}: the hadaquant packed KV cache (quantization_config.kv_cache.bits = "
                f"{self.settings.bits}) does not support {', '.join(problems)}; use a checkpoint "
                "with kv_cache.bits = 16"
            )
        try:
            kv_slot_bytes(layer.head_size, self.settings.bits)
        except ValueError as e:
            raise CheckpointFormatError(f"{self.prefix}: {e}") from None

    def create_weights(self, layer: torch.nn.Module) -> None:
        """No weights; swap in our backend and impl (vLLM has already built its own)."""
        self._check_layer(layer)
        old = layer.impl
        layer.attn_backend = packed_kv_backend(layer.attn_backend, self.settings.bits)
        layer.impl = HadaquantAttentionImpl(
            layer.num_heads, layer.head_size, old.scale, layer.num_kv_heads, self.settings, self.prefix,
            sliding_window=layer.sliding_window,
        )
        layer.kv_cache_torch_dtype = torch.uint8  # the page is bytes; customize_spec sizes it
        if not _backend_customizes_spec():  # vLLM 0.26: the layer's spec sizes the page
            layer.get_kv_cache_spec = types.MethodType(
                functools.partial(_packed_full_attention_spec, bits=self.settings.bits), layer
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None


def _packed_full_attention_spec(layer: torch.nn.Module, vllm_config: Any, *, bits: int):
    """``Attention.get_kv_cache_spec`` of a packed layer on vLLM 0.26 (no ``customize_spec``):
    ``TQFullAttentionSpec``, whose page is ``block_size x num_kv_heads x tq_slot_size`` bytes,
    with our slot size (vLLM's TurboQuant KV sizes its packed pages the same way)."""
    try:
        from vllm.v1.kv_cache_interface import TQFullAttentionSpec
    except ImportError:
        raise CheckpointFormatError(
            f"{layer.layer_name}: this vLLM has neither AttentionBackend.customize_spec nor "
            "TQFullAttentionSpec, so the packed KV page cannot be sized; use a checkpoint with "
            "kv_cache.bits = 16"
        ) from None
    return TQFullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=layer.num_kv_heads,
        head_size=layer.head_size,
        head_size_v=layer.head_size,
        dtype=torch.uint8,
        sliding_window=layer.sliding_window,
        tq_slot_size=kv_slot_bytes(layer.head_size, bits),
    )
