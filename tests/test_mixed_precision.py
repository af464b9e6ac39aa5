"""Spike-aware mixed precision (offline/mixed_precision.py): the measurement sees each quantizer's
input as it will be quantized, an injected spike is found and kept, the overrides reach the config,
the checkpoint and the simulator, and bad options fail early."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hq_vllm.format import ActQuantSpec, HadaquantConfig, LayerOverride
from hq_vllm.kernels.fwht import block_hadamard_transform
from hq_vllm.offline.mixed_precision import (
    PROJECTIONS,
    ProjectionStats,
    choose_projections,
    measure_projection_stats,
    plan_mixed_precision,
    scoring_weight_spec,
    with_mixed_precision,
)
from hq_vllm.offline.pipeline import (
    QuantizeOptions,
    load_checkpoint_simulated,
    prepare_model,
    quantize_to_checkpoint,
    simulated_model,
)
from hq_vllm.offline.quantize import fake_quantize_per_token, fake_quantize_weight
from hq_vllm.offline.simulate import attach_simulation
from tests.tiny_models import tiny_model

VOCAB = 49152  # SmolLM2's tokenizer: calibration text is real text
SPIKE_LAYER, SPIKE_CHANNEL, SPIKE_SCALE = 1, 5, 100.0
N_LAYERS = 3


def _save(model, path: Path, smollm2_dir) -> Path:
    model.resize_token_embeddings(VOCAB, mean_resizing=False)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / name, path / name)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, smollm2_dir):
    """A tiny random Llama, plain and with one spike channel in layer SPIKE_LAYER's down_proj
    input: one row of that layer's up_proj scaled up and the matching column of down_proj scaled
    down by the same factor, so the function is the same and only quantization suffers (the
    shape of real "massive activations": huge down_proj inputs meeting small weights)."""
    root = tmp_path_factory.mktemp("tiny-mp")
    out = {}
    for name in ("plain", "spike"):
        model = tiny_model("llama", tied=True, hidden=64, intermediate=128, num_hidden_layers=N_LAYERS)
        if name == "spike":
            with torch.no_grad():
                model.model.layers[SPIKE_LAYER].mlp.up_proj.weight[SPIKE_CHANNEL] *= SPIKE_SCALE
                model.model.layers[SPIKE_LAYER].mlp.down_proj.weight[:, SPIKE_CHANNEL] /= SPIKE_SCALE
        out[name] = _save(model, root / name, smollm2_dir)
    return out


def ids(n: int = 2, t: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def options(**kw) -> QuantizeOptions:
    kw.setdefault("recipe", "w3a3kv3")
    return QuantizeOptions(group_size=32, mp_sequences=4, mp_seq_len=48, **kw)


def tree_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def test_statistics_are_those_of_the_inputs_as_quantized(dirs):
    """Recomputed here from raw hooks: qkv/o_proj/gate_up inputs as they enter the linear,
    down_proj's after the online R4 (rotated model), errors at the recipe's bits and clip."""
    prepared = prepare_model(dirs["plain"], options(recipe="w4a4kv4"), progress=False)
    model, config = prepared.model, prepared.config
    assert config.rotation.r4 is not None
    x = ids(3, 24)
    stats = measure_projection_stats(model, config, x, micro_batch=2, progress=False)
    assert [(s.layer, s.projection) for s in stats] == [(i, p) for i in range(N_LAYERS) for p in PROJECTIONS]
    assert not model.model.layers[0].mlp.down_proj._forward_pre_hooks  # hooks removed

    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for proj, members in PROJECTIONS.items():
            handles.append(layer.get_submodule(members[0]).register_forward_pre_hook(
                lambda m, a, key=(i, proj): seen.setdefault(key, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))))
    # The model is only itself with the online R4 (its transpose is fused into down_proj); these
    # hooks run before the simulation's, so they see down_proj's input before R4.
    sim = attach_simulation(model, dataclasses.replace(
        config, activation=dataclasses.replace(config.activation, bits=16),
        kv_cache=dataclasses.replace(config.kv_cache, bits=16)))
    with torch.no_grad():
        model.model(input_ids=x, use_cache=False)
    sim.detach()
    for h in handles:
        h.remove()
    act = config.activation
    for s in stats:
        raw = torch.cat(seen[(s.layer, s.projection)])
        inp = block_hadamard_transform(raw, config.rotation.r4_block_size) if s.projection == "down_proj" else raw
        ratio = inp.abs().amax(-1) / inp.square().mean(-1).sqrt()
        err = (fake_quantize_per_token(inp, act.bits, act.clip_ratio) - inp).square().sum(-1) / inp.square().sum(-1)
        assert s.peak_to_rms == pytest.approx(float(ratio.max()), rel=1e-5), (s, float(ratio.max()))
        assert s.mean_peak_to_rms == pytest.approx(float(ratio.mean()), rel=1e-5)
        assert s.act_error == pytest.approx(float(err.mean()), rel=1e-4)
        assert s.act_bits == 4
        if s.projection == "down_proj":  # the rotation really is applied before measuring
            raw_ratio = float((raw.abs().amax(-1) / raw.square().mean(-1).sqrt()).max())
            assert abs(raw_ratio - s.peak_to_rms) > 1e-3 * raw_ratio

    # layer_error through the simulator instead of the staged layer: only the group quantized
    # (its weights on the scoring grid, its input at the recipe's bits), layer i's output
    # against the full-precision model's.
    fp_config = dataclasses.replace(config, activation=dataclasses.replace(act, bits=16),
                                    kv_cache=dataclasses.replace(config.kv_cache, bits=16))

    def layer_outputs(m, cfg, i):
        got = []
        handle = m.model.layers[i].register_forward_hook(
            lambda mod, a, o: got.append(o[0] if isinstance(o, tuple) else o))
        sim = attach_simulation(m, cfg)
        with torch.no_grad():
            m.model(input_ids=x, use_cache=False)
        sim.detach()
        handle.remove()
        return got[0]

    by_key = {(s.layer, s.projection): s for s in stats}
    for i, proj in ((0, "qkv"), (1, "o_proj"), (2, "gate_up"), (1, "down_proj")):
        quantized = copy.deepcopy(model)
        names = [f"model.layers.{i}.{m}" for m in PROJECTIONS[proj]]
        with torch.no_grad():
            for name in names:
                w = quantized.get_submodule(name).weight
                w.copy_(fake_quantize_weight(w.detach().float(), scoring_weight_spec(config, name)))
        cfg = dataclasses.replace(fp_config, layers={n: LayerOverride(act_bits=act.bits) for n in names})
        y, yq = layer_outputs(model, fp_config, i), layer_outputs(quantized, cfg, i)
        want = float(((yq - y).square().sum(-1) / y.square().sum(-1)).mean())
        assert by_key[(i, proj)].layer_error == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("score", [None, "act_error", "peak_to_rms", "mean_peak_to_rms"])
def test_injected_spike_ranks_first_and_is_kept(dirs, score):
    """Without rotation (R4 would spread a one-channel spike over all channels, which is what it
    is for), the spiky down_proj input is the worst of all twelve groups by every score, and the
    only group a budget of 1 keeps; in the plain model (the same function) it is not."""
    opts = options(rotate=False, recipe="w4a4kv4", mp_budget=1)
    x = ids(4, 48, seed=0)
    picked, logits = {}, {}
    for name in ("plain", "spike"):
        prepared = prepare_model(dirs[name], opts, progress=False)
        with torch.no_grad():
            logits[name] = prepared.model(input_ids=x).logits
        stats = measure_projection_stats(prepared.model, prepared.config, x, progress=False)
        kept, used = choose_projections(stats, prepared.config, 1, 8, score=score)
        picked[name] = (kept[0].layer, kept[0].projection)
        if name == "spike":
            ranked = sorted(stats, key=lambda s: -s.score(used))
            assert (ranked[0].layer, ranked[0].projection) == (SPIKE_LAYER, "down_proj")
            if used == "peak_to_rms":  # saturates at sqrt(K): some token is one channel
                assert ranked[0].score(used) > 0.95 * 128**0.5 > ranked[1].score(used)
            else:  # means over tokens: a clear first
                assert ranked[0].score(used) > 1.25 * ranked[1].score(used)
    assert picked["spike"] == (SPIKE_LAYER, "down_proj") != picked["plain"]
    assert float((logits["spike"] - logits["plain"]).abs().max() / logits["plain"].abs().max()) < 1e-5


def test_pipeline_keeps_the_spike_at_8_bits(dirs):
    opts = options(recipe="w4a4kv4", rotate=False, mp_budget=1)
    prepared = prepare_model(dirs["spike"], opts, progress=False)
    config, result = plan_mixed_precision(prepared.model, prepared.config, prepared.tokenizer, opts, progress=False)
    name = f"model.layers.{SPIKE_LAYER}.mlp.down_proj"
    assert [s.name for s in result.kept] == [f"model.layers.{SPIKE_LAYER}.down_proj"] and result.score == "layer_error"
    assert config.layers == {name: LayerOverride(weight_bits=8, act_bits=8)}
    assert config.effective_weight_spec(name).bits == 8 and config.effective_act_spec(name).bits == 8
    assert config.effective_act_spec(name).clip_ratio == prepared.config.activation.clip_ratio  # inherited
    assert config.calibration["mixed_precision"] == {
        "budget": 1, "bits": 8, "score": "layer_error", "dataset": "boolq-calibration", "n_samples": 4,
        "seq_len": 48, "seed": 0, "kept": [f"model.layers.{SPIKE_LAYER}.down_proj"]}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _stats(layer: int, proj: str, act_bits: int = 3) -> ProjectionStats:
    return ProjectionStats(layer, proj, 0.1, 1.0, 1.0, 0.1, act_bits)


def test_overrides_merge_cover_siblings_and_round_trip():
    base = HadaquantConfig.from_dict({
        "quant_method": "hadaquant", "format_version": 1,
        "weight": {"bits": 3, "group_size": 32, "symmetric": True, "mse_clip": True},
        "activation": {"bits": 3, "clip_ratio": 0.9, "symmetric": True},
        "layers": {f"model.layers.0.self_attn.{m}": {"weight_bits": None, "act_bits": None, "act_clip_ratio": 0.5}
                   for m in ("q_proj", "k_proj", "v_proj")} | {"model.layers.1.self_attn.attn": {"k_clip_ratio": 0.7}},
    })
    kept = [_stats(0, "qkv"), _stats(1, "gate_up"), _stats(1, "down_proj")]
    config = with_mixed_precision(base, kept, 16)
    for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
        layer = 0 if "self_attn" in group[0] else 1
        specs = [(config.effective_weight_spec(f"model.layers.{layer}.{m}"),
                  config.effective_act_spec(f"model.layers.{layer}.{m}")) for m in group]
        assert all(w.bits == 16 and a.bits == 16 for w, a in specs)
        assert len({(w, a) for w, a in specs}) == 1  # siblings identical
    assert config.effective_act_spec("model.layers.0.self_attn.qkv_proj").clip_ratio == 0.5  # merged, kept
    assert config.layers["model.layers.1.self_attn.attn"] == base.layers["model.layers.1.self_attn.attn"]
    assert config.effective_weight_spec("model.layers.1.self_attn.o_proj").bits == 3  # untouched
    assert config.effective_weight_spec("model.layers.0.mlp.down_proj").bits == 3
    again = HadaquantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == config.to_dict()
    assert again.to_dict()["layers"]["model.layers.0.self_attn.k_proj"] == {
        "weight_bits": 16, "act_bits": 16, "act_clip_ratio": 0.5}


def test_never_lowers_a_width_and_a16_raises_only_weights(dirs):
    base = HadaquantConfig(activation=ActQuantSpec(bits=3, clip_ratio=0.9), layers={
        "model.layers.0.mlp.down_proj": LayerOverride(weight_bits=16)})
    config = with_mixed_precision(base, [_stats(0, "down_proj", act_bits=16)], 8)
    assert config.layers["model.layers.0.mlp.down_proj"] == LayerOverride(weight_bits=16, act_bits=8)

    # w3a16: no activation error, the layer error is the weights' alone (an input spike that
    # meets small weights costs nothing there); only weight bits are raised, act_bits stay 16.
    opts = options(recipe="w3a16", rotate=False, mp_budget=1)
    prepared = prepare_model(dirs["spike"], opts, progress=False)
    config, result = plan_mixed_precision(prepared.model, prepared.config, prepared.tokenizer, opts, progress=False)
    assert result.score == "layer_error" and all(s.act_error == 0 < s.layer_error for s in result.stats)
    (kept,) = result.kept
    assert kept.layer_error == max(s.layer_error for s in result.stats)
    assert config.layers == {name: LayerOverride(weight_bits=8) for name in kept.linears}


# ---------------------------------------------------------------------------------------------
# Checkpoint and simulator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 16])
def test_checkpoint_with_overrides_is_the_in_memory_simulation(dirs, tmp_path, bits):
    opts = options(mp_budget=3, mp_bits=bits)
    summary = quantize_to_checkpoint(dirs["spike"], tmp_path / "ckpt", opts, progress=False)
    kept = summary.mixed_precision.kept
    assert len(kept) == 3
    rendered = summary.render()
    assert f"3 of {4 * N_LAYERS} projection groups kept at {bits} bits" in rendered
    assert all(s.name in rendered for s in kept)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["mixed_precision"]["kept"] == [s.name for s in kept]
    linears = [n for s in kept for n in s.linears]
    assert sorted(qc["layers"]) == sorted(linears)
    assert all(qc["layers"][n] == {"weight_bits": bits, "act_bits": bits, "act_clip_ratio": None} for n in linears)
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for n in linears:
        if bits == 16:
            assert f"{n}.weight" in tensors and f"{n}.qweight" not in tensors
        else:
            k = tensors[f"{n}.scales"].shape[0] * 32  # group size 32
            assert tensors[f"{n}.qweight"].shape[0] == 8 * k // 32
    assert summary.num_quantized == 7 * N_LAYERS - (len(linears) if bits == 16 else 0)

    from_ckpt, _, ckpt_config, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    in_memory, _, mem_config, _ = simulated_model(dirs["spike"], opts, progress=False)
    plain, _, _, _ = simulated_model(dirs["spike"], options(), progress=False)
    assert ckpt_config == mem_config
    with torch.no_grad():
        a, b, c = (m(input_ids=ids()).logits for m in (from_ckpt, in_memory, plain))
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    assert float((b - c).norm() / c.norm()) > 1e-3  # the overrides really change the model


def test_runs_before_gptq_and_the_clip_search(dirs, tmp_path):
    """GPTQ quantizes the kept linears at their raised bits, and the clip search skips a quantizer
    kept at 16 bits (it sees the overrides); the checkpoint reads back as written."""
    opts = options(recipe="w4a4kv4", rotate=False, mp_budget=1, mp_bits=16, weight_method="gptq", calib_sequences=4,
                   calib_seq_len=32, clip_search="gbs", gbs_sequences=2, gbs_seq_len=32, gbs_dtype="float32")
    summary = quantize_to_checkpoint(dirs["spike"], tmp_path / "ckpt", opts, progress=False)
    name = f"model.layers.{SPIKE_LAYER}.mlp.down_proj"
    assert [s.name for s in summary.mixed_precision.kept] == [f"model.layers.{SPIKE_LAYER}.down_proj"]
    clips = summary.clip_search.clips
    assert "down_proj" not in clips[SPIKE_LAYER]
    assert all("down_proj" in clips[i] for i in range(N_LAYERS) if i != SPIKE_LAYER)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["layers"][name] == {"weight_bits": 16, "act_bits": 16, "act_clip_ratio": None}
    assert "mixed_precision" in qc["calibration"] and qc["calibration"]["clip_search"] == "gbs"
    assert f"{name}.weight" in load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    model, _, config, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    assert config.effective_act_spec(name).bits == 16


def test_budget_zero_changes_nothing(dirs, tmp_path):
    quantize_to_checkpoint(dirs["spike"], tmp_path / "a", QuantizeOptions(group_size=32), progress=False)
    summary = quantize_to_checkpoint(dirs["spike"], tmp_path / "b", options(mp_budget=0, mp_bits=16), progress=False)
    assert summary.mixed_precision is None and "mixed prec." not in summary.render()
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert qc["layers"] == {} and "mixed_precision" not in qc["calibration"]


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    ({"mp_budget": -1}, r"budget must be an integer ≥ 0.*-1"),
    ({"mp_budget": 1.5}, r"budget must be an integer ≥ 0.*1\.5"),
    ({"mp_budget": True}, r"budget must be an integer ≥ 0.*True"),
    ({"mp_bits": 4}, r"bits must be one of 8, 16, got 4"),
    ({"mp_bits": 32}, r"bits must be one of 8, 16, got 32"),
    ({"mp_sequences": 0}, r"mp_sequences must be an integer ≥ 1, got 0"),
    ({"mp_seq_len": 1}, r"mp_seq_len must be an integer ≥ 2, got 1"),
])
def test_bad_options_fail_when_made(kw, message):
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**kw)


def test_budget_above_the_candidates_is_a_clear_error(dirs):
    opts = options(rotate=False, mp_budget=4 * N_LAYERS + 1)
    prepared = prepare_model(dirs["plain"], opts, progress=False)
    with pytest.raises(ValueError, match=rf"budget {4 * N_LAYERS + 1} exceeds the {4 * N_LAYERS} projection groups"):
        plan_mixed_precision(prepared.model, prepared.config, prepared.tokenizer, opts, progress=False)
    opts = options(recipe="w8a8kv8", rotate=False, mp_budget=1)  # 8 bits would change nothing
    prepared = prepare_model(dirs["plain"], opts, progress=False)
    with pytest.raises(ValueError, match=r"budget 1 exceeds the 0 projection groups that 8-bit"):
        plan_mixed_precision(prepared.model, prepared.config, prepared.tokenizer, opts, progress=False)


def test_cli_flags_reach_the_options():
    from hq_vllm.offline.cli import _options, build_parser

    for cmd in (["quantize", "smollm2"], ["eval", "smollm2", "--recipe", "w4a4kv4"]):
        args = build_parser().parse_args(cmd + ["--mp-budget", "3", "--mp-bits", "16", "--mp-sequences", "8",
                                                "--mp-seq-len", "128"])
        o = _options(args)
        assert (o.mp_budget, o.mp_bits, o.mp_sequences, o.mp_seq_len) == (3, 16, 8, 128)
    assert _options(build_parser().parse_args(["quantize", "--method", "rtn"])).mp_budget == 0
    assert _options(build_parser().parse_args(["quantize", "--mp-budget", "0"])).mp_budget == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--mp-bits", "4"])
