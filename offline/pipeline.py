"""The quantize pipeline: load → (fuse + rotate) → quantize weights → write, and the simulated model.

Recipes name a bit-width triple and its defaults; ``QuantizeOptions`` is the one dataclass passed
down. The same functions build the in-memory simulated model that ``hadaquant eval`` measures, so a
checkpoint and its simulation cannot drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hq_vllm.format import (
    ActQuantSpec,
    HadaquantConfig,
    KVCacheSpec,
    RotationSpec,
    WeightQuantSpec,
    check_architecture,
    pack_linear,
    unpack_linear,
)
from hq_vllm.offline.calibrate import ClipSearch, begin_clip_search, check_clip_search_options, clip_search_record
from hq_vllm.offline.checkpoint import read_checkpoint_config, write_checkpoint
from hq_vllm.offline.data import calibration_batches
from hq_vllm.offline.gptq import gptq_quantize_model
from hq_vllm.offline.mixed_precision import MixedPrecision, check_mixed_precision_options, plan_mixed_precision
from hq_vllm.offline.model_io import load_model, read_hf_config
from hq_vllm.offline.quantize import QuantizedWeight, dequantize_weight, quantize_weight
from hq_vllm.offline.rotation import RotationOptions, head_dim_of, rotate_model, rotation_spec
from hq_vllm.offline.simulate import Simulation, attach_simulation, decoder_linears
from hq_vllm.offline.smoothrot import SmoothRot, check_smoothrot_options, smooth_model, smoothrot_record


@dataclass(frozen=True)
class Recipe:
    """Bit widths and the plain QuaRot-style defaults for clip ratios (see DESIGN.md)."""

    name: str
    weight: WeightQuantSpec
    activation: ActQuantSpec
    kv_cache: KVCacheSpec


def _recipe(name: str, w: int, a: int, kv: int) -> Recipe:
    return Recipe(
        name,
        WeightQuantSpec(bits=w, group_size=128, symmetric=True, mse_clip=True),
        ActQuantSpec(bits=a, clip_ratio=0.9 if a < 16 else 1.0, symmetric=True),
        KVCacheSpec(bits=kv, clip_ratio=0.95 if kv < 16 else 1.0, symmetric=False),
    )


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _recipe("w3a3kv3", 3, 3, 3),
        _recipe("w4a4kv4", 4, 4, 4),
        _recipe("w3a8kv4", 3, 8, 4),
        _recipe("w8a8kv8", 8, 8, 8),
        _recipe("w3a16", 3, 16, 16),
        _recipe("w4a16", 4, 16, 16),
        _recipe("w16a16", 16, 16, 16),
    )
}


WEIGHT_METHODS = ("rtn", "gptq")
GPTQ_BLOCK_SIZE = 128  # columns per lazy-update block (GPTQ's default; only speed depends on it)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything the pipeline decides; recorded in the checkpoint's config."""

    recipe: str = "w3a3kv3"
    rotate: bool = True
    rotation: RotationOptions = field(default_factory=RotationOptions)
    group_size: int | None = None  # None: the recipe's (128), lowered to fit the model's sizes
    weight_symmetric: bool | None = None
    mse_clip: bool | None = None
    act_clip: float | None = None
    kv_clip: float | None = None
    seed: int = 0  # rotation and calibration windows
    weight_method: str = "rtn"  # "rtn" | "gptq"
    calib_sequences: int = 128  # GPTQ calibration windows of BoolQ text disjoint from evaluation
    calib_seq_len: int = 512
    damp: float = 0.01  # GPTQ dampening, a fraction of mean(diag H)
    act_order: bool = False  # GPTQ columns by descending diag(H) (groups stay static)
    calib_dtype: str = "bfloat16"  # GPTQ calibration forward (Hessians are float32): "bfloat16" | "float32"
    # Activation/KV clip ratios: "fixed" (the recipe's, or act_clip/kv_clip) or "gbs" (gradual
    # binary search per layer and projection, offline/calibrate.py).
    clip_search: str = "fixed"
    gbs_start_bits: int | None = None  # not-yet-visited quantizers: None = target bits, 16 = unquantized
    gbs_direction: str = "forward"  # "forward" (first→last layer) | "backward" (last→first)
    gbs_sequences: int = 16  # calibration windows of the search (BoolQ text disjoint from evaluation)
    gbs_seq_len: int = 256
    gbs_rounds: int = 4  # bisection rounds after the coarse grid (resolution 0.25 / 2**rounds)
    gbs_target: str = "layer"  # loss vs the FP "layer" on the same input, or the FP "model"'s output
    gbs_dtype: str = "bfloat16"  # the search's linears/attention (fake quant and loss stay float32)
    # SmoothRot (offline/smoothrot.py): per-channel scales on the down_proj input before R4,
    # folded into up_proj/down_proj; alpha None = searched per layer, a number = that alpha everywhere.
    smoothrot: bool = False
    smoothrot_alpha: float | None = None
    smoothrot_sequences: int = 16  # calibration windows (BoolQ text disjoint from evaluation)
    smoothrot_seq_len: int = 256
    # Spike-aware mixed precision (offline/mixed_precision.py): keep the mp_budget projection groups
    # whose inputs quantize worst at mp_bits (8 or 16), weights and activations; 0 = off.
    mp_budget: int = 0
    mp_bits: int = 8
    mp_sequences: int = 16  # calibration windows of the measurement (BoolQ text disjoint from evaluation)
    mp_seq_len: int = 256

    def __post_init__(self) -> None:
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"unknown weight_method {self.weight_method!r}; choose one of {', '.join(WEIGHT_METHODS)}")
        if self.weight_method == "gptq" and not (self.calib_sequences > 0 and self.calib_seq_len > 1 and self.damp >= 0):
            raise ValueError("GPTQ needs calib_sequences > 0, calib_seq_len > 1 and damp >= 0")
        if self.calib_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"calib_dtype must be 'bfloat16' or 'float32', got {self.calib_dtype!r}")
        check_clip_search_options(self)
        check_smoothrot_options(self)
        check_mixed_precision_options(self)

    def resolved_recipe(self) -> Recipe:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        r = RECIPES[self.recipe]
        w = r.weight
        if self.group_size is not None:
            w = replace(w, group_size=self.group_size)
        if self.weight_symmetric is not None:
            w = replace(w, symmetric=self.weight_symmetric)
        if self.mse_clip is not None:
            w = replace(w, mse_clip=self.mse_clip)
        a = r.activation if self.act_clip is None else replace(r.activation, clip_ratio=self.act_clip)
        kv = r.kv_cache if self.kv_clip is None else replace(r.kv_cache, clip_ratio=self.kv_clip)
        return Recipe(r.name, w, a, kv)


#: How much calibration a run does (``hadaquant quantize --method``): ``full`` is every component
#: the recipe can use (the default), ``quarot`` the QuaRot-style baseline (rotation, GPTQ, fixed
#: clips), ``rtn`` rotation and round-to-nearest only (seconds; no calibration text).
METHODS = ("full", "quarot", "rtn")
#: Spike-aware mixed precision of the full method: projection groups kept at 8 bits, 2 of a model's
#: 4·layers groups (SmolLM2: 2 of 120, a few % more weight bytes). They are ranked by the layer
#: output error their quantization causes (offline/mixed_precision.py): on rotated SmolLM2 at
#: W4A4KV4 that picks 23.qkv and 0.gate_up. At 16-bit activations nothing is raised.
FULL_MP_BUDGET = 2


def method_options(method: str, recipe: str, **overrides) -> QuantizeOptions:
    """The options of ``method`` (see :data:`METHODS`) for ``recipe``, then ``overrides``.

    ``full`` = rotation + GPTQ + GBS clip search (when activations or the KV cache are quantized)
    + SmoothRot (when activations are quantized) + spike-aware mixed precision
    (:data:`FULL_MP_BUDGET` groups at 8 bits, when activations are quantized).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    runtime_quant = r.activation.bits < 16 or r.kv_cache.bits < 16
    acts = r.activation.bits < 16
    weights = r.weight.bits < 16
    base: dict = dict(recipe=recipe, rotate=True)
    if method in ("full", "quarot") and weights:
        base["weight_method"] = "gptq"
    if method == "full":
        base.update(clip_search="gbs" if runtime_quant else "fixed", smoothrot=acts,
                    mp_budget=FULL_MP_BUDGET if acts else 0, mp_bits=8)
    base.update(overrides)
    return QuantizeOptions(**base)


def full_options(recipe: str, **overrides) -> QuantizeOptions:
    """``method_options("full", recipe, **overrides)``: the recipe with every calibration component."""
    return method_options("full", recipe, **overrides)


def fit_group_size(requested: int, in_features: list[int]) -> int:
    """The largest group size ≤ requested (halving, down to 32) dividing every linear's input size.

    SmolLM2's hidden size 576 is not a multiple of 128, so its w3 recipe runs at group 64.
    """
    if requested == -1:
        return -1
    g = requested
    while g >= 32:
        if all(k % g == 0 for k in in_features):
            return g
        g //= 2
    raise ValueError(
        f"no group size ≤ {requested} (and ≥ 32) divides all linear input sizes {sorted(set(in_features))}; "
        "use --group-size -1 (per channel) or dimension expansion"
    )


def supported_tp_sizes(hf_config: dict, rotation: RotationSpec, weight: WeightQuantSpec) -> list[int]:
    """Tensor-parallel degrees the checkpoint can be served at.

    Attention heads must split evenly; the row-parallel linears (o_proj, down_proj) are split along
    their input, so each shard must hold whole packing blocks (32 channels) and whole groups; and
    an online R4 must be shard-local: it is block-diagonal with ``rotation.r4.blocks`` blocks, and
    a rank's slice of the intermediate dimension is a union of whole blocks only when TP divides
    ``blocks`` (one block over the whole size needs every shard's activations: TP 1 only).
    """
    heads, inter = hf_config["num_attention_heads"], hf_config["intermediate_size"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    block = 32 if weight.bits >= 16 or weight.group_size == -1 else max(32, weight.group_size)
    sizes = []
    for tp in (1, 2, 4, 8):
        if heads % tp or inter % tp:
            continue
        if weight.bits < 16 and tp > 1 and any((k // tp) % block for k in (heads * head_dim, inter)):
            continue
        if rotation.r4 is not None and rotation.r4_blocks % tp:
            continue
        sizes.append(tp)
    return sizes


def build_quant_config(recipe: Recipe, rotation: RotationSpec, hf_config: dict, options: QuantizeOptions, weight: WeightQuantSpec) -> HadaquantConfig:
    return HadaquantConfig(
        weight=weight,
        activation=recipe.activation,
        kv_cache=recipe.kv_cache,
        rotation=rotation,
        layers={},
        tp_sizes=supported_tp_sizes(hf_config, rotation, weight),
        recipe=recipe.name,
        calibration=calibration_record(options),
    )


def calibration_record(options: QuantizeOptions) -> dict:
    """The ``calibration`` provenance written into the checkpoint's config."""
    record = {"weight_method": options.weight_method, "seed": options.seed}
    if options.weight_method == "gptq":
        record.update(dataset="boolq-calibration", n_samples=options.calib_sequences,
                      seq_len=options.calib_seq_len, damp=options.damp, act_order=options.act_order,
                      static_groups=True, block_size=GPTQ_BLOCK_SIZE, dtype=options.calib_dtype)
    record.update(clip_search_record(options))
    return record


@dataclass
class PreparedModel:
    """A rotated model with its quantization config, weights still in full precision."""

    model: nn.Module
    tokenizer: object
    config: HadaquantConfig
    hf_config: dict
    seconds: float
    clip_search: ClipSearch | None = None  # set by quantize_model_weights with clip_search="gbs"
    smoothrot: SmoothRot | None = None  # set by prepare_model with options.smoothrot
    mixed_precision: MixedPrecision | None = None  # set by quantize_model_weights with options.mp_budget > 0


def prepare_model(model_dir: str | Path, options: QuantizeOptions, *, device: str | torch.device = "cpu",
                  progress: bool = True) -> PreparedModel:
    """Load, fuse and rotate (if asked), and settle the quantization config.

    ``device``: where the float64 rotations and the quantization run (a GPU makes a 7B model's
    preparation take seconds instead of minutes).
    """
    start = time.perf_counter()
    check_architecture(read_hf_config(model_dir))
    recipe = options.resolved_recipe()
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    model.to(device)
    torch.manual_seed(options.seed)
    hd = head_dim_of(model.config)
    smoothing: list[SmoothRot] = []

    def smooth(m: nn.Module, r4_block: int | None) -> None:
        """SmoothRot at the down_proj specs the checkpoint will have (norms fused, before R4)."""
        ids = calibration_batches(tokenizer, options.smoothrot_seq_len, options.smoothrot_sequences, options.seed)
        smoothing.append(smooth_model(m, ids, recipe.activation, _fitted_weight_spec(recipe.weight, m),
                                      r4_block=r4_block, alpha=options.smoothrot_alpha, progress=progress))

    if options.rotate:
        rot_opts = replace(options.rotation, seed=options.seed)
        applied = rotate_model(model, rot_opts, progress=progress, before_r4=smooth if options.smoothrot else None)
        rotation = RotationSpec(
            r1=applied.r1,
            r2=applied.r2,
            r3=rotation_spec("hadamard", hd),
            r4=applied.r4,
            expanded_hidden_size=model.config.hidden_size if options.rotation.expand_hidden_to else None,
            expanded_intermediate_size=model.config.intermediate_size if options.rotation.expand_intermediate_to else None,
            original_hidden_size=applied.original_hidden_size if options.rotation.expand_hidden_to else None,
            original_intermediate_size=applied.original_intermediate_size if options.rotation.expand_intermediate_to else None,
        )
    else:
        rotation = RotationSpec()
        if options.smoothrot:
            smooth(model, None)
    hf_config = model.config.to_dict()
    weight = _fitted_weight_spec(recipe.weight, model)
    config = build_quant_config(recipe, rotation, hf_config, options, weight)
    if smoothing:
        config = replace(config, calibration={**config.calibration, **smoothrot_record(options, smoothing[0])})
    return PreparedModel(model, tokenizer, config, hf_config, time.perf_counter() - start,
                         smoothrot=smoothing[0] if smoothing else None)


def _fitted_weight_spec(weight: WeightQuantSpec, model: nn.Module) -> WeightQuantSpec:
    """The recipe's weight spec with its group size fitted to the model's linear input sizes."""
    if weight.bits >= 16:
        return weight
    ks = [lin.in_features for lin in decoder_linears(model).values()]
    return replace(weight, group_size=fit_group_size(weight.group_size, ks))


def quantize_linears(model: nn.Module, config: HadaquantConfig, *, progress: bool = True, pack: bool = True,
                     quantized: dict[str, QuantizedWeight] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every decoder linear (RTN, or take the codes given in ``quantized``, e.g. from
    GPTQ); return each one's packed checkpoint tensors (on the CPU; empty dicts when ``pack`` is
    False).

    The model's weights are replaced by their dequantized values, so the model itself becomes
    the weight part of the simulation.
    """
    packed = {}
    quantized = quantized or {}
    linears = decoder_linears(model)
    desc = "pack" if quantized else "quantize (rtn)"
    for name, lin in tqdm(linears.items(), desc=desc, disable=not progress, unit="linear"):
        spec = config.effective_weight_spec(name)
        if spec.bits >= 16:
            continue
        qw = quantized[name] if name in quantized else quantize_weight(lin.weight.detach().float(), spec)
        packed[name] = {}
        if pack:
            cpu = [None if t is None else t.cpu() for t in (qw.codes, qw.scales, qw.zeros)]
            packed[name] = pack_linear(*cpu, spec, prefix=name)
        with torch.no_grad():
            lin.weight.copy_(dequantize_weight(qw, spec).to(lin.weight.dtype))
    # Everything else is served in bf16 (the checkpoint stores it so): round it here too, so the
    # in-memory simulation and a checkpoint read back compute the same function.
    with torch.no_grad():
        for key, param in model.named_parameters():
            prefix, _, leaf = key.rpartition(".")
            if not (prefix in packed and leaf == "weight"):
                param.copy_(param.to(torch.bfloat16).to(param.dtype))
    return packed


def quantize_model_weights(prepared: PreparedModel, options: QuantizeOptions, *, progress: bool = True,
                           pack: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The weight step of the pipeline: GPTQ on calibration text or RTN, then :func:`quantize_linears`.

    With ``options.clip_search == "gbs"`` the activation/KV clip search runs around it
    (offline/calibrate.py): the full-precision layer outputs are recorded first, the search runs
    on the quantized weights, and ``prepared.config`` / ``prepared.clip_search`` get the result.
    """
    # Mixed precision first: the clip search and GPTQ then see the kept groups' raised bits.
    prepared.config, prepared.mixed_precision = plan_mixed_precision(prepared.model, prepared.config,
                                                                     prepared.tokenizer, options, progress=progress)
    search = begin_clip_search(prepared.model, prepared.config, prepared.tokenizer, options, progress=progress)
    quantized = None
    if options.weight_method == "gptq" and any(
        prepared.config.effective_weight_spec(name).bits < 16 for name in decoder_linears(prepared.model)
    ):
        calib = calibration_batches(prepared.tokenizer, options.calib_seq_len, options.calib_sequences, options.seed)
        quantized = gptq_quantize_model(prepared.model, prepared.config, calib, damp=options.damp,
                                        block_size=GPTQ_BLOCK_SIZE, act_order=options.act_order,
                                        compute_dtype=getattr(torch, options.calib_dtype), progress=progress)
    packed = quantize_linears(prepared.model, prepared.config, progress=progress, pack=pack, quantized=quantized)
    if search is not None:
        prepared.config, prepared.clip_search = search.finish(prepared.model, prepared.config)
    return packed


def checkpoint_state_dict(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Packed linears under their prefixes; every other tensor in bf16."""
    state = {}
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in packed and leaf == "weight":
            continue
        state[key] = tensor.detach().to(torch.bfloat16).contiguous()
    for prefix, tensors in packed.items():
        for name, tensor in tensors.items():
            if name.endswith(".bias"):
                continue  # the bias stays as the model's own (bf16) tensor
            state[name] = tensor.contiguous()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@dataclass
class QuantizeSummary:
    out_dir: Path
    recipe: str
    rotated: bool
    weight: WeightQuantSpec
    num_quantized: int
    checkpoint_bytes: int
    seconds: float
    weight_method: str = "rtn"
    clip_search: ClipSearch | None = None
    smoothrot: SmoothRot | None = None
    mixed_precision: MixedPrecision | None = None

    def render(self) -> str:
        w = self.weight
        group = "per-channel" if w.group_size == -1 else f"group {w.group_size}"
        lines = [
            f"wrote {self.out_dir}",
            f"  recipe        {self.recipe} ({'rotated' if self.rotated else 'no rotation'})",
            f"  weights       {w.bits}-bit {'sym' if w.symmetric else 'asym'} {group}, {self.weight_method.upper()}{' + MSE clip' if w.mse_clip else ''}",
            f"  linears       {self.num_quantized} quantized",
            f"  size          {self.checkpoint_bytes / 2**20:.1f} MiB",
            f"  time          {self.seconds:.1f} s",
        ]
        if self.clip_search is not None:
            lines += [f"  clips         {self.clip_search.describe()}", self.clip_search.table()]
        if self.smoothrot is not None:
            lines.append(f"  smoothing     {self.smoothrot.describe()}")
            if not self.smoothrot.skipped:
                lines.append(self.smoothrot.table())
        if self.mixed_precision is not None:
            lines += [f"  mixed prec.   {self.mixed_precision.describe()}", self.mixed_precision.table()]
        return "\n".join(lines)


def quantize_to_checkpoint(model_dir: str | Path, out_dir: str | Path, options: QuantizeOptions, *, overwrite: bool = False, progress: bool = True) -> QuantizeSummary:
    """The ``hadaquant quantize`` job."""
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    prepared = prepare_model(model_dir, options, progress=progress)
    packed = quantize_model_weights(prepared, options, progress=progress)
    state = checkpoint_state_dict(prepared.model, packed)
    hf_config = dict(prepared.model.config.to_dict())
    hf_config["architectures"] = [type(prepared.model).__name__]
    hf_config["dtype"] = "bfloat16"
    linears = {name: (lin.out_features, lin.in_features) for name, lin in decoder_linears(prepared.model).items()}
    write_checkpoint(out, state, hf_config, prepared.config, tokenizer_dir=str(model_dir), overwrite=overwrite,
                     linears=linears)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return QuantizeSummary(out, prepared.config.recipe, options.rotate, prepared.config.weight, len(packed), size,
                           time.perf_counter() - start, options.weight_method, prepared.clip_search,
                           prepared.smoothrot, prepared.mixed_precision)


def simulated_model(model_dir: str | Path, options: QuantizeOptions, *, progress: bool = True,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    ) -> tuple[nn.Module, object, HadaquantConfig, Simulation]:
    """The recipe applied in memory (no checkpoint written): fake-quantized weights plus hooks.

    Rotation and quantization always run in float32/float64; ``dtype`` is what the simulated model
    then computes in (bfloat16 is what vLLM serves, and twice as fast on CPUs with AVX512-BF16).
    """
    prepared = prepare_model(model_dir, options, device=device, progress=progress)
    quantize_model_weights(prepared, options, progress=progress, pack=False)
    prepared.model.to(dtype)
    sim = attach_simulation(prepared.model, prepared.config)
    return prepared.model, prepared.tokenizer, prepared.config, sim


def load_checkpoint_simulated(ckpt_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, HadaquantConfig, Simulation]:
    """A hadaquant checkpoint as an HF model (in ``dtype``) with dequantized weights and simulation hooks."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt_dir)
    hf_config, qconfig = read_checkpoint_config(ckpt)
    plain = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    state = {}
    linears = decoder_linears(model)
    for key, tensor in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in linears and leaf in ("qweight", "scales", "qzeros"):
            continue
        state[key] = tensor.float()
    for prefix, lin in linears.items():
        spec = qconfig.effective_weight_spec(prefix)
        if spec.bits < 16:
            state[f"{prefix}.weight"] = unpack_linear(tensors, prefix, spec, lin.in_features)
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = set(model.state_dict()) - set(state)
    missing = {m for m in missing if not m.endswith("rotary_emb.inv_freq")}
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks tensors {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    sim = attach_simulation(model, qconfig)
    return model, tokenizer, qconfig, sim
