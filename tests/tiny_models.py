"""Tiny random models of every supported architecture, for fast exactness tests."""

from __future__ import annotations

import torch


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_model(arch: str, *, tied: bool = False, hidden: int = 64, intermediate: int = 96, seed: int = 0,
               **overrides):
    """A random float32 model with random (non-unit) norm scales, so norm fusion is really tested.
    ``overrides`` replace config values (e.g. ``vocab_size``, ``head_dim``, ``sliding_window``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    }
    config_cls, model_cls, extra = classes[arch]
    values = dict(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
    )
    config = config_cls(**{**values, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model
