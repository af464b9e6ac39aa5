"""Checkpoints for the vLLM plugin tests: real SmolLM2, quantized by the offline pipeline.

SmolLM2-135M keeps everything real (tokenizer, 576 hidden / 1536 intermediate, so the online R4
is the non-power-of-two H_12 (x) H_128, group size 64). The whole 30-layer model is used for
parity: a model cut to a few layers is a garbage predictor (perplexity ~4e7 at 4 layers) whose
huge, confident logits turn the rare activation-code flip between two float32 summation orders
into percent-level perplexity differences, which says nothing about the plugin.
``truncated_smollm2`` remains for tests that only need a model vLLM can load quickly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hq_vllm.offline.checkpoint import TOKENIZER_FILES

NUM_LAYERS = 4


def truncated_smollm2(out_dir: Path, num_layers: int = NUM_LAYERS) -> Path:
    """The cached bf16 SmolLM2 directory with only its first ``num_layers`` decoder layers."""
    from transformers import AutoModelForCausalLM

    from hq_vllm.offline.model_io import cached_model_dir

    src = Path(cached_model_dir("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
    return out_dir


def quantized_checkpoint(model_dir: Path, out_dir: Path, recipe: str, *, mse_clip: bool | None = None,
                         **options) -> Path:
    """Run the offline pipeline. ``mse_clip=False`` skips the clip search (4x faster on the
    whole model; parity with the simulator does not depend on how the weight grid was chosen);
    ``options``: further QuantizeOptions fields (e.g. ``mp_budget`` for per-linear bit overrides)."""
    from hq_vllm.offline.pipeline import QuantizeOptions, quantize_to_checkpoint

    options = QuantizeOptions(recipe=recipe, mse_clip=mse_clip, **options)
    quantize_to_checkpoint(model_dir, out_dir, options, progress=False)
    return out_dir


def edit_quant_config(ckpt: Path, edit) -> None:
    """Apply ``edit(quantization_config dict)`` to a checkpoint's config.json in place."""
    path = Path(ckpt) / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
