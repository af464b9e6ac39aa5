"""hadaquant: Hadamard-rotated 3-bit weights, activations and KV cache for vLLM.

This module is imported by every vLLM process through the ``vllm.general_plugins`` entry
point, so it must stay cheap: nothing heavy (torch, vllm) is imported at module level.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM plugin entry point (``vllm.general_plugins``). Idempotent.

    vLLM calls it in every process it starts (front end, engine core, workers), before it reads
    the model's config, so that ``quant_method: "hadaquant"`` resolves to our config class.
    Importing :mod:`hq_vllm.quant_method` registers the quantization method ``hadaquant``
    (``register_quantization_config``) and its linear methods for weight-loader v2
    (``register_weight_loader_v2_supported_method``), and the KV-cache dtype names
    ``hq_int3`` / ``hq_int4`` / ``hq_int8``; a second call does nothing.
    """
    global _registered
    if _registered:
        return
    import hq_vllm.quant_method  # noqa: F401  (registers on import)
    from hq_vllm.kv_dtype import install as install_kv_cache_dtypes

    install_kv_cache_dtypes()  # hq_int3 / hq_int4 / hq_int8 (hq_vllm/kv_dtype.py)

    _registered = True
