"""hadaquant: Hadamard-rotated 3-bit weights, activations and KV cache for vLLM.

This module is imported by every vLLM process through the ``vllm.general_plugins`` entry
point, so it must stay cheap: nothing heavy (torch, vllm) is imported at module level.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM plugin entry point. Idempotent.

    The quantization method and KV-cache dtype are registered by the plugin issue; until
    then this only marks the plugin as loaded so that vLLM's plugin discovery succeeds.
    """
    global _registered
    if _registered:
        return
    _registered = True
