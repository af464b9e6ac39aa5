"""The quantize pipeline end to end on tiny models: checkpoint written, read back, simulated."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from hq_vllm.format import UnsupportedArchitecture
from hq_vllm.offline.cli import main as cli_main
from hq_vllm.offline.pipeline import (
    RECIPES,
    QuantizeOptions,
    fit_group_size,
    load_checkpoint_simulated,
    quantize_to_checkpoint,
    simulated_model,
)
from hq_vllm.offline.rotation import RotationOptions
from tests.tiny_models import tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2_dir):
    """HF directories of tiny random models (with SmolLM2's tokenizer files)."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for arch in ("llama", "qwen2", "qwen3", "mistral"):
        model = tiny_model(arch, tied=arch == "llama", hidden=64, intermediate=128)
        path = root / arch
        model.save_pretrained(path)
        for name in TOKENIZER_FILES:
            shutil.copy(Path(smollm2_dir) / name, path / name)
        dirs[arch] = path
    return dirs


def ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(0))


def tree_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("recipe", ["w3a3kv3", "w4a16"])
def test_checkpoint_reproduces_in_memory_simulation(tiny_dirs, tmp_path, arch, recipe):
    options = QuantizeOptions(recipe=recipe, group_size=32)
    summary = quantize_to_checkpoint(tiny_dirs[arch], tmp_path / "ckpt", options, progress=False)
    assert summary.num_quantized == 2 * 7
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hadaquant"
    assert config["quantization_config"]["weight"]["bits"] == RECIPES[recipe].weight.bits
    for name in TOKENIZER_FILES:
        assert (tmp_path / "ckpt" / name).is_file()

    from_ckpt, _, _, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    in_memory, _, _, _ = simulated_model(tiny_dirs[arch], options, progress=False)
    with torch.no_grad():
        a = from_ckpt(input_ids=ids()).logits
        b = in_memory(input_ids=ids()).logits
    # Same function: packed weights are exact, the rest is bf16 in both.
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_simulated_quantization_really_quantizes(tiny_dirs):
    fp, _, _, _ = simulated_model(tiny_dirs["llama"], QuantizeOptions(recipe="w16a16"), progress=False)
    q3, _, _, _ = simulated_model(tiny_dirs["llama"], QuantizeOptions(recipe="w3a3kv3", group_size=32), progress=False)
    q8, _, _, _ = simulated_model(tiny_dirs["llama"], QuantizeOptions(recipe="w8a8kv8", group_size=32), progress=False)
    with torch.no_grad():
        ref, l3, l8 = (m(input_ids=ids()).logits for m in (fp, q3, q8))
    err3 = float((l3 - ref).norm() / ref.norm())
    err8 = float((l8 - ref).norm() / ref.norm())
    assert err8 < 0.1 < err3 and 4 * err8 < err3


def test_same_seed_gives_identical_files(tiny_dirs, tmp_path):
    opts = QuantizeOptions(recipe="w3a3kv3", group_size=32, seed=7)
    quantize_to_checkpoint(tiny_dirs["qwen2"], tmp_path / "a", opts, progress=False)
    quantize_to_checkpoint(tiny_dirs["qwen2"], tmp_path / "b", opts, progress=False)
    quantize_to_checkpoint(tiny_dirs["qwen2"], tmp_path / "c", QuantizeOptions(recipe="w3a3kv3", group_size=32, seed=8), progress=False)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a")["model.safetensors"] != tree_digest(tmp_path / "c")["model.safetensors"]


def test_refuses_to_overwrite_and_leaves_no_temp_dirs(tiny_dirs, tmp_path):
    out = tmp_path / "ckpt"
    quantize_to_checkpoint(tiny_dirs["llama"], out, QuantizeOptions(recipe="w4a16", group_size=32), progress=False)
    with pytest.raises(FileExistsError):
        quantize_to_checkpoint(tiny_dirs["llama"], out, QuantizeOptions(recipe="w4a16"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_unsupported_architecture_fails_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM"):
        quantize_to_checkpoint(tmp_path, tmp_path / "out", QuantizeOptions(), progress=False)


def test_unknown_recipe_is_a_clear_error(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="w3a3kv3"):
        quantize_to_checkpoint(tiny_dirs["llama"], tmp_path / "o", QuantizeOptions(recipe="w1a1"), progress=False)


def test_fit_group_size():
    assert fit_group_size(128, [576, 1536]) == 64
    assert fit_group_size(128, [896, 4864]) == 128
    assert fit_group_size(-1, [100]) == -1
    with pytest.raises(ValueError, match="per channel"):
        fit_group_size(128, [48, 80])


def test_expanded_checkpoint_round_trip(tiny_dirs, tmp_path):
    options = QuantizeOptions(recipe="w4a16", group_size=32,
                              rotation=RotationOptions(expand_hidden_to=128, expand_intermediate_to=256))
    quantize_to_checkpoint(tiny_dirs["llama"], tmp_path / "ckpt", options, progress=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (128, 256)
    rot = config["quantization_config"]["rotation"]
    assert (rot["original_hidden_size"], rot["original_intermediate_size"]) == (64, 128)
    model, _, _, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    fp, _, _, _ = simulated_model(tiny_dirs["llama"], QuantizeOptions(recipe="w16a16", rotate=False), progress=False)
    with torch.no_grad():
        a, b = model(input_ids=ids()).logits, fp(input_ids=ids()).logits
    assert float((a - b).norm() / b.norm()) < 0.2  # 4-bit weights, same function


def test_cli_quantize_inspect(smollm2_dir, tmp_path, capsys):
    # a tiny Qwen2 whose vocabulary covers the tokenizer's: the default method calibrates on real text
    src = tmp_path / "qwen2"
    model = tiny_model("qwen2", hidden=64, intermediate=128)
    model.resize_token_embeddings(49152, mean_resizing=False)
    model.save_pretrained(src)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(smollm2_dir) / name, src / name)
    out = tmp_path / "ckpt"
    small = [f"--{k}-{v}" for k in ("calib", "gbs", "smoothrot", "mp") for v in ("sequences", "seq-len")]
    small = [a for flag in small for a in (flag, "4" if flag.endswith("sequences") else "64")]
    # the default method: GPTQ + GBS + SmoothRot + mixed precision, each recorded in the config
    assert cli_main(["quantize", str(src), str(out), "--recipe", "w4a4kv4", "--group-size", "32", *small]) == 0
    text = capsys.readouterr().out
    assert "GPTQ" in text and "GBS" in text and "per layer" in text
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["inspect", str(out), "--plot", str(tmp_path / "again.png")]) == 0
    text = capsys.readouterr().out
    assert "4-bit" in text and "r4" in text and "qweight" in text
    assert (tmp_path / "again.png").exists()
    assert cli_main(["inspect", str(out), "--json"]) == 0
    qc = json.loads(capsys.readouterr().out)
    assert qc["recipe"] == "w4a4kv4" and "smoothrot" in qc["calibration"]
    raised = [k for k, v in qc["layers"].items() if v.get("act_bits") == 8]
    assert raised, "the full method keeps the spikiest projection groups at 8 bits"
    assert any(v.get("act_clip_ratio") is not None for v in qc["layers"].values())  # GBS clips
    with pytest.raises(SystemExit, match="neither a model directory"):
        cli_main(["quantize", str(tmp_path / "missing"), str(tmp_path / "x")])


def test_layer_overrides_reach_the_simulator():
    """A per-layer override (16-bit input for one down_proj) removes exactly that quantizer."""
    from hq_vllm.format import ActQuantSpec, HadaquantConfig, KVCacheSpec, LayerOverride, RotationSpec, WeightQuantSpec
    from hq_vllm.offline.simulate import attach_simulation

    model = tiny_model("llama")
    ids_ = ids()

    def config(layers):
        return HadaquantConfig(weight=WeightQuantSpec(bits=16), activation=ActQuantSpec(bits=4, clip_ratio=0.9),
                               kv_cache=KVCacheSpec(bits=16), rotation=RotationSpec(), layers=layers)

    sim = attach_simulation(model, config({}))
    with torch.no_grad():
        all_quantized = model(input_ids=ids_).logits
    n_all = len(sim.handles)
    sim.detach()
    sim = attach_simulation(model, config({"model.layers.1.mlp.down_proj": LayerOverride(act_bits=16)}))
    with torch.no_grad():
        one_kept = model(input_ids=ids_).logits
    assert len(sim.handles) == n_all - 1 == 2 * 7 - 1
    sim.detach()
    assert not torch.allclose(all_quantized, one_kept)


def test_unrotated_tied_checkpoint_keeps_embeddings_tied(tiny_dirs, tmp_path):
    options = QuantizeOptions(recipe="w4a4kv4", rotate=False, group_size=32)
    quantize_to_checkpoint(tiny_dirs["llama"], tmp_path / "ckpt", options, progress=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert all(r is None for k, r in config["quantization_config"]["rotation"].items() if k.startswith("r"))
    from_ckpt, _, _, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    in_memory, _, _, _ = simulated_model(tiny_dirs["llama"], options, progress=False)
    with torch.no_grad():
        a, b = from_ckpt(input_ids=ids()).logits, in_memory(input_ids=ids()).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_supported_tp_sizes():
    from hq_vllm.format import RotationSpec, WeightQuantSpec
    from hq_vllm.offline.pipeline import supported_tp_sizes

    qwen = {"num_attention_heads": 14, "hidden_size": 896, "intermediate_size": 4864}
    w3 = WeightQuantSpec(bits=3, group_size=128)
    assert supported_tp_sizes(qwen, RotationSpec(), w3) == [1]  # o_proj: 896 / 2 = 448 = 3.5 groups
    w3g64 = WeightQuantSpec(bits=3, group_size=64)
    assert supported_tp_sizes(qwen, RotationSpec(), w3g64) == [1, 2]
    r4 = RotationSpec(r4={"kind": "hadamard", "size": 4864, "factor_k": 76})
    assert supported_tp_sizes(qwen, r4, w3g64) == [1]  # a full-size online R4 needs every shard
    r4x2 = RotationSpec(r4={"kind": "hadamard", "size": 4864, "factor_k": 76, "blocks": 2})
    assert supported_tp_sizes(qwen, r4x2, w3g64) == [1, 2]  # shard-local: 2 blocks of 2432 = 76·32
    r4x4 = RotationSpec(r4={"kind": "hadamard", "size": 4864, "factor_k": 76, "blocks": 4})
    assert supported_tp_sizes(qwen, r4x4, w3g64) == [1, 2]  # 14 heads: no TP 4 anyway
    assert supported_tp_sizes(qwen, r4x2, w3) == [1]  # blocks do not lift the group rule
    llama8b = {"num_attention_heads": 32, "hidden_size": 4096, "intermediate_size": 14336}
    r4x8 = RotationSpec(r4={"kind": "hadamard", "size": 14336, "factor_k": 28, "blocks": 8})
    assert supported_tp_sizes(llama8b, r4x8, w3) == [1, 2, 4, 8]
    smollm2 = {"num_attention_heads": 9, "hidden_size": 576, "intermediate_size": 1536}
    assert supported_tp_sizes(smollm2, RotationSpec(), WeightQuantSpec(bits=4, group_size=64)) == [1]
    llama7b = {"num_attention_heads": 32, "hidden_size": 4096, "intermediate_size": 11008}
    assert supported_tp_sizes(llama7b, RotationSpec(), w3) == [1, 2]  # 11008 / 4 = 2752 = 21.5 groups


@pytest.mark.parametrize("r4_blocks, tp_sizes", [(None, [1, 2]), (1, [1]), (2, [1, 2]), (4, [1, 2])])
def test_r4_blocks_recorded_with_tp_sizes(tiny_dirs, tmp_path, r4_blocks, tp_sizes):
    """The shard-local R4 reaches the checkpoint: ``rotation.r4.blocks`` and the TP sizes it
    allows (the tiny llama: 4 heads, I = 128, o_proj K = 64, group 32: TP 4 fails the packing
    rule whatever the blocks); the checkpoint read back is the in-memory simulation."""
    options = QuantizeOptions(recipe="w4a16", group_size=32, rotation=RotationOptions(r4_blocks=r4_blocks))
    quantize_to_checkpoint(tiny_dirs["llama"], tmp_path / "ckpt", options, progress=False)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    blocks = 2 if r4_blocks is None else r4_blocks  # default: 128 = 2 x 64 (4 x 32 would be slower)
    expected = {"kind": "hadamard", "size": 128, "factor_k": 1, **({"blocks": blocks} if blocks > 1 else {})}
    assert qc["rotation"]["r4"] == expected
    assert qc["tp_sizes"] == tp_sizes
    from_ckpt, _, _, _ = load_checkpoint_simulated(tmp_path / "ckpt")
    in_memory, _, _, _ = simulated_model(tiny_dirs["llama"], options, progress=False)
    with torch.no_grad():
        a, b = from_ckpt(input_ids=ids()).logits, in_memory(input_ids=ids()).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_cli_r4_blocks(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli_main(["quantize", str(tiny_dirs["qwen2"]), str(out), "--recipe", "w4a16", "--group-size", "32",
                     "--r4-blocks", "2", "--seed", "3", "--method", "rtn"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["rotation"]["r4"]["blocks"] == 2 and qc["tp_sizes"] == [1, 2]
    again = tmp_path / "again"
    assert cli_main(["quantize", str(tiny_dirs["qwen2"]), str(again), "--recipe", "w4a16", "--group-size", "32",
                     "--r4-blocks", "2", "--seed", "3", "--method", "rtn"]) == 0
    assert tree_digest(out) == tree_digest(again)  # same seed, same bytes
    capsys.readouterr()
    assert cli_main(["quantize", str(tiny_dirs["qwen2"]), str(tmp_path / "bad"), "--recipe", "w4a16",
                     "--r4-blocks", "3", "--method", "rtn"]) == 2
    assert "r4_blocks = 3" in capsys.readouterr().err
