"""SmoothRot (offline/smoothrot.py): the smoothing is exact in full precision, the search finds
and removes an injected down_proj outlier channel, the chosen alphas reach the checkpoint config,
and bad options are refused early."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from hq_vllm.format import ActQuantSpec, HadaquantConfig, KVCacheSpec, RotationSpec, WeightQuantSpec
from hq_vllm.kernels.fwht import block_hadamard_transform
from hq_vllm.offline.checkpoint import read_checkpoint_config
from hq_vllm.offline.pipeline import QuantizeOptions, prepare_model, quantize_to_checkpoint
from hq_vllm.offline.quantize import fake_quantize_per_token, fake_quantize_weight
from hq_vllm.offline.rotation import (
    RotationOptions,
    fuse_rmsnorms_into_linears,
    rotate_down_proj_input,
    rotate_model,
    rotation_spec,
)
from hq_vllm.offline.simulate import attach_simulation
from hq_vllm.offline.smoothrot import (
    ALPHA_GRID,
    MAX_SCALE_RATIO,
    down_proj_loss,
    fold_smoothing_scales,
    smooth_model,
    smoothing_scales,
)
from hq_vllm.kernels.hadamard import rotation_matrix
from tests.tiny_models import tiny_model

VOCAB = 49152  # SmolLM2's tokenizer: the pipeline calibrates on real text
INTER = 96  # 3·32: a Hadamard order that needs the Paley factor, not a power of two
ACT4 = ActQuantSpec(bits=4, clip_ratio=0.9, symmetric=True)
W4 = WeightQuantSpec(bits=4, group_size=32, symmetric=True, mse_clip=True)


def random_ids(vocab: int, n: int = 4, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def online_r4_only(size: int | None, block: int | None = None) -> HadaquantConfig:
    """Nothing quantized, only the online R4: the simulated model is then exact."""
    r4 = None if size is None else rotation_spec("hadamard", size, blocks=size // (block or size))
    return HadaquantConfig(weight=WeightQuantSpec(bits=16), activation=ActQuantSpec(bits=16),
                           kv_cache=KVCacheSpec(bits=16), rotation=RotationSpec(r4=r4))


def full_precision(config: HadaquantConfig) -> HadaquantConfig:
    """``config``'s online rotations (R3, R4) with nothing quantized."""
    return dataclasses.replace(online_r4_only(None), rotation=config.rotation)


def logits(model, ids, config: HadaquantConfig) -> torch.Tensor:
    sim = attach_simulation(model, config)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        sim.detach()


def inject_outlier(model, channel: int = 5, factor: float = 40.0) -> None:
    """Make one down_proj input channel loud in every layer (up_proj row ``channel`` × factor)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[channel] *= factor


# ---------------------------------------------------------------------------------------------
# (a) exact in full precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, r4_blocks", [(None, 1), (0.5, 1), (1.0, 2)])
def test_rotated_and_smoothed_model_keeps_its_logits(alpha, r4_blocks):
    model = tiny_model("llama", hidden=64, intermediate=INTER, num_hidden_layers=3).double()
    inject_outlier(model)  # so the search really smooths (else it may keep s = 1 everywhere)
    ids = random_ids(model.config.vocab_size, n=2, t=24, seed=1)
    ref = logits(model, ids, online_r4_only(None))
    before_up = [layer.mlp.up_proj.weight.clone() for layer in model.model.layers]
    results = []

    def smooth(m, r4_block):
        assert r4_block == INTER // r4_blocks
        results.append(smooth_model(m, random_ids(m.config.vocab_size), ACT4, W4, r4_block=r4_block, alpha=alpha,
                                    compute_dtype=torch.float32, progress=False))

    # R1 off: transformers' RMSNorm takes its variance in float32, which alone puts R1's
    # float64 error at 1e-7 (the pipeline test below covers R1, in float32).
    rotate_model(model, RotationOptions(r1=False, r4_blocks=r4_blocks), before_r4=smooth)
    (result,) = results
    assert all(a is not None for a in result.alphas), result.alphas  # scales were folded everywhere
    if alpha is not None:
        assert result.alphas == [alpha] * 3
    for layer, w in zip(model.model.layers, before_up):
        assert not torch.allclose(layer.mlp.up_proj.weight, w)
    got = logits(model, ids, online_r4_only(INTER, INTER // r4_blocks))
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-10


def test_fold_is_exact_for_an_mlp_with_biases():
    """up_proj's bias carries the scale too (Qwen-like MLPs with biases, float64)."""
    model = tiny_model("llama", hidden=64, intermediate=INTER, mlp_bias=True).double()
    mlp = model.model.layers[0].mlp
    x = torch.randn(10, 64, dtype=torch.float64)
    ref = mlp(x)
    s = torch.rand(INTER, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 10 + 0.05
    fold_smoothing_scales(mlp, s)
    assert float((mlp(x) - ref).detach().abs().max() / ref.detach().abs().max()) < 1e-12


def test_scales_follow_smoothquant():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(INTER, generator=gen) + 0.1
    a[7] = 30.0
    w = torch.randn(16, INTER, generator=gen)
    w[:, 11] = 0.0  # a dead weight column keeps s = 1
    wmax = w.abs().amax(0)
    live = torch.ones(INTER, dtype=torch.bool)
    live[11] = False
    for alpha in (0.0, 0.5, 1.0):
        s = smoothing_scales(a, w, alpha)
        assert s[11] == 1.0
        raw = a[live] ** alpha / wmax[live] ** (1 - alpha)
        # the rule up to one common factor (the geometric-mean normalization)
        ratio = s[live] / raw
        assert float(ratio.max() / ratio.min() - 1) < 1e-5
        assert abs(float(s[live].log().mean())) < 1e-5
    # α = 1: every channel's activation maximum becomes the same; α = 0: every weight column's
    s1 = smoothing_scales(a, w, 1.0)
    flat = (a / s1)[live]
    assert float(flat.max() / flat.min() - 1) < 1e-5
    s0 = smoothing_scales(a, w, 0.0)
    flat = (wmax * s0)[live]
    assert float(flat.max() / flat.min() - 1) < 1e-5
    # clamped to the sane range
    a[3] = 1e12
    assert float(smoothing_scales(a, w, 1.0).max()) <= MAX_SCALE_RATIO * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# (b) the search finds the outlier and lowers the quantized down_proj error
# ---------------------------------------------------------------------------------------------


def quantized_down_errors(model, ids, r4_block: int) -> list[float]:
    """Per layer, down_proj's output error as served (the online R4 + 4-bit per-token input, RTN
    weights of the *fused* W·H from rotate_down_proj_input) vs its full-precision output, on
    fresh tokens: computed without offline/smoothrot.py's objective."""
    xs = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: xs.setdefault(i, a[0]))
               for i, layer in enumerate(model.model.layers)]
    sim = attach_simulation(model, online_r4_only(INTER, r4_block))  # hooks run after ours: x before R4
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        sim.detach()
        for h in handles:
            h.remove()
    errors = []
    for i, layer in enumerate(model.model.layers):
        w = layer.mlp.down_proj.weight.float()
        xt = block_hadamard_transform(xs[i].float(), r4_block)
        y = xt @ w.T
        yq = fake_quantize_per_token(xt, 4, 0.9) @ fake_quantize_weight(w, W4).T
        errors.append(float(((yq - y).square().sum(-1) / y.square().sum(-1)).mean()))
    return errors


def test_objective_is_the_served_down_proj_error():
    """down_proj_loss against a plain computation: x/s rotated by the reference FWHT, the
    weight W·diag(s) fused with R4's matrix as rotate_down_proj_input does, both quantized."""
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 20, INTER, generator=gen) * torch.rand(INTER, generator=gen) * 4 for _ in range(2)]
    w = torch.randn(48, INTER, generator=gen) * 0.05
    s = torch.rand(INTER, generator=gen) + 0.3
    h = rotation_matrix("hadamard", INTER // 2).to(torch.float32)
    wf = (w * s).reshape(48, 2, INTER // 2) @ h  # two R4 blocks
    wq = fake_quantize_weight(wf.reshape(48, INTER), W4)
    per_token = []
    for x in xs:
        x = x.reshape(-1, INTER)
        y = x @ w.T
        xq = fake_quantize_per_token(block_hadamard_transform(x / s, INTER // 2), 4, 0.9)
        per_token.append((xq @ wq.T - y).square().sum(-1) / y.square().sum(-1))
    want = float(torch.cat(per_token).mean())
    got = down_proj_loss(xs, w, None, s, ACT4, W4, INTER // 2)
    assert abs(got - want) < 1e-3 * want
    # and without smoothing or R4: plain quantized GEMM
    x = torch.cat([x.reshape(-1, INTER) for x in xs])
    y = x @ w.T
    e = fake_quantize_per_token(x, 4, 0.9) @ fake_quantize_weight(w, W4).T - y
    want = float((e.square().sum(-1) / y.square().sum(-1)).mean())
    assert abs(down_proj_loss(xs, w, None, None, ACT4, W4, None) - want) < 1e-5 * want
    # token_norms replaces the denominators (the pipeline passes the decoder layer's output norms)
    norms = [(x @ w.T).square().sum(-1) * 4 for x in xs]
    assert abs(down_proj_loss(xs, w, None, None, ACT4, W4, None, token_norms=norms) - want / 4) < 1e-5 * want


def test_search_smooths_an_outlier_channel_and_lowers_the_quantized_error():
    base = tiny_model("llama", hidden=64, intermediate=INTER, num_hidden_layers=2)
    inject_outlier(base, channel=5, factor=300.0)
    fuse_rmsnorms_into_linears(base)
    smoothed, scanned = copy.deepcopy(base), copy.deepcopy(base)
    calib = random_ids(base.config.vocab_size, n=8, t=32)
    result = smooth_model(smoothed, calib, ACT4, W4, r4_block=INTER, early_stop=False,
                          compute_dtype=torch.float32, progress=False)
    assert all(a is not None and a > 0 for a in result.alphas), result.alphas
    for losses, a in zip(result.losses, result.alphas):
        assert set(losses) == {None, *ALPHA_GRID}
        assert losses[a] == min(losses.values()) < 0.7 * losses[None]
    # the early-stopped scan (the default) finds the same α with fewer candidates
    quick = smooth_model(scanned, calib, ACT4, W4, r4_block=INTER, compute_dtype=torch.float32, progress=False)
    assert quick.alphas == result.alphas
    assert all(len(q) < len(f) for q, f in zip(quick.losses, result.losses))
    assert all(torch.equal(p, q) for p, q in zip(smoothed.parameters(), scanned.parameters()))
    h = rotation_matrix("hadamard", INTER)
    for m in (base, smoothed):
        rotate_down_proj_input(m, h)
    fresh = random_ids(base.config.vocab_size, n=4, t=32, seed=7)
    plain, smooth = quantized_down_errors(base, fresh, INTER), quantized_down_errors(smoothed, fresh, INTER)
    assert all(s < 0.7 * p for s, p in zip(smooth, plain)), (plain, smooth)


def test_no_smoothing_is_kept_on_a_tie():
    """Weight columns of equal maxima give α = 0 the scales s = 1 exactly, hence the same loss
    as no smoothing: the tie must keep the model untouched (alpha None)."""
    model = tiny_model("llama", hidden=64, intermediate=INTER, num_hidden_layers=2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.copy_(torch.where(torch.rand(w.shape, generator=gen) < 0.5, -0.05, 0.05))
    w = [p.clone() for p in model.parameters()]
    result = smooth_model(model, random_ids(model.config.vocab_size), ACT4, W4, r4_block=INTER, grid=(0.0,),
                          compute_dtype=torch.float32, progress=False)
    assert all(ls[0.0] == ls[None] for ls in result.losses), result.losses
    assert result.alphas == [None, None]
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))


def test_nothing_quantized_skips():
    model = tiny_model("llama", hidden=64, intermediate=INTER, num_hidden_layers=1)
    w = [p.clone() for p in model.parameters()]
    a16 = ActQuantSpec(bits=16, clip_ratio=1.0)
    result = smooth_model(model, random_ids(model.config.vocab_size), a16, WeightQuantSpec(bits=16), r4_block=INTER,
                          progress=False)
    assert result.skipped and result.alphas == []
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))


# ---------------------------------------------------------------------------------------------
# (c) the pipeline: placement, fixed alpha, the alphas in the checkpoint config
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    path = tmp_path_factory.mktemp("tiny-smoothrot") / "llama"
    model = tiny_model("llama", tied=True, hidden=64, intermediate=128)
    inject_outlier(model)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / name, path / name)
    return path


def options(**kw) -> QuantizeOptions:
    return QuantizeOptions(recipe="w4a4kv4", group_size=32, smoothrot_sequences=2, smoothrot_seq_len=64, **kw)


def test_pipeline_smooths_before_r4_and_keeps_the_model(tiny_dir):
    """The prepared (full-precision) model with SmoothRot computes what the one without does:
    the scales were folded where they are exact (after norm fusion and R1/R2, before R4)."""
    ids = random_ids(VOCAB, n=2, t=24, seed=2)
    plain = prepare_model(tiny_dir, options(), progress=False)
    smooth = prepare_model(tiny_dir, options(smoothrot=True), progress=False)
    assert all(a is not None for a in smooth.smoothrot.alphas), smooth.smoothrot.alphas
    assert not torch.allclose(plain.model.model.layers[0].mlp.down_proj.weight,
                              smooth.model.model.layers[0].mlp.down_proj.weight)
    assert smooth.config.rotation == plain.config.rotation
    fp = full_precision(plain.config)
    a, b = logits(plain.model, ids, fp), logits(smooth.model, ids, fp)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    assert "smoothrot" not in plain.config.calibration


def test_fixed_alpha_and_recorded_alphas_round_trip(tiny_dir, tmp_path):
    prepared = prepare_model(tiny_dir, options(smoothrot=True, smoothrot_alpha=0.3), progress=False)
    assert prepared.smoothrot.alphas == [0.3, 0.3]
    record = prepared.config.calibration["smoothrot"]
    assert record["alpha"] == 0.3 and record["alphas"] == [0.3, 0.3]
    assert (record["n_samples"], record["seq_len"]) == (2, 64)
    assert HadaquantConfig.from_dict(prepared.config.to_dict()) == prepared.config

    summary = quantize_to_checkpoint(tiny_dir, tmp_path / "ckpt", options(smoothrot=True), progress=False)
    _, config = read_checkpoint_config(tmp_path / "ckpt")
    searched = config.calibration["smoothrot"]
    assert searched["alpha"] is None and searched["alphas"] == summary.smoothrot.alphas
    assert all(a is None or a in ALPHA_GRID for a in searched["alphas"])
    assert "SmoothRot (searched per layer" in summary.render()


def test_w16a16_records_the_skip(tiny_dir):
    prepared = prepare_model(tiny_dir, QuantizeOptions(recipe="w16a16", smoothrot=True, smoothrot_sequences=2,
                                                       smoothrot_seq_len=64), progress=False)
    assert "skipped" in prepared.config.calibration["smoothrot"]


# ---------------------------------------------------------------------------------------------
# (d) options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    ({"smoothrot_alpha": 0.5}, "smoothrot is off"),
    ({"smoothrot": True, "smoothrot_alpha": 1.5}, "smoothrot_alpha"),
    ({"smoothrot": True, "smoothrot_alpha": float("nan")}, "smoothrot_alpha"),
    ({"smoothrot": True, "smoothrot_alpha": True}, "smoothrot_alpha"),
    ({"smoothrot": 1}, "smoothrot must be"),
    ({"smoothrot": True, "smoothrot_sequences": 0}, "smoothrot_sequences"),
    ({"smoothrot": True, "smoothrot_seq_len": 1}, "smoothrot_seq_len"),
])
def test_bad_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**kw)


def test_bad_scales_and_alphas_are_refused():
    model = tiny_model("llama", hidden=64, intermediate=INTER, num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(torch.ones(INTER), mlp.down_proj.weight, 1.2)
    with pytest.raises(ValueError, match="96 inputs"):
        fold_smoothing_scales(mlp, torch.ones(INTER + 1))
    with pytest.raises(ValueError, match="positive"):
        fold_smoothing_scales(mlp, torch.zeros(INTER))
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(model, random_ids(model.config.vocab_size), ACT4, W4, r4_block=INTER, alpha=-0.1, progress=False)
    with pytest.raises(ValueError, match="normalize"):
        smooth_model(model, random_ids(model.config.vocab_size), ACT4, W4, r4_block=INTER, normalize="l2",
                     progress=False)


def test_cli_flags_reach_the_options():
    from hq_vllm.offline.cli import _options, build_parser

    def parse(*argv):
        return _options(build_parser().parse_args(list(argv)))

    o = parse("quantize", "smollm2", "--method", "rtn", "--smoothrot")
    assert (o.smoothrot, o.smoothrot_alpha, o.weight_method) == (True, None, "rtn")
    o = parse("eval", "smollm2", "--recipe", "w4a4kv4", "--method", "rtn", "--smoothrot-alpha", "0.4",
              "--smoothrot-sequences", "8", "--smoothrot-seq-len", "128")
    assert (o.smoothrot, o.smoothrot_alpha, o.smoothrot_sequences, o.smoothrot_seq_len) == (True, 0.4, 8, 128)
    assert not parse("quantize", "smollm2", "--method", "rtn").smoothrot
    assert not parse("quantize", "smollm2", "--no-smoothrot").smoothrot
