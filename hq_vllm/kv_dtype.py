"""KV-cache dtype names for the packed, rotated KV cache: ``hq_int3``, ``hq_int4``, ``hq_int8``.

A hadaquant checkpoint already says how its KV cache is stored (``quantization_config.kv_cache``),
so ``vllm serve CKPT`` needs no flag. The names let a user choose or change it at serving time,
for a checkpoint (KV bits change nothing stored: only what attention does at run time) or for a
plain model served with ``--quantization hadaquant``:

=================================  ==========================================================
vLLM                               how to ask for a 3-bit KV cache
=================================  ==========================================================
with ``register_kv_cache_dtype``   ``--kv-cache-dtype hq_int3`` / ``LLM(kv_cache_dtype="hq_int3")``
(``vllm.config.cache``, 0.33+)     (the names are registered as vLLM dtypes: uint8 storage,
                                   ``KVQuantMode.CUSTOM``)
without it (0.26 - 0.32: the       ``LLM(kv_cache_dtype="hq_int3")`` through the shim below, or,
dtype names are a closed           on the command line (whose ``--kv-cache-dtype`` choices are
``Literal``)                       fixed before plugins load), ``--hf-overrides
                                   '{"hadaquant_kv_cache_dtype": "hq_int3"}'``
=================================  ==========================================================

The compatibility shim (vLLM without ``register_kv_cache_dtype``): ``vllm.engine.arg_utils``
resolves ``kv_cache_dtype`` with ``resolve_kv_cache_dtype_string(dtype, model_config)`` right
before it builds ``CacheConfig`` (whose ``Literal`` would reject our names). The shim wraps that
function: one of our names is recorded on the model's HF config as ``hadaquant_kv_cache_dtype``
(exactly what the ``--hf-overrides`` spelling does) and ``"auto"`` goes on to vLLM, whose own
cache stays untouched; everything else passes through unchanged. The quantization config reads
the attribute in ``maybe_update_config`` (:func:`requested_kv_bits`) and serves those bits; the
packed cache itself is the one ``hq_vllm.attention`` installs for checkpoints. The name needs the
hadaquant quantization method (a checkpoint, or ``--quantization hadaquant``); without it the
shim raises at once, naming the fix.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HF_CONFIG_KEY", "KV_CACHE_DTYPES", "install", "requested_kv_bits"]

#: Name -> bits of the packed cache. The single list of our KV-cache dtype names.
KV_CACHE_DTYPES = {"hq_int3": 3, "hq_int4": 4, "hq_int8": 8}
#: Where the requested name travels with the model's HF config (set by the shim or by
#: ``--hf-overrides``); vLLM ships the HF config to every worker.
HF_CONFIG_KEY = "hadaquant_kv_cache_dtype"

_installed = False


def _check_name(name: Any, where: str) -> int:
    if name not in KV_CACHE_DTYPES:
        from hq_vllm.format import CheckpointFormatError

        raise CheckpointFormatError(
            f"{where} = {name!r}: unknown hadaquant KV-cache dtype (choose one of "
            f"{', '.join(KV_CACHE_DTYPES)})"
        )
    return KV_CACHE_DTYPES[name]


def requested_kv_bits(hf_config: Any, layer_kv_cache_dtype: str | None = None) -> int | None:
    """KV bits asked for at serving time, or None (then the checkpoint's own)."""
    if layer_kv_cache_dtype in KV_CACHE_DTYPES:  # vLLM with register_kv_cache_dtype
        return KV_CACHE_DTYPES[layer_kv_cache_dtype]
    name = getattr(hf_config, HF_CONFIG_KEY, None) if hf_config is not None else None
    if name is None:
        return None
    return _check_name(name, f"hf_overrides.{HF_CONFIG_KEY}")


def _register_with_vllm(register) -> None:
    import torch
    from vllm.v1.kv_cache_interface import KVQuantMode

    for name in KV_CACHE_DTYPES:
        handler = type(f"HadaquantKVDType_{name}", (), {
            "name": name,
            "torch_dtype": lambda self: torch.uint8,
            "quant_mode": lambda self: KVQuantMode.CUSTOM,
            "__doc__": f"hadaquant's packed, R3-rotated {KV_CACHE_DTYPES[name]}-bit KV cache.",
        })
        register(name)(handler)


def _install_shim() -> None:
    import vllm.engine.arg_utils as arg_utils

    original = arg_utils.resolve_kv_cache_dtype_string
    if getattr(original, "_hadaquant", False):
        return

    def resolve_kv_cache_dtype_string(kv_cache_dtype: str, model_config: Any) -> str:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            return original(kv_cache_dtype, model_config)
        if getattr(model_config, "quantization", None) != "hadaquant":
            raise ValueError(
                f"kv_cache_dtype = {kv_cache_dtype!r} is hadaquant's packed KV cache: serve a "
                "hadaquant checkpoint, or add --quantization hadaquant for a plain model "
                f"(model {getattr(model_config, 'model', '?')!r} has quantization "
                f"{getattr(model_config, 'quantization', None)!r})"
            )
        setattr(model_config.hf_config, HF_CONFIG_KEY, kv_cache_dtype)
        return "auto"

    resolve_kv_cache_dtype_string._hadaquant = True  # type: ignore[attr-defined]
    arg_utils.resolve_kv_cache_dtype_string = resolve_kv_cache_dtype_string


def install() -> None:
    """Make the names known to vLLM (idempotent; called by :func:`hq_vllm.register`)."""
    global _installed
    if _installed:
        return
    import vllm.config.cache as cache

    register = getattr(cache, "register_kv_cache_dtype", None)
    if register is not None:
        _register_with_vllm(register)
    else:
        _install_shim()
    _installed = True
