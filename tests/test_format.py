"""The checkpoint format (hq_vllm/format.py) and the atomic writer (offline/checkpoint.py)."""

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hq_vllm.offline.checkpoint as checkpoint
from hq_vllm.format import (
    FORMAT_VERSION,
    QUANT_METHOD,
    SUPPORTED_ARCHITECTURES,
    ActQuantSpec,
    CheckpointFormatError,
    HadaquantConfig,
    KVCacheSpec,
    LayerOverride,
    RotationSpec,
    UnsupportedArchitecture,
    WeightQuantSpec,
    check_architecture,
    expected_shapes,
    pack_linear,
    quantized_tensor_names,
    unpack_linear,
    validate_tensors,
)
from hq_vllm.offline.checkpoint import read_checkpoint_config, write_checkpoint
from hq_vllm.offline.quantize import dequantize_weight, fake_quantize_weight, quantize_weight

EXAMPLE = {
    "quant_method": "hadaquant",
    "format_version": 1,
    "weight": {"bits": 3, "group_size": 128, "symmetric": True, "mse_clip": True},
    "activation": {"bits": 4, "clip_ratio": 0.9, "symmetric": True},
    "kv_cache": {"bits": 3, "clip_ratio": 0.95, "symmetric": False},
    "rotation": {
        "r1": {"kind": "random_hadamard", "seed": 0, "size": 896},
        "r2": {"kind": "hadamard", "size": 64},
        "r3": {"kind": "hadamard", "size": 64, "factor_k": 1},
        "r4": {"kind": "hadamard", "size": 4864, "factor_k": 76, "blocks": 2},
        "expanded_hidden_size": None,
        "expanded_intermediate_size": None,
        "original_hidden_size": None,
        "original_intermediate_size": None,
    },
    "layers": {
        "model.layers.0.mlp.down_proj": {"weight_bits": 8, "act_bits": 8, "act_clip_ratio": None}
    },
    "tp_sizes": [1, 2],
    "recipe": "quarot-gptq-w3a4kv3",
    "calibration": {"dataset": "boolq-validation", "n_samples": 128, "seq_len": 2048, "seed": 0},
}


def test_example_round_trip():
    cfg = HadaquantConfig.from_dict(json.loads(json.dumps(EXAMPLE)))
    assert cfg.to_dict() == EXAMPLE
    assert HadaquantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["quant_method"] == QUANT_METHOD
    assert cfg.to_dict()["format_version"] == FORMAT_VERSION == 1
    assert cfg.layers["model.layers.0.mlp.down_proj"] == LayerOverride(weight_bits=8, act_bits=8)


def test_defaults_and_round_trip_of_defaults():
    cfg = HadaquantConfig.from_dict({"quant_method": "hadaquant", "format_version": 1})
    assert cfg == HadaquantConfig()
    assert HadaquantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.weight == WeightQuantSpec(bits=3, group_size=128, symmetric=True, mse_clip=True)
    assert cfg.activation == ActQuantSpec(bits=16, clip_ratio=1.0, symmetric=True)
    assert cfg.kv_cache == KVCacheSpec(bits=16, clip_ratio=1.0, symmetric=False)
    assert cfg.rotation == RotationSpec()


def _mutate(path, value):
    d = copy.deepcopy(EXAMPLE)
    *parents, last = path
    node = d
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return d


_DELETE = object()
_QKV = "model.layers.3.self_attn.{}_proj"

BAD = [
    (("format_version",), 2, ["format_version", "2", "upgrade"]),
    (("format_version",), 0, ["format_version", "0"]),
    (("format_version",), "1", ["format_version", "'1'"]),
    (("format_version",), _DELETE, ["format_version", "missing"]),
    (("quant_method",), "gptq", ["quant_method", "gptq"]),
    (("weight", "bits"), 9, ["weight.bits", "9", "out of range"]),
    (("weight", "bits"), 1, ["weight.bits", "1"]),
    (("weight", "bits"), 3.0, ["weight.bits", "3.0"]),
    (("weight", "bits"), True, ["weight.bits", "True"]),
    (("weight", "group_size"), 100, ["weight.group_size", "100"]),
    (("weight", "symmetric"), "yes", ["weight.symmetric", "yes"]),
    (("weight", "grp"), 3, ["weight", "unknown key", "grp"]),
    (("activation", "bits"), 1, ["activation.bits", "1"]),
    (("activation", "bits"), 12, ["activation.bits", "12"]),
    (("kv_cache", "bits"), 32, ["kv_cache.bits", "32"]),
    (("activation", "clip_ratio"), 0.0, ["activation.clip_ratio", "0.0"]),
    (("kv_cache", "clip_ratio"), 1.5, ["kv_cache.clip_ratio", "1.5"]),
    (("kv_cache", "clip_ratio"), "0.9", ["kv_cache.clip_ratio", "'0.9'"]),
    (("foo",), 1, ["unknown key", "foo"]),
    (("weight",), [3], ["weight", "JSON object"]),
    (("rotation", "r1", "kind"), "fourier", ["r1.kind", "fourier", "unknown rotation kind"]),
    (("rotation", "r1", "seed"), _DELETE, ["r1", "seed"]),
    (("rotation", "r2", "seed"), 3, ["r2.seed", "deterministic"]),
    (("rotation", "r3", "kind"), "random_hadamard", ["r3.kind", "random_hadamard"]),
    (("rotation", "r4", "factor_k"), 3, ["r4.factor_k", "3"]),
    (("rotation", "r4", "factor_k"), _DELETE, ["r4", "factor_k"]),
    (("rotation", "r4", "extra"), 1, ["r4.extra", "unknown key"]),
    (("rotation", "r4", "blocks"), 3, ["rotation.r4.blocks = 3", "divisor of size 4864"]),
    (("rotation", "r4", "blocks"), 0, ["rotation.r4.blocks = 0"]),
    (("rotation", "r4", "blocks"), 2.0, ["rotation.r4.blocks = 2.0", "integer"]),
    (("rotation", "r4", "blocks"), 256, ["r4.factor_k = 76", "size / blocks = 4864 / 256"]),
    (("rotation", "r4", "blocks"), 1, ["tp_sizes = [1, 2]", "2 does not divide rotation.r4.blocks = 1"]),
    (("rotation", "r4", "blocks"), _DELETE, ["tp_sizes", "rotation.r4.blocks = 1"]),
    (("tp_sizes",), [1, 2, 4], ["tp_sizes", "4 does not divide rotation.r4.blocks = 2"]),
    (("rotation", "expanded_hidden_size"), 1024, ["expanded_hidden_size", "1024"]),
    (("rotation", "r9"), None, ["rotation", "unknown key", "r9"]),
    (("rotation", "original_hidden_size"), 800, ["original_hidden_size", "800", "expanded_hidden_size"]),
    (("rotation", "r1", "factor_k"), 5, ["r1.factor_k", "5"]),
    (("rotation", "r2", "kind"), "grouped_walsh", ["r2.kind", "grouped_walsh"]),
    (("layers", "model.layers.0.mlp.down"), {"act_bits": 8}, ["model.layers.0.mlp.down", "unknown key"]),
    (("layers", "model.layers.0.self_attn.qkv_proj"), {"act_bits": 8}, ["qkv_proj", "merged"]),
    (("layers", "model.layers.0.mlp.down_proj", "weight_bits"), 10, ["down_proj", "weight_bits", "10"]),
    (("layers", "model.layers.0.mlp.down_proj", "act_clip_ratio"), 2.0, ["down_proj", "act_clip_ratio"]),
    (("layers", "model.layers.0.mlp.down_proj", "bitz"), 8, ["down_proj", "unknown key", "bitz"]),
    (("layers", "model.layers.1.mlp.down_proj"), {}, ["layers['model.layers.1.mlp.down_proj'] = {}", "at least one"]),
    (("layers", _QKV.format("q")), {"act_clip_ratio": 0.8}, [_QKV.format("k"), "act_clip_ratio", "share one input"]),
    (("layers", "model.layers.2.mlp.up_proj"), {"act_bits": 8}, ["model.layers.2.mlp.up_proj", "act_bits", "gate_proj"]),
    (("layers", "model.layers.2.mlp.gate_proj"), {"weight_bits": 4}, ["model.layers.2.mlp.up_proj", "weight_bits"]),
    (("tp_sizes",), [0], ["tp_sizes", "0"]),
    (("tp_sizes",), [], ["tp_sizes"]),
    (("tp_sizes",), 2, ["tp_sizes", "2"]),
    (("recipe",), 3, ["recipe", "3"]),
    (("calibration",), [1], ["calibration"]),
]


@pytest.mark.parametrize("path,value,needles", BAD, ids=lambda x: str(x)[:40])
def test_bad_config_names_the_culprit(path, value, needles):
    with pytest.raises(CheckpointFormatError) as info:
        HadaquantConfig.from_dict(_mutate(path, value))
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_r4_blocks_default_and_canonical_form():
    """``rotation.r4.blocks`` is optional (format version 1 files without it mean one block) and
    written only when above 1; ``factor_k`` describes one block."""
    one = {"kind": "hadamard", "size": 1536, "factor_k": 12}
    spec = RotationSpec(r4=one)
    assert (spec.r4, spec.r4_blocks, spec.r4_block_size) == (one, 1, 1536)
    assert RotationSpec(r4={**one, "blocks": 1}).r4 == one  # the default is not written
    two = RotationSpec(r4={**one, "blocks": 2})
    assert (two.r4["blocks"], two.r4_blocks, two.r4_block_size) == (2, 2, 768)  # 768 = 12 * 64
    assert RotationSpec(r4={**one, "blocks": 3, "factor_k": 1}).r4_block_size == 512  # H_512 blocks
    assert (RotationSpec().r4_blocks, RotationSpec().r4_block_size) == (1, None)
    assert HadaquantConfig(rotation=two, tp_sizes=[2, 1]).tp_sizes == [1, 2]
    with pytest.raises(CheckpointFormatError, match=r"tp_sizes = \[1, 2, 4\].*rotation\.r4\.blocks = 2"):
        HadaquantConfig(rotation=two, tp_sizes=[1, 2, 4])
    assert HadaquantConfig(tp_sizes=[1, 2, 4]).tp_sizes == [1, 2, 4]  # no R4: no block constraint
    old = copy.deepcopy(EXAMPLE)
    del old["rotation"]["r4"]["blocks"]
    old["tp_sizes"] = [1]
    assert HadaquantConfig.from_dict(old).to_dict() == old  # a file without the key round-trips


def test_qkv_disagreement_names_the_odd_one_out():
    d = copy.deepcopy(EXAMPLE)
    for p, clip in (("q", 0.9), ("k", 0.9), ("v", 0.8)):
        d["layers"][_QKV.format(p)] = {"act_clip_ratio": clip}
    with pytest.raises(CheckpointFormatError, match=r"v_proj.*act_clip_ratio.*0\.8"):
        HadaquantConfig.from_dict(d)
    d["layers"][_QKV.format("v")] = {"act_clip_ratio": 0.9}
    cfg = HadaquantConfig.from_dict(d)  # agreeing siblings are fine
    assert cfg.effective_act_spec(_QKV.format("k")).clip_ratio == 0.9
    assert cfg.effective_act_spec("model.layers.3.self_attn.qkv_proj").clip_ratio == 0.9


def test_direct_construction_is_validated_too():
    with pytest.raises(CheckpointFormatError, match=r"WeightQuantSpec\.bits = 9"):
        WeightQuantSpec(bits=9)
    with pytest.raises(CheckpointFormatError, match="clip_ratio"):
        ActQuantSpec(bits=4, clip_ratio=float("nan"))
    with pytest.raises(CheckpointFormatError, match="calibration"):
        HadaquantConfig(calibration={"x": {1, 2}})
    with pytest.raises(CheckpointFormatError, match="weight"):
        HadaquantConfig(weight={"bits": 3})
    assert ActQuantSpec(bits=4, clip_ratio=1).clip_ratio == 1.0
    assert HadaquantConfig(tp_sizes=[4, 1, 2, 2]).tp_sizes == [1, 2, 4]


def test_effective_specs():
    cfg = HadaquantConfig.from_dict(EXAMPLE)
    down0 = cfg.effective_weight_spec("model.layers.0.mlp.down_proj")
    assert down0 == WeightQuantSpec(bits=8, group_size=128, symmetric=True, mse_clip=True)
    assert cfg.effective_act_spec("model.layers.0.mlp.down_proj") == ActQuantSpec(8, 0.9, True)
    assert cfg.effective_weight_spec("model.layers.1.mlp.down_proj").bits == 3
    assert cfg.effective_act_spec("model.layers.1.mlp.gate_up_proj") == ActQuantSpec(4, 0.9, True)
    assert cfg.effective_weight_spec("lm_head").bits == 16
    assert cfg.effective_act_spec("lm_head").bits == 16
    with pytest.raises(ValueError, match="embed_tokens"):
        cfg.effective_weight_spec("model.embed_tokens")
    lm = HadaquantConfig(layers={"lm_head": LayerOverride(weight_bits=8)})
    assert lm.effective_weight_spec("lm_head").bits == 8


def test_check_architecture():
    for arch, family in SUPPORTED_ARCHITECTURES.items():
        assert check_architecture({"architectures": [arch]}) == family

    class Cfg:
        architectures = ["Qwen2ForCausalLM"]

    assert check_architecture(Cfg()) == "qwen2"
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel") as info:
        check_architecture({"architectures": ["GPT2LMHeadModel"]})
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(info.value)
    with pytest.raises(UnsupportedArchitecture, match="architectures"):
        check_architecture({})


QWEN_CFG = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
}


def test_check_model():
    cfg = HadaquantConfig.from_dict(EXAMPLE)
    assert cfg.check_model(QWEN_CFG) == "qwen2"
    with pytest.raises(CheckpointFormatError, match=r"r2\.size = 64.*128"):
        cfg.check_model({**QWEN_CFG, "head_dim": 128})
    with pytest.raises(CheckpointFormatError, match=r"r1\.size = 896.*1024"):
        cfg.check_model({**QWEN_CFG, "hidden_size": 1024})
    with pytest.raises(CheckpointFormatError, match="only 0 layers|num_hidden_layers"):
        cfg.check_model({**QWEN_CFG, "num_hidden_layers": 0})
    short = HadaquantConfig(layers={"model.layers.30.mlp.down_proj": LayerOverride(act_bits=8)})
    with pytest.raises(CheckpointFormatError, match="only 24 layers"):
        short.check_model(QWEN_CFG)
    # expansion: config.json describes the padded model; the original size is recorded
    expanded = HadaquantConfig(rotation=RotationSpec(
        r1={"kind": "hadamard", "size": 1024, "factor_k": 1}, expanded_hidden_size=1024,
        original_hidden_size=896))
    assert expanded.check_model({**QWEN_CFG, "hidden_size": 1024, "head_dim": 64}) == "qwen2"
    with pytest.raises(CheckpointFormatError, match=r"r1\.size = 1024.*896"):
        expanded.check_model(QWEN_CFG)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def test_names_and_shapes():
    p = "model.layers.0.self_attn.q_proj"
    sym = WeightQuantSpec(bits=3, group_size=128)
    asym = WeightQuantSpec(bits=4, group_size=-1, symmetric=False)
    assert quantized_tensor_names(p, sym) == [f"{p}.qweight", f"{p}.scales"]
    assert quantized_tensor_names(p, asym) == [f"{p}.qweight", f"{p}.scales", f"{p}.qzeros"]
    assert quantized_tensor_names(p, WeightQuantSpec(bits=16)) == [f"{p}.weight"]
    assert expected_shapes(p, 896, 4864, sym) == {
        f"{p}.qweight": ((456, 896), torch.int32),
        f"{p}.scales": ((38, 896), torch.float16),
    }
    assert expected_shapes(p, 10, 64, asym) == {
        f"{p}.qweight": ((8, 10), torch.int32),
        f"{p}.scales": ((1, 10), torch.float16),
        f"{p}.qzeros": ((1, 10), torch.uint8),
    }
    assert expected_shapes(p, 10, 64, WeightQuantSpec(bits=16)) == {
        f"{p}.weight": ((10, 64), torch.bfloat16)
    }
    with pytest.raises(CheckpointFormatError, match=r"q_proj.*K=200"):
        expected_shapes(p, 10, 200, sym)


@pytest.mark.parametrize(
    "spec",
    [
        WeightQuantSpec(bits=3, group_size=64),
        WeightQuantSpec(bits=3, group_size=-1, symmetric=False),
        WeightQuantSpec(bits=4, group_size=32, symmetric=False, mse_clip=False),
        WeightQuantSpec(bits=2, group_size=128),
        WeightQuantSpec(bits=8, group_size=64, symmetric=False),
    ],
)
def test_pack_unpack_linear_matches_quantizer_bit_for_bit(spec):
    g = torch.Generator().manual_seed(spec.bits)
    w = torch.randn(48, 256, generator=g) * 0.02
    qw = quantize_weight(w, spec)
    tensors = pack_linear(qw.codes, qw.scales, qw.zeros, spec, prefix="m")
    assert sorted(tensors) == sorted(quantized_tensor_names("m", spec))
    for name, (shape, dtype) in expected_shapes("m", 48, 256, spec).items():
        assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype
    deq = unpack_linear(tensors, "m", spec, 256)
    assert torch.equal(deq, dequantize_weight(qw, spec))
    assert torch.equal(deq, fake_quantize_weight(w, spec))
    bare = pack_linear(qw.codes, qw.scales, qw.zeros, spec)
    assert sorted(bare) == sorted(n.split(".", 1)[1] for n in tensors)


def test_pack_linear_errors():
    spec = WeightQuantSpec(bits=3, group_size=64)
    qw = quantize_weight(torch.randn(8, 128), spec)
    with pytest.raises(CheckpointFormatError, match="zeros"):
        pack_linear(qw.codes, qw.scales, torch.zeros(8, 2, dtype=torch.uint8), spec)
    with pytest.raises(CheckpointFormatError, match="scales"):
        pack_linear(qw.codes, qw.scales[:, :1], None, spec)
    with pytest.raises(CheckpointFormatError, match="16-bit"):
        pack_linear(qw.codes, qw.scales, None, WeightQuantSpec(bits=16))


def _tiny_model(cfg: HadaquantConfig, hidden=64, inter=128, layers=1, bias=True):
    """A state dict in checkpoint form plus its linear shapes, for a Llama-shaped toy model."""
    g = torch.Generator().manual_seed(0)
    shapes = {}
    for i in range(layers):
        for name, n, k in (
            ("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden // 2, hidden),
            ("self_attn.v_proj", hidden // 2, hidden), ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden),
            ("mlp.down_proj", hidden, inter),
        ):
            shapes[f"model.layers.{i}.{name}"] = (n, k)
    sd = {
        "model.embed_tokens.weight": torch.randn(100, hidden, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(100, hidden, generator=g).to(torch.bfloat16),
    }
    for prefix, (n, k) in shapes.items():
        spec = cfg.effective_weight_spec(prefix)
        w = torch.randn(n, k, generator=g) * 0.02
        if spec.bits == 16:
            sd[f"{prefix}.weight"] = w.to(torch.bfloat16)
        else:
            qw = quantize_weight(w, spec)
            sd.update(pack_linear(qw.codes, qw.scales, qw.zeros, spec, prefix=prefix))
        if bias and "self_attn" in prefix and prefix[-6] in "qkv":
            sd[f"{prefix}.bias"] = torch.zeros(n, dtype=torch.bfloat16)
    return sd, shapes


MIXED = HadaquantConfig(
    weight=WeightQuantSpec(bits=3, group_size=32, symmetric=False, mse_clip=False),
    layers={"model.layers.0.mlp.down_proj": LayerOverride(weight_bits=16)},
)


def test_validate_tensors_accepts_good_dict_and_safetensors(tmp_path):
    sd, shapes = _tiny_model(MIXED)
    validate_tensors(sd, shapes, MIXED)
    names = sorted(sd)
    save_file({n: sd[n] for n in names[: len(names) // 2]}, str(tmp_path / "a.safetensors"))
    save_file({n: sd[n] for n in names[len(names) // 2 :]}, str(tmp_path / "b.safetensors"))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(
        str(tmp_path / "b.safetensors"), "pt"
    ) as b:
        validate_tensors([a, b], shapes, MIXED)
        w = unpack_linear([a, b], "model.layers.0.mlp.up_proj", MIXED.weight, 64)
        assert torch.equal(w, unpack_linear(sd, "model.layers.0.mlp.up_proj", MIXED.weight, 64))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda sd: sd.pop("model.layers.0.self_attn.k_proj.scales"), "missing tensor model.layers.0.self_attn.k_proj.scales"),
        (lambda sd: sd.pop("model.layers.0.mlp.gate_proj.qzeros"), "missing tensor model.layers.0.mlp.gate_proj.qzeros"),
        (lambda sd: sd.pop("model.layers.0.mlp.down_proj.weight"), "missing tensor model.layers.0.mlp.down_proj.weight"),
        (lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.qweight", torch.zeros(7, 64, dtype=torch.int32)),
         "tensor model.layers.0.self_attn.o_proj.qweight is [7, 64]"),
        (lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.scales", torch.zeros(2, 64, dtype=torch.float32)),
         "tensor model.layers.0.self_attn.o_proj.scales is [2, 64] torch.float32"),
        (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 64)),
         "unexpected tensor model.layers.0.self_attn.q_proj.weight"),
        (lambda sd: sd.__setitem__("model.layers.0.self_attn.v_proj.bias", torch.zeros(64)),
         "tensor model.layers.0.self_attn.v_proj.bias is [64], expected [32]"),
    ],
)
def test_validate_tensors_names_the_bad_tensor(edit, needle):
    sd, shapes = _tiny_model(MIXED)
    edit(sd)
    with pytest.raises(CheckpointFormatError) as info:
        validate_tensors(sd, shapes, MIXED)
    assert needle in str(info.value)


def test_validate_tensors_checks_tensor_parallel_splits():
    cfg = HadaquantConfig(weight=WeightQuantSpec(bits=3, group_size=32, mse_clip=False), tp_sizes=[1, 2, 4])
    sd, shapes = _tiny_model(cfg)
    with pytest.raises(CheckpointFormatError, match=r"o_proj: tensor parallel size 4.*K = 64"):
        validate_tensors(sd, shapes, cfg)
    validate_tensors(sd, shapes, dataclasses.replace(cfg, tp_sizes=[1, 2]))


# --------------------------------------------------------------------------------------------
# Writing checkpoints
# --------------------------------------------------------------------------------------------

HF_CFG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "vocab_size": 100,
    "torch_dtype": "bfloat16",
}


@pytest.fixture()
def tokenizer_dir(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    (d / "generation_config.json").write_text('{"do_sample": false}')
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "model.safetensors").write_bytes(b"not copied")
    return d


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_is_deterministic_and_sharded(tmp_path, tokenizer_dir):
    sd, shapes = _tiny_model(MIXED)
    kw = dict(hf_config=HF_CFG, quant_config=MIXED, tokenizer_dir=tokenizer_dir,
              max_shard_bytes=20_000, linears=shapes)
    a = write_checkpoint(tmp_path / "a", sd, **kw)
    b = write_checkpoint(tmp_path / "b", dict(reversed(list(sd.items()))), **kw)
    fa, fb = _files(a), _files(b)
    assert fa == fb
    shards = sorted(n for n in fa if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads(fa["model.safetensors.index.json"])
    assert sorted(index["weight_map"]) == sorted(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "chat_template.jinja", "config.json"} <= set(fa)
    assert "model.safetensors" not in fa  # the source's weights are not copied
    loaded = {}
    for s in shards:
        loaded.update(load_file(str(a / s)))
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[n], sd[n]) for n in sd)
    hf, qc = read_checkpoint_config(a)
    assert qc == MIXED
    assert hf["quantization_config"]["quant_method"] == "hadaquant"
    assert {k: v for k, v in hf.items() if k != "quantization_config"} == HF_CFG
    assert "quantization_config" not in HF_CFG  # the caller's dict is not modified
    assert _leftovers(tmp_path) == []


def test_single_shard_has_no_index(tmp_path):
    sd, _ = _tiny_model(MIXED)
    out = write_checkpoint(tmp_path / "c", sd, HF_CFG, MIXED)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_failure_midway_leaves_nothing(tmp_path, tokenizer_dir, monkeypatch):
    sd, _ = _tiny_model(MIXED)
    real_save = checkpoint.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "out", sd, HF_CFG, MIXED, tokenizer_dir, max_shard_bytes=20_000)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []

    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    out = write_checkpoint(tmp_path / "out", sd, HF_CFG, MIXED)
    before = _files(out)
    calls.clear()
    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(out, sd, HF_CFG, MIXED, max_shard_bytes=20_000, overwrite=True)
    assert _files(out) == before
    assert _leftovers(tmp_path) == []


def test_unserializable_tensor_leaves_nothing(tmp_path):
    sd, _ = _tiny_model(MIXED)
    base = torch.zeros(8, 8)
    sd["shared.a"], sd["shared.b"] = base, base[:4]  # safetensors refuses shared storage
    with pytest.raises(Exception):
        write_checkpoint(tmp_path / "out", sd, HF_CFG, MIXED)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_overwrite_semantics(tmp_path):
    sd, _ = _tiny_model(MIXED)
    out = write_checkpoint(tmp_path / "out", sd, HF_CFG, MIXED)
    (out / "stale.txt").write_text("from an earlier run")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_checkpoint(out, sd, HF_CFG, MIXED)
    assert (out / "stale.txt").exists()
    cfg2 = dataclasses.replace(MIXED, recipe="second")
    write_checkpoint(out, sd, HF_CFG, cfg2, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert read_checkpoint_config(out)[1].recipe == "second"
    assert _leftovers(tmp_path) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        write_checkpoint(tmp_path / "afile", sd, HF_CFG, MIXED, overwrite=True)


def test_write_refuses_bad_inputs_before_writing(tmp_path, tokenizer_dir):
    sd, shapes = _tiny_model(MIXED)
    with pytest.raises(UnsupportedArchitecture):
        write_checkpoint(tmp_path / "o", sd, {**HF_CFG, "architectures": ["GPT2LMHeadModel"]}, MIXED)
    bad = dict(sd)
    del bad["model.layers.0.mlp.up_proj.scales"]
    with pytest.raises(CheckpointFormatError, match="up_proj.scales"):
        write_checkpoint(tmp_path / "o", bad, HF_CFG, MIXED, linears=shapes)
    with pytest.raises(ValueError, match="'qweight' has no module prefix"):
        write_checkpoint(tmp_path / "o", {**sd, "qweight": torch.zeros(3, 4, dtype=torch.int32)}, HF_CFG, MIXED)
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        write_checkpoint(tmp_path / "o", sd, HF_CFG, MIXED, tokenizer_dir=empty)
    assert not (tmp_path / "o").exists()
    assert _leftovers(tmp_path) == []


def test_read_checkpoint_config_rejects_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CFG, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointFormatError, match="gptq"):
        read_checkpoint_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint_config(tmp_path / "nope")
