"""GPTQ (Frantar et al., 2023) on the rotated weights: one Hessian per linear input, one column loop.

GPTQ quantizes a weight ``W [N, K]`` column by column and pushes each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian ``H = 2/n Σ xᵀx`` of the layer's
inputs, so that ``X Ŵᵀ`` stays close to ``X Wᵀ`` on calibration data rather than ``Ŵ`` close to
``W``. It is what lets the weights survive the norm fusion that rotation needs (DESIGN.md, item 10):
the one residual channel that carries most of each token's energy dominates ``H``, so GPTQ spends
the other columns' error budget on keeping that channel's products right.

Choices (and why):

* **Static groups.** Every group's scale and zero come up front from the *original* weight with
  the same :func:`~hq_vllm.offline.quantize.quantize_weight` as RTN (MSE clip included), so a
  GPTQ checkpoint has exactly RTN's grid and format; only the codes differ. The grid does not
  depend on the column order, so ``act_order`` (columns by descending ``diag(H)``) still yields
  contiguous groups in the original order, which is what the kernels read.
* **Damping** ``damp · mean(diag H)`` on the diagonal (GPTQ's ``percdamp``, default 0.01). The
  factorizations run in float64 (cheap at these sizes), the column loop in float32.
* **Dead columns** (an input channel that is zero on every calibration token: ``H_jj = 0``): GPTQ
  zeroes such weights; here ``H_jj`` is set to 1, which decouples the column from all others (its
  row and column of ``H⁻¹`` stay zero off the diagonal), so it gets plain RTN and receives no
  error. A channel the calibration text never excited may still carry signal at inference.
* **Order inside a decoder layer**: sub-sequential, as GPTQ-for-LLaMA's ``--true-sequential``
  and QuaRot: q/k/v (one shared ``H``) → o_proj → gate/up (one shared ``H``) → down_proj. Each
  group's Hessian is taken on inputs computed with the groups before it already quantized, so
  o_proj corrects for quantized q/k/v, down_proj for quantized gate/up, and every layer sees the
  previous layers' quantized outputs. Linears sharing an input (and a spec) are quantized as one
  row-stacked weight: GPTQ treats rows independently given ``H``, so this is exact and halves
  the number of column steps (by 3 for q/k/v, 2 for gate/up).
* **Activations are not fake-quantized** during calibration (QuaRot does the same): the
  Hessians are of full-precision inputs. The online R4 Hadamard before down_proj *is* applied
  (its transpose is fused into down_proj's weight, so that is the input the weight multiplies).
  R3 needs nothing: it leaves QKᵀ unchanged.

A decoder layer is run in stages (norm → attention → o_proj → residual → norm → gate/up →
down_proj → residual) instead of whole-layer passes per group, so each stage's input is computed
once: the calibration costs about one forward pass plus the Hessian products. The staging assumes
the pre-norm attention + gated-MLP layer of every supported architecture, and is checked against
the layer's own forward on the first micro-batch.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from hq_vllm.format import HadaquantConfig, WeightQuantSpec
from hq_vllm.kernels.fwht import block_hadamard_transform
from hq_vllm.offline.quantize import (
    QuantizedWeight,
    dequantize_weight,
    dequantize_with_qparams,
    quantize_weight,
    quantize_with_qparams,
)

__all__ = ["gptq_quantize", "gptq_quantize_model"]


# ---------------------------------------------------------------------------------------------
# One weight
# ---------------------------------------------------------------------------------------------


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (float64).

    ``linalg.inv`` rather than ``cholesky_inverse``: LAPACK's ``potri`` is several times slower on CPU.
    """
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    upper, info = torch.linalg.cholesky_ex(torch.linalg.inv(h), upper=True)
    if info or not bool(torch.isfinite(upper).all()):
        raise ValueError(
            f"the calibration Hessian is not positive definite after damping {damp} "
            "(too few calibration tokens for this input size?); raise --damp"
        )
    return upper


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightQuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ-quantize ``w [N, K]`` given the Hessian ``[K, K]`` of its inputs, on ``spec``'s grid.

    Returns codes, scales and zeros exactly as :func:`quantize_weight` does (same scales and
    zeros, in fact: the groups are static), so ``format.pack_linear`` takes them unchanged.
    The loop runs on ``Wᵀ`` so that each input channel's weights are one contiguous row.
    """
    if spec.bits >= 16:
        raise ValueError("spec.bits is 16: the weight stays unquantized, there is nothing to quantize")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's K={k}")
    if not damp >= 0:
        raise ValueError(f"damp must be ≥ 0, got {damp}")
    rtn = quantize_weight(w, spec)  # static groups: RTN's grid of the original weight
    g = k if spec.group_size == -1 else spec.group_size
    zeros = rtn.zeros if rtn.zeros is not None else torch.full_like(rtn.scales, 2 ** (spec.bits - 1))
    scale = rtn.scales.to(torch.float32).t().repeat_interleave(g, dim=0)  # [K, N]: one row per input channel
    zero = zeros.to(torch.float32).t().repeat_interleave(g, dim=0)

    weight = w.detach().to(torch.float32).t().contiguous()  # [K, N]
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        weight, scale, zero, h = weight[perm], scale[perm], zero[perm], h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, damp).to(torch.float32)

    codes = torch.empty_like(weight)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block, hinv_block = weight[i1:i2], hinv[i1:i2, i1:i2]  # views: updated in place
        errors = torch.empty_like(block)
        for i in range(i2 - i1):
            row, s, z = block[i], scale[i1 + i], zero[i1 + i]
            c = quantize_with_qparams(row, s, z, spec.bits)
            codes[i1 + i] = c
            err = (row - dequantize_with_qparams(c, s, z)) / hinv_block[i, i]
            block[i:].addr_(hinv_block[i, i:], err, alpha=-1.0)
            errors[i] = err
        weight[i2:].addmm_(hinv[i1:i2, i2:].t(), errors, alpha=-1.0)  # lazy batch update
    if act_order:
        codes = codes[torch.argsort(perm)]
    return QuantizedWeight(codes.t().contiguous().to(torch.uint8), rtn.scales, rtn.zeros)


# ---------------------------------------------------------------------------------------------
# A whole model, layer by layer
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


def _capture_input(module: nn.Module, run, *, with_kwargs: bool = False):
    """Run ``run()`` until ``module`` is called; return its first input (and its kwargs)."""
    seen = {}

    def hook(mod, args, kwargs=None):
        if len(args) > 1:
            raise NotImplementedError(f"{type(mod).__name__} called with {len(args)} positional inputs")
        kwargs = dict(kwargs or {})
        seen["x"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = kwargs
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise RuntimeError(f"{type(module).__name__} was never called")
    return (seen["x"], seen["kwargs"]) if with_kwargs else seen["x"]


def _hessian(xs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``2/n Σ xᵀx`` over every token of every micro-batch: float32 products, float64 sum.

    Not bfloat16 products even when the inputs are bfloat16: rounding each entry of ``xᵀx`` to
    8 bits breaks positive definiteness (the loud residual channel's row is ~100× the rest, and
    0.4% of it exceeds the damping), while a float32 Gram matrix of rounded inputs stays PSD.
    """
    k = xs[0].shape[-1]
    h = torch.zeros(k, k, dtype=torch.float64, device=device)
    n = 0
    for x in xs:
        x = x.to(device, torch.float32).reshape(-1, k)
        h += x.T @ x
        n += x.shape[0]
    return h.mul_(2.0 / n)


def _down_input(mlp: nn.Module, x: torch.Tensor, r4_size: int | None, r4_block: int | None = None) -> torch.Tensor:
    """What down_proj's weight multiplies: act(gate)·up, then the online R4 when configured
    (block-diagonal, blocks of ``r4_block`` channels; None: one block)."""
    y = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if r4_size is not None:
        if y.shape[-1] != r4_size:
            raise ValueError(f"online R4 expects {r4_size} input channels, got {y.shape[-1]}")
        y = block_hadamard_transform(y, r4_block)
    return y


def _attention_output(attn: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input of o_proj (attention's context), computed without running o_proj."""
    return _capture_input(attn.o_proj, lambda: attn(hidden_states=x, **kwargs))


def _staged_layer_forward(layer: nn.Module, h: torch.Tensor, kwargs: dict, r4_size: int | None,
                          r4_block: int | None = None) -> torch.Tensor:
    """The decoder layer as the stages GPTQ runs it (see the module docstring)."""
    attn, mlp = layer.self_attn, layer.mlp
    h = h + attn.o_proj(_attention_output(attn, layer.input_layernorm(h), kwargs))
    return h + mlp.down_proj(_down_input(mlp, layer.post_attention_layernorm(h), r4_size, r4_block))


def _check_staging(layer: nn.Module, h: torch.Tensor, kwargs: dict, r4_size: int | None,
                   r4_block: int | None = None) -> None:
    """Refuse to calibrate a layer whose forward is not the staged one (a new architecture)."""
    hook = None
    if r4_size is not None:  # the model computes R4 online, outside its own forward
        hook = layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a: (block_hadamard_transform(a[0], r4_block), *a[1:]))
    try:
        ref = layer(h, **kwargs)
    finally:
        if hook is not None:
            hook.remove()
    ref = ref[0] if isinstance(ref, tuple) else ref
    got = _staged_layer_forward(layer, h, kwargs, r4_size, r4_block)
    if float((got - ref).norm()) > 1e-4 * float(ref.norm()):
        raise NotImplementedError(
            f"{type(layer).__name__}: the decoder layer is not the pre-norm attention + gated MLP "
            "that GPTQ's staged calibration assumes"
        )


def gptq_quantize_model(
    model: nn.Module,
    config: HadaquantConfig,
    calib_ids: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    micro_batch: int = 8,
    compute_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> dict[str, QuantizedWeight]:
    """GPTQ every decoder linear of ``model`` (already fused and rotated) on ``calib_ids [S, T]``.

    Layer by layer, sub-sequentially (module docstring). Each quantized linear's weight is
    replaced by its dequantized value as soon as it is quantized, so later Hessians see it; the
    result maps HF module names to their codes/scales/zeros. Linears whose effective spec is 16
    bits are skipped (and keep their weights). Stage inputs are kept on the CPU, one tensor per
    micro-batch of ``micro_batch`` sequences, and moved to the model's device to be computed on.

    ``compute_dtype``: the calibration forward (under autocast; the residual stream stays
    float32). bfloat16 is what vLLM serves and twice as fast as float32 on CPUs with AVX512-BF16
    and on GPUs; the Hessians are float32 Gram matrices of the (rounded) inputs either way, and
    the weights are quantized from the float32 masters.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    if calib_ids.dim() != 2 or int(calib_ids.max()) >= vocab or int(calib_ids.min()) < 0:
        raise ValueError(f"calibration ids must be [S, T] in [0, {vocab}); got shape {tuple(calib_ids.shape)}, "
                         f"range [{int(calib_ids.min())}, {int(calib_ids.max())}]")
    if len(set(getattr(model.config, "layer_types", None) or ())) > 1:
        raise NotImplementedError("GPTQ calibration gives every layer the attention mask of layer 0; this model "
                                  f"mixes attention kinds {sorted(set(model.config.layer_types))}")
    r4_size = config.rotation.r4["size"] if config.rotation.r4 else None
    r4_block = config.rotation.r4_block_size
    layers = model.model.layers
    quantized: dict[str, QuantizedWeight] = {}

    def amp():
        return torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    def each(fn, *streams):
        """``fn`` over micro-batches on the model's device, results back on the CPU."""
        with amp():
            return [fn(*(t.to(device) for t in ts)).cpu() for ts in zip(*streams)]

    def quantize_group(prefix: str, linears: dict[str, nn.Linear], xs: list[torch.Tensor]) -> None:
        specs = {name: config.effective_weight_spec(prefix + name) for name in linears}
        if all(s.bits >= 16 for s in specs.values()):
            return
        h = _hessian(xs, device)
        for spec in dict.fromkeys(s for s in specs.values() if s.bits < 16):
            names = [name for name in linears if specs[name] == spec]
            rows = [linears[name].out_features for name in names]
            w = torch.cat([linears[name].weight.detach().float() for name in names])
            qw = gptq_quantize(w, h, spec, damp=damp, block_size=block_size, act_order=act_order)
            parts = (t.split(rows) if t is not None else [None] * len(rows) for t in (qw.codes, qw.scales, qw.zeros))
            for name, codes, scales, zeros in zip(names, *parts):
                part = QuantizedWeight(codes.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous())
                quantized[prefix + name] = part
                linears[name].weight.copy_(dequantize_weight(part, spec).to(linears[name].weight.dtype))

    with torch.no_grad():
        chunks = calib_ids.split(micro_batch)
        # Inputs of the first decoder layer (embeddings) and the keyword arguments the model passes
        # every layer (rotary cos/sin, mask), captured by stopping the model at layer 0.
        firsts = [_capture_input(layers[0], lambda ids=ids: model(input_ids=ids.to(device), use_cache=False),
                                 with_kwargs=True) for ids in chunks]
        hidden = [x.cpu() for x, _ in firsts]
        kwargs = [kw for _, kw in firsts]
        _check_staging(layers[0], hidden[0].to(device), kwargs[0], r4_size, r4_block)

        for i, layer in enumerate(tqdm(layers, desc="gptq", unit="layer", disable=not progress)):
            prefix, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            x = each(layer.input_layernorm, hidden)
            quantize_group(prefix, {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj,
                                    "self_attn.v_proj": attn.v_proj}, x)
            with amp():
                ctx = [_attention_output(attn, xi.to(device), kw).cpu() for xi, kw in zip(x, kwargs)]
            quantize_group(prefix, {"self_attn.o_proj": attn.o_proj}, ctx)
            hidden = each(lambda h, c: h + attn.o_proj(c), hidden, ctx)
            del ctx
            x = each(layer.post_attention_layernorm, hidden)
            quantize_group(prefix, {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj}, x)
            x = each(lambda m: _down_input(mlp, m, r4_size, r4_block), x)
            quantize_group(prefix, {"mlp.down_proj": mlp.down_proj}, x)
            hidden = each(lambda h, d: h + mlp.down_proj(d), hidden, x)
            del x
    return quantized
