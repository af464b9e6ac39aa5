"""Norm fusion and the offline halves of the Hadamard rotations (QuaRot lineage), in one file.

Notation: a linear layer computes ``y = x Wᵀ + b`` with ``W`` of shape [out, in]; rows of
activations are tokens. Every transform here leaves the model's function unchanged in exact
arithmetic; the tests check the logits in float32.

* **Norm fusion**: ``RMSNorm(x) = x / rms(x) · g``. The scale ``g`` moves into the columns of every
  linear that reads the norm's output (``W ← W diag(g)``) and ``g ← 1``. The final norm's scale moves
  into ``lm_head``, so tied embeddings are untied first.
* **R1** (residual stream, hidden size d, orthogonal ``Q``): the residual stream becomes ``x Q``.
  Readers ``W ← W Q`` (q/k/v, gate/up, lm_head), writers ``W ← Qᵀ W, b ← b Q`` (o, down), embedding
  rows ``E ← E Q``. A parameter-free RMSNorm commutes with ``Q`` because ``Q`` keeps norms.
* **R2** (per head, head_dim, orthogonal ``H``): each value head becomes ``v_h H`` (v_proj rows
  ``W_h ← Hᵀ W_h``) and o_proj undoes it on its input columns (``W[:, h] ← W[:, h] H``).
* **R4** (intermediate size I): the online half rotates the down_proj input ``a ← a H`` at run
  time; the offline half here is ``W_down ← W_down H``. ``H`` is block-diagonal, ``blocks`` equal
  Hadamard blocks of order I / blocks (``H = I_blocks ⊗ H_B``, still orthogonal, so the model is
  as unchanged as with one block): down_proj is row-parallel under tensor parallelism, and a
  rank whose slice of I is a union of whole blocks (tp divides blocks) rotates it alone. The
  default (:func:`default_r4_blocks`) is as many blocks as the model's attention heads allow
  TP degrees, up to 8, as long as the online transform gets no slower.
* **R3** (Q and K after RoPE) is online only; nothing is fused (see ``simulate.py``).
* **Dimension expansion**: a size no Hadamard construction covers can be zero-padded to one that
  exists. Hidden d → d': embeddings and writers gain zero columns/rows; RMSNorm then averages over
  d' channels, which scales its output by sqrt(d'/d) and its epsilon by d/d'; we set eps ← eps·d/d'
  and fold sqrt(d/d') into every reader, so the function is exactly preserved. Intermediate I → I':
  gate/up gain zero rows (silu(0)·0 = 0) and down gains zero columns. Either way the result is a
  plain model of the same architecture with larger sizes in its config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hq_vllm.kernels.hadamard import (
    DEFAULT_MAX_WALSH_GROUP,
    hadamard_factor,
    is_supported,
    rotation_matrix,
)

ROTATION_DTYPE = torch.float64  # rotations are applied in float64 so fusing adds no error of its own


@dataclass(frozen=True)
class RotationOptions:
    """Which rotations to fuse, and how. One object passed down; no module-level flags."""

    r1_kind: str = "random_hadamard"
    r2_kind: str = "random_hadamard"
    r4_kind: str = "hadamard"  # online: a fixed Hadamard, so the kernel can run a fast transform
    seed: int = 0
    r1: bool = True
    r2: bool = True
    r4: bool = True
    group_size: int | None = None  # for "grouped_walsh"
    r4_blocks: int | None = None  # diagonal blocks of the online R4; None: default_r4_blocks
    expand_hidden_to: int | None = None
    expand_intermediate_to: int | None = None


# --------------------------------------------------------------------------------------------
# Model structure (Llama, Mistral, Qwen2, Qwen3 share it)
# --------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _readers_of_input_norm(layer) -> list[nn.Linear]:
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj]


def _readers_of_post_norm(layer) -> list[nn.Linear]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj]


def _writers(layer) -> list[nn.Linear]:
    return [layer.self_attn.o_proj, layer.mlp.down_proj]


def _set_weight(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=False))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(ROTATION_DTYPE)


# --------------------------------------------------------------------------------------------
# Norm fusion
# --------------------------------------------------------------------------------------------


def untie_embeddings(model: nn.Module) -> None:
    """Give lm_head its own copy of the embedding so the two can be transformed differently."""
    if model.lm_head.weight is model.model.embed_tokens.weight or model.config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        # transformers re-ties on some calls (e.g. post_init) when these keys are present.
        if getattr(model, "_tied_weights_keys", None):
            model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []


def _fuse_norm_into(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = _f64(norm.weight)
    for lin in readers:
        _set_weight(lin, _f64(lin.weight) * g)
    _set_weight(norm, torch.ones_like(g))


def fuse_rmsnorms_into_linears(model: nn.Module) -> None:
    """Fold every residual-stream RMSNorm scale into the linears that read it (and lm_head).

    Qwen3's per-head q_norm/k_norm act inside attention and are left alone.
    """
    untie_embeddings(model)
    for layer in decoder_layers(model):
        _fuse_norm_into(layer.input_layernorm, _readers_of_input_norm(layer))
        _fuse_norm_into(layer.post_attention_layernorm, _readers_of_post_norm(layer))
    _fuse_norm_into(model.model.norm, [model.lm_head])


# --------------------------------------------------------------------------------------------
# Dimension expansion
# --------------------------------------------------------------------------------------------


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _replace_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=lin.weight.dtype)
    new.weight = nn.Parameter(weight.to(lin.weight.dtype), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(lin.weight.dtype), requires_grad=False)
    return new


def expand_hidden_size(model: nn.Module, new_size: int) -> None:
    """Zero-pad the residual stream from d to new_size channels (call after norm fusion)."""
    config = model.config
    d = config.hidden_size
    if new_size == d:
        return
    if new_size < d:
        raise ValueError(f"cannot expand hidden size {d} to the smaller {new_size}")
    if config.model_type == "qwen3":
        # Qwen3's q_norm/k_norm read the same rms_norm_eps that expansion must rescale.
        raise ValueError("hidden-size expansion is not supported for Qwen3 (its q/k norms share rms_norm_eps)")
    if any(float(_f64(n.weight).sub(1).abs().max()) > 0 for n in _all_residual_norms(model)):
        raise ValueError("expand_hidden_size needs fused (unit-scale) norms: call fuse_rmsnorms_into_linears first")
    factor = math.sqrt(d / new_size)
    emb = model.model.embed_tokens
    emb.weight = nn.Parameter(_pad(_f64(emb.weight), 1, new_size).to(emb.weight.dtype), requires_grad=False)
    emb.embedding_dim = new_size
    for layer in decoder_layers(model):
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            for name in names:
                lin = getattr(parent, name)
                w = _pad(_f64(lin.weight), 1, new_size) * factor
                setattr(parent, name, _replace_linear(lin, w, None if lin.bias is None else _f64(lin.bias)))
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            lin = getattr(parent, name)
            bias = None if lin.bias is None else _pad(_f64(lin.bias), 0, new_size)
            setattr(parent, name, _replace_linear(lin, _pad(_f64(lin.weight), 0, new_size), bias))
    model.lm_head = _replace_linear(model.lm_head, _pad(_f64(model.lm_head.weight), 1, new_size) * factor, None)
    eps = config.rms_norm_eps * d / new_size
    for norm in _all_residual_norms(model):
        norm.weight = nn.Parameter(norm.weight.new_ones(new_size), requires_grad=False)
        norm.variance_epsilon = eps
    config.head_dim = head_dim_of(config)  # pin it: it was derived from hidden_size
    config.hidden_size = new_size
    config.rms_norm_eps = eps


def _all_residual_norms(model: nn.Module) -> list[nn.Module]:
    norms = [model.model.norm]
    for layer in decoder_layers(model):
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    return norms


def expand_intermediate_size(model: nn.Module, new_size: int) -> None:
    """Zero-pad the MLP's intermediate dimension to new_size (gate/up rows, down columns)."""
    size = model.config.intermediate_size
    if new_size == size:
        return
    if new_size < size:
        raise ValueError(f"cannot expand intermediate size {size} to the smaller {new_size}")
    for layer in decoder_layers(model):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            bias = None if lin.bias is None else _pad(_f64(lin.bias), 0, new_size)
            setattr(mlp, name, _replace_linear(lin, _pad(_f64(lin.weight), 0, new_size), bias))
        down = mlp.down_proj
        mlp.down_proj = _replace_linear(
            down, _pad(_f64(down.weight), 1, new_size), None if down.bias is None else _f64(down.bias)
        )
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = new_size
    model.config.intermediate_size = new_size


# --------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------


def rotate_residual(model: nn.Module, q: torch.Tensor) -> None:
    """R1: rotate the residual stream by the orthogonal q (hidden × hidden). Norms must be fused."""
    emb = model.model.embed_tokens
    q = q.to(device=emb.weight.device, dtype=ROTATION_DTYPE)
    _set_weight(emb, _f64(emb.weight) @ q)
    for layer in decoder_layers(model):
        for lin in _readers_of_input_norm(layer) + _readers_of_post_norm(layer):
            _set_weight(lin, _f64(lin.weight) @ q)
        for lin in _writers(layer):
            _set_weight(lin, q.T @ _f64(lin.weight))
            if lin.bias is not None:
                _set_weight(lin, _f64(lin.bias) @ q, "bias")
    _set_weight(model.lm_head, _f64(model.lm_head.weight) @ q)


def rotate_heads(model: nn.Module, h: torch.Tensor) -> None:
    """R2: rotate each value head by h (head_dim × head_dim) and undo it on o_proj's input."""
    h = h.to(device=model.lm_head.weight.device, dtype=ROTATION_DTYPE)
    hd = h.shape[0]
    for layer in decoder_layers(model):
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        wv = _f64(v.weight).reshape(-1, hd, v.weight.shape[1])  # [kv_heads, hd, hidden]
        _set_weight(v, torch.einsum("ji,hjk->hik", h, wv).reshape(v.weight.shape))  # Hᵀ W_h
        if v.bias is not None:
            _set_weight(v, (_f64(v.bias).reshape(-1, hd) @ h).reshape(-1), "bias")
        wo = _f64(o.weight).reshape(o.weight.shape[0], -1, hd)  # [hidden, heads, hd]
        _set_weight(o, (wo @ h).reshape(o.weight.shape))


def rotate_down_proj_input(model: nn.Module, h: torch.Tensor) -> None:
    """R4, offline half: W_down ← W_down (I ⊗ h) for one diagonal block h (B × B; B = the
    intermediate size for a single block); the plugin/simulator applies ``a ← a (I ⊗ h)``
    online, block by block."""
    h = h.to(device=model.lm_head.weight.device, dtype=ROTATION_DTYPE)
    b = h.shape[0]
    for layer in decoder_layers(model):
        down = layer.mlp.down_proj
        w = _f64(down.weight)
        if w.shape[1] == b:
            _set_weight(down, w @ h)
        else:
            if w.shape[1] % b:
                raise ValueError(f"R4 block of order {b} does not divide down_proj's {w.shape[1]} inputs")
            _set_weight(down, (w.reshape(w.shape[0], -1, b) @ h).reshape(w.shape))


#: Largest default number of R4 blocks (TP 8 is the largest degree one host serves).
MAX_DEFAULT_R4_BLOCKS = 8
#: Smallest power-of-two part of a default R4 block: the online transform's Triton kernel
#: (``kernels/fwht.py``) multiplies by a right factor H_64 in registers; a block with a smaller
#: power-of-two part shrinks that tile and runs slower (below).
MIN_R4_BLOCK_POW2 = 64


def default_r4_blocks(intermediate_size: int, num_attention_heads: int) -> int:
    """The number of diagonal R4 blocks when none is asked for: the largest b in 1, 2, 4, 8 such
    that the model can be served at tensor parallel size b (b divides the attention heads and
    the intermediate size) and a block of I / b has a Hadamard construction whose power-of-two
    part is at least ``MIN_R4_BLOCK_POW2`` (64).

    A block of I / b, when it exists, has the same dense factor k as the full size (k is the
    odd part of I times the smallest workable power of two, and the block has the same odd
    part): the k × k products cost k·I multiply-adds per token whatever the blocks. What blocks
    change is the kernel's tiling, measured on one H200 (bf16, 8192 tokens, microseconds for
    1 / 2 / 4 / 8 blocks): 4864 = 76·64: 96 / 127 / 178; 11008 = 172·64: 226 / 264 / 370;
    14336 = 28·512: 280 / 191 / 189 / 259; 18944 = 148·128: 505 / 432 / 513 / 725. Blocks
    whose power-of-two part stays >= 64 cost nothing (often less); at 32 and 16 the transform
    is 1.2-1.9x slower at TP 1 (at TP b each rank transforms only I / b channels, so a TP-b
    deployment still gains). Hence the default: Llama-3-8B (32 heads, 14336) gets 8 blocks,
    Qwen2.5-7B (28 heads, 18944) 2, while Qwen2.5-0.5B (4864 = 76·64) and LLaMA-2-7B
    (11008 = 172·64) keep one block unless ``r4_blocks`` (``--r4-blocks 2``) asks for TP 2's
    blocks, and SmolLM2 (9 heads) can only be served at TP 1 anyway. Never more blocks than TP
    degrees the model allows: a block spreads an outlier channel over I / b channels instead of
    I (no loss was measurable on SmolLM2 and Qwen2.5-0.5B perplexity, but there is no gain).
    """
    best, b = 1, 2
    while b <= MAX_DEFAULT_R4_BLOCKS:
        if num_attention_heads % b or intermediate_size % b:
            break
        block = intermediate_size // b
        if not is_supported(block) or hadamard_factor(block).pow2 < MIN_R4_BLOCK_POW2:
            break
        best, b = b, 2 * b
    return best


def resolve_r4_blocks(intermediate_size: int, num_attention_heads: int, requested: int | None) -> int:
    """``requested`` checked against the intermediate size (a clear error naming the option and
    the counts that work), or :func:`default_r4_blocks` when None."""
    if requested is None:
        return default_r4_blocks(intermediate_size, num_attention_heads)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"r4_blocks must be a positive integer, got {requested!r}")
    if intermediate_size % requested or not is_supported(intermediate_size // requested):
        ok = [b for b in range(1, min(intermediate_size, 64) + 1)
              if intermediate_size % b == 0 and is_supported(intermediate_size // b)]
        raise ValueError(
            f"r4_blocks = {requested}: the intermediate size {intermediate_size} does not split into "
            f"{requested} blocks with a Hadamard construction; counts that work (up to 64): "
            f"{', '.join(map(str, ok))}"
        )
    return requested


@dataclass(frozen=True)
class AppliedRotations:
    """What was fused, for the checkpoint's rotation metadata."""

    r1: dict | None
    r2: dict | None
    r4: dict | None
    original_hidden_size: int
    original_intermediate_size: int


def rotate_model(model: nn.Module, options: RotationOptions, *, progress: bool = False,
                 before_r4: Callable[[nn.Module, int | None], None] | None = None) -> AppliedRotations:
    """Fuse norms, expand dimensions if asked, and fuse R1, R2 and the offline half of R4.

    Works on the model in place (any float dtype; the products run in float64).
    ``before_r4(model, r4_block)``: called after R1 and R2, before R4 is fused into down_proj,
    with the order of one diagonal block of the online R4 (None without R4): where SmoothRot
    (``offline/smoothrot.py``) folds its scales into up_proj and down_proj.
    """
    config = model.config
    hidden, inter, hd = config.hidden_size, config.intermediate_size, head_dim_of(config)
    fuse_rmsnorms_into_linears(model)
    if options.expand_hidden_to:
        expand_hidden_size(model, options.expand_hidden_to)
    if options.expand_intermediate_to:
        expand_intermediate_size(model, options.expand_intermediate_to)
    d, inter_new = config.hidden_size, config.intermediate_size
    r4_blocks = resolve_r4_blocks(inter_new, config.num_attention_heads, options.r4_blocks) if options.r4 else 1

    def spec(kind: str, size: int, seed: int) -> dict:
        return rotation_spec(kind, size, seed=seed, group_size=options.group_size)

    r1 = r2 = r4 = None
    with tqdm(total=3, desc="rotate", unit="step", disable=not progress) as bar:
        if options.r1:
            r1 = spec(options.r1_kind, d, options.seed)
            rotate_residual(model, _matrix(r1))
        bar.update()
        if options.r2:
            r2 = spec(options.r2_kind, hd, options.seed + 1)
            rotate_heads(model, _matrix(r2))
        bar.update()
        if before_r4 is not None:
            before_r4(model, inter_new // r4_blocks if options.r4 else None)
        if options.r4:
            r4 = rotation_spec(options.r4_kind, inter_new, seed=options.seed + 2, blocks=r4_blocks)
            rotate_down_proj_input(model, _matrix(r4))
        bar.update()
    return AppliedRotations(r1, r2, r4, hidden, inter)


def rotation_spec(kind: str, size: int, *, seed: int = 0, group_size: int | None = None, blocks: int = 1) -> dict:
    """The checkpoint's description of one rotation: only the keys that determine the matrix.

    ``blocks`` (R4 only): equal diagonal blocks, recorded when more than one (the format's
    default is 1); ``factor_k`` then describes one block.
    """
    spec = {"kind": kind, "size": size}
    if kind in ("random_hadamard", "random_orthogonal"):
        spec["seed"] = seed
    if kind == "grouped_walsh":
        spec["group_size"] = group_size or min(size & -size, DEFAULT_MAX_WALSH_GROUP)
    if kind == "hadamard":
        spec["factor_k"] = hadamard_factor(size // blocks).k
    if blocks != 1:
        if kind != "hadamard":
            raise ValueError(f"a block-diagonal rotation must be of kind 'hadamard', got {kind!r}")
        spec["blocks"] = blocks
    return spec


def _matrix(spec: dict) -> torch.Tensor:
    """The rotation's matrix; for a block-diagonal spec (R4 ``blocks``), one diagonal block."""
    size = spec["size"] // spec.get("blocks", 1)
    return rotation_matrix(spec["kind"], size, seed=spec.get("seed", 0), group_size=spec.get("group_size"))
