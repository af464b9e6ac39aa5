"""Random-weight checkpoints at real model shapes, for speed measurements inside vLLM.

Speed does not depend on weight values, so the end-to-end benchmark (``benchmarks/e2e_bench.py``)
serves random tensors at the shapes of real 7B models. Running the offline pipeline (load,
rotate, RTN) on a 7B model would cost minutes of a short device lease; this writes the same
files in seconds: random tensors made on the GPU (or CPU) one layer at a time.

Three kinds of checkpoint, each a Hugging Face model directory:

* ``bf16``: a plain checkpoint (also the input of vLLM's dynamic fp8, ``quantization="fp8"``).
* ``gptq4``: GPTQ format, 4-bit symmetric, group 128, ``desc_act`` false, what vLLM serves with
  its Marlin / Machete W4A16 kernels. Per linear (``K`` inputs, ``N`` outputs, ``G`` = 128):
  ``qweight`` int32 ``[K/8, N]`` (8 codes per word along K), ``qzeros`` int32 ``[K/G, N/8]``
  (GPTQ v1 stores zero - 1, so 0x77777777 for the symmetric zero 8), ``scales`` float16
  ``[K/G, N]``, ``g_idx`` int32 ``[K]`` (= k // G). These are the parameters that
  ``AutoGPTQLinearMethod.create_weights`` declares in vLLM 0.26 and 0.32
  (``vllm/model_executor/layers/quantization/auto_gptq.py``).
* ``hq``: a hadaquant checkpoint. Tensor names, shapes and dtypes come from
  :func:`hq_vllm.format.expected_shapes` and the directory is written by
  :func:`hq_vllm.offline.checkpoint.write_checkpoint`, which checks the config against the
  model and validates every tensor (:func:`hq_vllm.format.validate_tensors`) before writing.
  Any int32 word is a valid packing of some codes (dense 4-bit fields, 3-bit bit planes), so
  ``qweight`` is random words. The config records the rotations a real checkpoint of the shape
  would record (R1/R2 random Hadamard, R3 over head_dim, R4 over the intermediate size with the
  offline tool's default block count), so vLLM runs the online R3/R4 transforms exactly as it
  would for a real one; only the fused R1/R2 are not in the (random) weights, which changes no
  cost. Modes that share weight bits share one tensor directory (symlinked shards) and differ
  only in ``config.json``.

Magnitudes are chosen so that the random network stays finite (weights of std ~0.02, unit norm
scales): nothing in vLLM's speed depends on them, but NaNs would make greedy sampling odd.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from hq_vllm.format import HadaquantConfig, RotationSpec, WeightQuantSpec, expected_shapes

WEIGHT_STD = 0.02
GPTQ_BITS = 4
GPTQ_GROUP = 128
MAX_SHARD_BYTES = 4 * 10**9
#: 0x77777777 as int32: eight GPTQ v1 zero points of 7 (= the symmetric zero 8, minus 1).
GPTQ_SYM_QZEROS_WORD = 0x77777777


@dataclass(frozen=True)
class ModelShape:
    """What a benchmark needs of a model: its architecture and sizes (HF config names)."""

    architecture: str  # HF ``architectures`` entry
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    qkv_bias: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{HF linear name: (N out, K in)}`` of every decoder linear (Llama / Qwen2 layout)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        out = {}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}"
            out.update({
                f"{p}.self_attn.q_proj": (q, h), f"{p}.self_attn.k_proj": (kv, h),
                f"{p}.self_attn.v_proj": (kv, h), f"{p}.self_attn.o_proj": (h, q),
                f"{p}.mlp.gate_proj": (i, h), f"{p}.mlp.up_proj": (i, h), f"{p}.mlp.down_proj": (h, i),
            })
        return out

    def num_params(self) -> int:
        linear = sum(n * k for n, k in self.linear_shapes().values())
        return linear + 2 * self.vocab_size * self.hidden_size


#: Real shapes (random weights). Llama-2-7B's context is 4096; its max_position_embeddings is
#: raised to 8192 here so the long-context test (4096 prompt + 128 generated tokens) fits, which
#: changes no weight and no cost per token.
SHAPES = {
    "llama2-7b": ModelShape("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000, False, 10000.0, 1e-5, 8192),
    "qwen2.5-7b": ModelShape("Qwen2ForCausalLM", 3584, 18944, 28, 4, 28, 152064, True, 1000000.0, 1e-6, 32768),
    # The CPU smoke test: Llama layout, a non-power-of-two R4 (768 = 12 * 64), group 128 fits.
    "tiny-llama": ModelShape("LlamaForCausalLM", 256, 768, 4, 2, 2, 1024, False, 10000.0, 1e-5, 2048),
}


def hf_config(shape: ModelShape) -> dict:
    """``config.json`` of the model, written by this machine's transformers (as the offline
    tool does: ``model.config.to_dict()``)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        num_hidden_layers=shape.num_hidden_layers, vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2,
    )
    if shape.architecture == "LlamaForCausalLM":
        config = LlamaConfig(**common, head_dim=shape.head_dim, attention_bias=False, mlp_bias=False)
    elif shape.architecture == "Qwen2ForCausalLM":
        config = Qwen2Config(**common, use_sliding_window=False, max_window_layers=shape.num_hidden_layers)
    else:
        raise ValueError(f"no config maker for {shape.architecture!r}")
    d = config.to_dict()
    d["architectures"] = [shape.architecture]
    d["dtype"] = "bfloat16"
    d["torch_dtype"] = "bfloat16"
    return d


# ---------------------------------------------------------------------------------------------
# Random tensors, one layer at a time
# ---------------------------------------------------------------------------------------------


class _Random:
    """Random tensors on ``device`` from one seeded generator (reproducible per device)."""

    def __init__(self, device: str, seed: int) -> None:
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape: int, std: float = WEIGHT_STD) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32) * std).to(torch.bfloat16)

    def words(self, *shape: int) -> torch.Tensor:
        """Uniform int32 words: every bit pattern is some valid packing of codes."""
        return torch.randint(-(2**31), 2**31, shape, generator=self.gen, device=self.device, dtype=torch.int64).to(torch.int32)

    def scales(self, *shape: int, code_std: float) -> torch.Tensor:
        """Positive scales around ``WEIGHT_STD / code_std`` (so weights have std ~WEIGHT_STD)."""
        u = torch.rand(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (WEIGHT_STD / code_std * (0.75 + 0.5 * u)).to(torch.float16)

    def codes(self, *shape: int, bits: int) -> torch.Tensor:
        return torch.randint(0, 2**bits, shape, generator=self.gen, device=self.device, dtype=torch.int32).to(torch.uint8)


def _code_std(bits: int) -> float:
    """Standard deviation of ``c - 2**(b-1)`` for uniform codes ``c`` in [0, 2**b)."""
    return math.sqrt((4**bits - 1) / 12)


def _unquantized_tensors(shape: ModelShape, rnd: _Random, layer: int | None) -> dict[str, torch.Tensor]:
    """Norms and biases of one decoder layer, or (``layer=None``) embeddings, final norm, lm_head."""
    h = shape.hidden_size
    if layer is None:
        return {"model.embed_tokens.weight": rnd.normal(shape.vocab_size, h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16, device=rnd.device),
                "lm_head.weight": rnd.normal(shape.vocab_size, h)}
    p = f"model.layers.{layer}"
    out = {f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16, device=rnd.device),
           f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16, device=rnd.device)}
    if shape.qkv_bias:
        for proj, (n, _) in _layer_linears(shape, layer).items():
            if proj.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj"):
                out[f"{proj}.bias"] = rnd.normal(n)
    return out


def _layer_linears(shape: ModelShape, layer: int) -> dict[str, tuple[int, int]]:
    p = f"model.layers.{layer}."
    return {k: v for k, v in shape.linear_shapes().items() if k.startswith(p)}


def _bf16_linear(rnd: _Random, prefix: str, n: int, k: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": rnd.normal(n, k)}


def _gptq_linear(rnd: _Random, prefix: str, n: int, k: int) -> dict[str, torch.Tensor]:
    pack = 32 // GPTQ_BITS
    groups = k // GPTQ_GROUP
    return {
        f"{prefix}.qweight": rnd.words(k // pack, n),
        f"{prefix}.qzeros": torch.full((groups, n // pack), GPTQ_SYM_QZEROS_WORD, dtype=torch.int32,
                                       device=rnd.device),
        f"{prefix}.scales": rnd.scales(groups, n, code_std=_code_std(GPTQ_BITS)),
        f"{prefix}.g_idx": (torch.arange(k, device=rnd.device, dtype=torch.int32) // GPTQ_GROUP),
    }


def _hq_linear(rnd: _Random, prefix: str, n: int, k: int, spec: WeightQuantSpec) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the names, shapes and dtypes of the format."""
    out = {}
    for name, (shape, dtype) in expected_shapes(prefix, n, k, spec).items():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "weight":  # a 16-bit linear
            out[name] = rnd.normal(*shape)
        elif leaf == "qweight":
            out[name] = rnd.words(*shape)
        elif leaf == "scales":
            out[name] = rnd.scales(*shape, code_std=_code_std(spec.bits))
        elif leaf == "qzeros":
            out[name] = rnd.codes(*shape, bits=spec.bits)
        else:
            raise ValueError(f"format tensor {name!r} ({leaf}) has no random maker")
        assert out[name].dtype == dtype and tuple(out[name].shape) == shape
    return out


def _tensors(shape: ModelShape, kind: str, rnd: _Random, spec: WeightQuantSpec | None = None
             ) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's tensors, one decoder layer (then the rest) at a time, on the CPU."""
    for layer in [*range(shape.num_hidden_layers), None]:
        out = _unquantized_tensors(shape, rnd, layer)
        if layer is not None:
            for prefix, (n, k) in _layer_linears(shape, layer).items():
                if kind == "bf16":
                    out.update(_bf16_linear(rnd, prefix, n, k))
                elif kind == "gptq4":
                    out.update(_gptq_linear(rnd, prefix, n, k))
                else:
                    out.update(_hq_linear(rnd, prefix, n, k, spec))
        yield {name: t.cpu().contiguous() for name, t in out.items()}


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_streaming(out: Path, chunks: Iterator[dict[str, torch.Tensor]], config: dict) -> Path:
    """Safetensors shards of at most ``MAX_SHARD_BYTES`` written as the chunks arrive, then the
    index and ``config.json``; into a temporary directory renamed into place last."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        files: list[str] = []
        weight_map: dict[str, str] = {}

        def flush(final: bool) -> None:
            if shards[-1]:
                name = f"part-{len(files):05d}.safetensors"
                save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
                files.append(name)
                weight_map.update({k: name for k in shards[-1]})
            if not final:
                shards[-1], sizes[-1] = {}, 0

        for chunk in chunks:
            for name, t in chunk.items():
                nbytes = t.numel() * t.element_size()
                if shards[-1] and sizes[-1] + nbytes > MAX_SHARD_BYTES:
                    flush(final=False)
                shards[-1][name] = t
                sizes[-1] += nbytes
        flush(final=True)
        # HF names: model-0000i-of-0000N.safetensors
        final_names = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
        for old, new in final_names.items():
            os.rename(tmp / old, tmp / new)
        total = sum((tmp / f).stat().st_size for f in final_names.values())
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": {k: final_names[v] for k, v in weight_map.items()}})
        _write_json(tmp / "config.json", config)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_bf16(shape: ModelShape, out: Path, *, device: str = "cpu", seed: int = 0) -> Path:
    """A plain bf16 checkpoint with random weights."""
    return _write_streaming(Path(out), _tensors(shape, "bf16", _Random(device, seed)), hf_config(shape))


def gptq_quantization_config() -> dict:
    """What GPTQ tools (AutoGPTQ / GPTQModel) write and vLLM's GPTQ config reads: ``bits``,
    ``group_size``, ``desc_act``, ``sym`` (``AutoGPTQConfig.from_config``), ``lm_head``."""
    return {"quant_method": "gptq", "bits": GPTQ_BITS, "group_size": GPTQ_GROUP, "desc_act": False,
            "sym": True, "lm_head": False, "checkpoint_format": "gptq", "static_groups": False,
            "true_sequential": True, "damp_percent": 0.01}


def write_gptq(shape: ModelShape, out: Path, *, device: str = "cpu", seed: int = 0) -> Path:
    """A GPTQ W4A16 group-128 checkpoint with random codes (see the module docstring)."""
    for prefix, (n, k) in shape.linear_shapes().items():
        if k % GPTQ_GROUP or n % (32 // GPTQ_BITS):
            raise ValueError(f"{prefix}: [N={n}, K={k}] does not fit GPTQ {GPTQ_BITS}-bit group {GPTQ_GROUP}")
    config = {**hf_config(shape), "quantization_config": gptq_quantization_config()}
    return _write_streaming(Path(out), _tensors(shape, "gptq4", _Random(device, seed)), config)


def hq_rotation(shape: ModelShape) -> RotationSpec:
    """The rotations a real hadaquant checkpoint of this shape records (offline defaults:
    R1/R2 random Hadamard, R3 Hadamard over head_dim, R4 over the intermediate size in
    ``default_r4_blocks`` diagonal blocks)."""
    from hq_vllm.offline.rotation import default_r4_blocks, rotation_spec

    blocks = default_r4_blocks(shape.intermediate_size, shape.num_attention_heads)
    return RotationSpec(
        r1=rotation_spec("random_hadamard", shape.hidden_size, seed=0),
        r2=rotation_spec("random_hadamard", shape.head_dim, seed=1),
        r3=rotation_spec("hadamard", shape.head_dim),
        r4=rotation_spec("hadamard", shape.intermediate_size, seed=2, blocks=blocks),
    )


def hq_config(shape: ModelShape, recipe: str, weight_bits: int, act_bits: int, kv_bits: int) -> HadaquantConfig:
    """The quantization config of a ``w{weight_bits}a{act_bits}kv{kv_bits}`` checkpoint: the
    offline recipes' specs (``hq_vllm.offline.pipeline.RECIPES``, RTN without clip search) with
    this shape's rotations and TP sizes."""
    from hq_vllm.offline.pipeline import RECIPES, supported_tp_sizes

    def spec_of(bits: int, attr: str):
        for r in RECIPES.values():
            if getattr(r, attr).bits == bits:
                return getattr(r, attr)
        raise ValueError(f"no recipe has {attr} bits {bits}")

    weight = replace(spec_of(weight_bits, "weight"), mse_clip=False)
    rotation = hq_rotation(shape)
    return HadaquantConfig(
        weight=weight, activation=spec_of(act_bits, "activation"), kv_cache=spec_of(kv_bits, "kv_cache"),
        rotation=rotation, layers={}, tp_sizes=supported_tp_sizes(hf_config(shape), rotation, weight),
        recipe=recipe,
        calibration={"synthetic": "random codes and scales (benchmarks/synthetic_checkpoint.py): speed only"},
    )


def write_hq_weights(shape: ModelShape, out: Path, config: HadaquantConfig, *, device: str = "cpu",
                     seed: int = 0) -> Path:
    """A complete hadaquant checkpoint (random tensors) through ``write_checkpoint``."""
    from hq_vllm.offline.checkpoint import write_checkpoint

    state: dict[str, torch.Tensor] = {}
    for chunk in _tensors(shape, "hq", _Random(device, seed), config.weight):
        state.update(chunk)
    return write_checkpoint(out, state, hf_config(shape), config, overwrite=True, linears=shape.linear_shapes())


def link_hq_variant(weights_dir: Path, out: Path, config: HadaquantConfig) -> Path:
    """A checkpoint that shares ``weights_dir``'s tensors (symlinks) with another
    ``quantization_config`` (other activation / KV bits; the weight spec must be the same)."""
    from hq_vllm.offline.checkpoint import read_checkpoint_config

    hf, base = read_checkpoint_config(weights_dir)
    if base.weight != config.weight or base.rotation != config.rotation:
        raise ValueError(f"{weights_dir} has weight {base.weight} / rotation {base.rotation}; "
                         f"the variant needs {config.weight} / {config.rotation}")
    hf = dict(hf)
    config.check_model(hf)
    hf["quantization_config"] = config.to_dict()
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    for f in Path(weights_dir).iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), tmp / f.name)
    _write_json(tmp / "config.json", hf)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def checkpoint_bytes(shape: ModelShape, kind: str, weight_bits: int = 16) -> int:
    """Approximate size on disk (for the free-space check before writing)."""
    linear = sum(n * k for n, k in shape.linear_shapes().values())
    rest = 2 * 2 * shape.vocab_size * shape.hidden_size
    if kind == "bf16":
        return 2 * linear + rest
    bits = GPTQ_BITS if kind == "gptq4" else weight_bits
    return int(linear * (bits / 8 + 2 / 128 + (0.5 / 128 if kind == "gptq4" else 0))) + rest
