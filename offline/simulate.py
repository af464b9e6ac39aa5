"""Fake-quantization simulator: what the vLLM plugin computes, in plain torch on an HF model.

Any recipe can be evaluated before (and independently of) vLLM: the weights are replaced by their
dequantized values, and hooks do at run time exactly what the serving path does:

* before every decoder linear: the online R4 Hadamard (down_proj only, when configured;
  block-diagonal with ``rotation.r4.blocks`` blocks, over the whole intermediate size as at
  tensor parallel size 1), then dynamic per-token activation quantization at the layer's bits
  and clip ratio;
* inside attention, after RoPE: the online R3 Hadamard on Q and K (QKᵀ is unchanged), then K and V
  quantized per token and head at the KV-cache bits and the layer's K and V clip ratios
  (``HadaquantConfig.effective_kv_specs``), as they would be stored.

The hooks are attached to a model and removed by ``detach()``; nothing global changes except the
registration of one named attention function in transformers' registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hq_vllm.format import HadaquantConfig
from hq_vllm.kernels.fwht import block_hadamard_transform, hadamard_transform
from hq_vllm.offline.quantize import fake_quantize_kv, fake_quantize_per_token

ATTENTION_NAME = "hadaquant_sim"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every quantizable linear of the decoder, keyed by its HF module name (lm_head excluded)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_NAMES:
            out[name] = module
    return out


def _simulated_attention(module, query, key, value, attention_mask, **kwargs):
    """R3 on Q and K, KV fake quantization, then transformers' own SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "hq_kv_spec", None)
    if kv is not None:
        if kv.get("r3", False):
            query = hadamard_transform(query)
            key = hadamard_transform(key)
        key = fake_quantize_kv(key, kv["bits"], kv["clip_ratio"], kv["symmetric"])
        value = fake_quantize_kv(value, kv["bits"], kv.get("v_clip_ratio", kv["clip_ratio"]), kv["symmetric"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _simulated_attention)
    # Without a mask function of its own name, transformers builds no padding mask for it.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@dataclass
class Simulation:
    """Handle on the hooks attached to one model."""

    model: nn.Module
    handles: list = field(default_factory=list)
    previous_attention: str | None = None

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.model.modules():
            if hasattr(module, "hq_kv_spec"):
                del module.hq_kv_spec
        if self.previous_attention is not None:
            self.model.set_attn_implementation(self.previous_attention)


def _activation_hook(bits: int, clip_ratio: float, symmetric: bool, r4_size: int | None,
                     r4_block_size: int | None = None):
    def hook(module, args):
        (x, *rest) = args
        if r4_size is not None:
            if x.shape[-1] != r4_size:
                raise ValueError(f"online R4 expects {r4_size} input channels, got {x.shape[-1]}")
            x = block_hadamard_transform(x, r4_block_size)
        x = fake_quantize_per_token(x, bits, clip_ratio, symmetric)
        return (x, *rest)

    return hook


def attach_simulation(model: nn.Module, config: HadaquantConfig) -> Simulation:
    """Attach the online rotations and activation/KV fake quantization described by ``config``.

    Weights are not touched here: load dequantized weights (``checkpoint_to_model``) or fake-quantize
    them (``quantize_model_weights``) first.
    """
    sim = Simulation(model)
    r4, r4_block = config.rotation.r4, config.rotation.r4_block_size
    for name, lin in decoder_linears(model).items():
        act = config.effective_act_spec(name)
        r4_size = r4["size"] if (r4 and name.endswith("down_proj")) else None
        if act.bits >= 16 and r4_size is None:
            continue
        sim.handles.append(
            lin.register_forward_pre_hook(_activation_hook(act.bits, act.clip_ratio, act.symmetric, r4_size, r4_block))
        )
    kv = config.kv_cache
    r3 = config.rotation.r3 is not None
    if kv.bits < 16 or r3:
        _register_attention()
        for i, layer in enumerate(model.model.layers):
            k_spec, v_spec = config.effective_kv_specs(f"model.layers.{i}.self_attn.attn")
            layer.self_attn.hq_kv_spec = {
                "bits": kv.bits,
                "clip_ratio": k_spec.clip_ratio,  # K's; V's below (per-layer searched clips)
                "v_clip_ratio": v_spec.clip_ratio,
                "symmetric": kv.symmetric,
                "r3": r3,
            }
        sim.previous_attention = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
    return sim
