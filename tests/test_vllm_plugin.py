"""The vLLM plugin without an engine: registration, config parsing, and the linear method inside
real vLLM linear layers (merged qkv / gate_up and row-parallel, at TP 1 and an emulated TP 2).

These run vLLM's own weight-loader v2 code on our parameter declarations, so a wrong
``input_dim`` / ``output_dim`` / parameter class shows up here as a wrong weight slice, long
before an engine would produce odd tokens.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F

from hq_vllm.format import (
    CheckpointFormatError,
    HadaquantConfig,
    KVCacheSpec,
    LayerOverride,
    RotationSpec,
    WeightQuantSpec,
    pack_linear,
    unpack_linear,
)
from hq_vllm.kernels.fwht import hadamard_transform
from hq_vllm.offline.quantize import fake_quantize_per_token as offline_fake_quantize_per_token

# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("hadaquant") == "hq_vllm:register"


def test_import_is_cheap():
    """Every vLLM process imports the plugin package; it must not drag in vllm or torch."""
    code = "import sys, hq_vllm; print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def registered():
    import hq_vllm

    hq_vllm.register()
    hq_vllm.register()  # idempotent
    from hq_vllm import quant_method

    return quant_method


def test_register_is_idempotent(registered):
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import hq_vllm

    hq_vllm.register()
    assert get_quantization_config("hadaquant") is registered.HadaquantQuantizationConfig
    assert QUANTIZATION_METHODS.count("hadaquant") == 1
    for name in ("HadaquantLinearMethod", "HadaquantUnquantizedLinearMethod"):
        assert WEIGHT_LOADER_V2_SUPPORTED.count(name) == 1


# --------------------------------------------------------------------------------------------
# Config parsing: clear errors naming the culprit
# --------------------------------------------------------------------------------------------


def _qc_dict(**changes) -> dict:
    d = HadaquantConfig(kv_cache=KVCacheSpec(bits=16)).to_dict()
    for key, value in changes.items():
        if isinstance(value, dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


def test_from_config_parses(registered):
    qc = registered.HadaquantQuantizationConfig.from_config(_qc_dict(weight={"bits": 4}))
    assert qc.get_name() == "hadaquant"
    assert qc.config.weight.bits == 4
    assert torch.float32 in qc.get_supported_act_dtypes()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 99}, r"quantization_config\.format_version = 99: .*upgrade hadaquant"),
        ({"weight": {"bits": 9}}, r"quantization_config\.weight\.bits = 9: out of range"),
        ({"activation": {"clip_ratio": 1.5}}, r"quantization_config\.activation\.clip_ratio = 1\.5"),
        ({"kv_cache": {"bits": 9}}, r"quantization_config\.kv_cache\.bits = 9: out of range"),
        ({"bogus": 1}, r"unknown key 'bogus'"),
    ],
)
def test_from_config_errors_name_the_culprit(registered, changes, message):
    with pytest.raises(CheckpointFormatError, match=message):
        registered.HadaquantQuantizationConfig.from_config(_qc_dict(**changes))


def test_plain_model_with_quantization_flag_is_served_online(registered):
    """vLLM builds ``cls()`` for ``--quantization hadaquant`` on a model without our config:
    an online config (load-time RTN, hq_vllm/online.py; tested in test_vllm_online.py)."""
    qc = registered.HadaquantQuantizationConfig()
    assert qc.online and qc.config.weight.bits == 4
    assert not registered.HadaquantQuantizationConfig.from_config(_qc_dict()).online


@pytest.mark.parametrize("bits", [3, 4, 8, 16])
def test_attention_layers_get_the_packed_kv_method_below_16_bits(registered, bits):
    qc = registered.HadaquantQuantizationConfig.from_config(
        _qc_dict(kv_cache={"bits": bits, "clip_ratio": 0.95, "symmetric": False}))
    method = qc._kv_cache_method("model.layers.0.self_attn.attn")
    if bits == 16:
        assert method is None  # R3 alone is the identity on QK^T: vLLM's own attention
        return
    from hq_vllm.attention import HadaquantKVCacheMethod

    assert isinstance(method, HadaquantKVCacheMethod)
    assert (method.settings.bits, method.settings.clip_ratio, method.settings.symmetric) == (bits, 0.95, False)


def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"],
                       **extra)


def test_kv_cache_dtype_shim_records_the_name_and_hands_vllm_auto(registered):
    """vLLM 0.32 has no register_kv_cache_dtype: the shim wraps the resolver vllm.engine.arg_utils
    calls before building CacheConfig (whose Literal would reject our names)."""
    from types import SimpleNamespace

    import vllm.config.cache
    import vllm.engine.arg_utils as arg_utils

    assert not hasattr(vllm.config.cache, "register_kv_cache_dtype")  # else the shim is not used
    resolve = arg_utils.resolve_kv_cache_dtype_string
    assert getattr(resolve, "_hadaquant", False)
    hf = SimpleNamespace()
    model = SimpleNamespace(quantization="hadaquant", hf_config=hf, model="m")
    assert resolve("hq_int3", model) == "auto" and hf.hadaquant_kv_cache_dtype == "hq_int3"
    assert resolve("fp8", SimpleNamespace(quantization=None, hf_config=SimpleNamespace())) == "fp8"
    with pytest.raises(ValueError, match=r"kv_cache_dtype = 'hq_int4' is hadaquant's packed KV cache"):
        resolve("hq_int4", SimpleNamespace(quantization="gptq", hf_config=SimpleNamespace(), model="m"))


@pytest.mark.parametrize("name, bits", [("hq_int3", 3), ("hq_int4", 4), ("hq_int8", 8)])
def test_requested_kv_cache_dtype_replaces_the_checkpoints_kv_bits(registered, name, bits):
    """A 16-bit-KV checkpoint without R3, served with a KV-cache dtype name: the config gets the
    packed cache's bits (asymmetric, clip 0.95) and R3 over head_dim."""
    qc = registered.HadaquantQuantizationConfig.from_config(_qc_dict())
    assert qc.config.kv_cache.bits == 16 and qc.config.rotation.r3 is None
    qc.maybe_update_config("not-a-dir", _llama_config(hadaquant_kv_cache_dtype=name))
    kv = qc.config.kv_cache
    assert (kv.bits, kv.clip_ratio, kv.symmetric) == (bits, 0.95, False)
    assert qc.config.rotation.r3 == {"kind": "hadamard", "size": 64, "factor_k": 1}
    assert qc._kv_cache_method("model.layers.0.self_attn.attn").settings.bits == bits


def test_unknown_kv_cache_dtype_name_is_a_clear_error(registered):
    qc = registered.HadaquantQuantizationConfig.from_config(_qc_dict())
    with pytest.raises(CheckpointFormatError, match=r"hadaquant_kv_cache_dtype = 'hq_int2': unknown"):
        qc.maybe_update_config("not-a-dir", _llama_config(hadaquant_kv_cache_dtype="hq_int2"))


@pytest.mark.parametrize("bits, head_dim", [(3, 64), (4, 128)])
def test_packed_backend_shrinks_the_page(registered, bits, head_dim):
    """customize_spec turns vLLM's dense K+V page into uint8 slots of kv_slot_bytes, and the
    backend keeps the base backend's metadata builder and our impl."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from hq_vllm.attention import HadaquantAttentionImpl, packed_kv_backend
    from hq_vllm.kernels.kv_cache import kv_slot_bytes

    backend = packed_kv_backend(CPUAttentionBackend, bits)
    assert backend is packed_kv_backend(CPUAttentionBackend, bits)  # one class: one attention group
    assert backend.get_builder_cls() is CPUAttentionBackend.get_builder_cls()
    assert backend.get_impl_cls() is HadaquantAttentionImpl
    assert not backend.forward_includes_kv_cache_update
    dense = FullAttentionSpec(block_size=32, num_kv_heads=3, head_size=head_dim, dtype=torch.bfloat16)
    packed = backend.customize_spec(dense)
    assert packed.dtype == torch.uint8
    assert packed.page_size_bytes == 32 * 3 * kv_slot_bytes(head_dim, bits)
    assert dense.page_size_bytes / packed.page_size_bytes > 0.85 * 16 / bits  # scales cost the rest


# --------------------------------------------------------------------------------------------
# Activation quantization: bit for bit the simulator's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_quant_matches_offline_bit_for_bit(registered, dtype, symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 256, generator=g) * torch.rand(33, 1, generator=g) * 4
    x[0] = 0.0  # zero row: the tiny-scale guard
    x[1, 7] = 300.0  # one outlier channel
    x[2] = x[2].abs()  # all positive: asymmetric zero point at 0
    x = x.to(dtype)
    for bits in (2, 3, 4, 5, 6, 7, 8, 16):
        for clip in (1.0, 0.9, 0.55):
            ours = registered.fake_quantize_per_token(x, bits, clip, symmetric)
            ref = offline_fake_quantize_per_token(x, bits, clip, symmetric)
            assert ours.dtype == ref.dtype == dtype
            assert torch.equal(ours, ref), (bits, clip)


# --------------------------------------------------------------------------------------------
# The linear method inside vLLM's linear layers
# --------------------------------------------------------------------------------------------

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTER = 128, 32, 4, 2, 192


@pytest.fixture(scope="module")
def vllm_env(registered, tmp_path_factory):
    """A one-process vLLM distributed environment (gloo) and a current vLLM config, as the
    worker has while it builds the model."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    init_file = tmp_path_factory.mktemp("dist") / "init"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{init_file}")
        initialize_model_parallel(1, 1)
        yield registered


@pytest.fixture
def emulate_tp(monkeypatch):
    """Make vLLM's linear layers (and our TP check) believe they are rank ``rank`` of ``size``.

    The layers read the TP world size / rank when they are built and stamp them on their
    parameters, which is all weight loading uses; no collective runs here.
    """
    import vllm.distributed
    from vllm.model_executor.layers import linear

    def set_tp(size: int, rank: int) -> None:
        for module in (linear, vllm.distributed):
            monkeypatch.setattr(module, "get_tensor_model_parallel_world_size", lambda: size)
            monkeypatch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)

    return set_tp


def _random_linear(prefix: str, n: int, k: int, spec: WeightQuantSpec, seed: int):
    """Checkpoint tensors of a random quantized linear and its float32 dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if spec.group_size == -1 else k // spec.group_size
    codes = torch.randint(0, 2**spec.bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 0.01).to(torch.float16)
    zeros = None
    if not spec.symmetric:
        zeros = torch.randint(0, 2**spec.bits, (n, groups), generator=g, dtype=torch.uint8)
    tensors = pack_linear(codes, scales, zeros, spec, prefix=prefix)
    return tensors, unpack_linear(tensors, prefix, spec, k)


def _load(layer, tensors: dict, shard_id=None) -> None:
    """Feed checkpoint tensors through each parameter's weight loader (vLLM's v2 loaders)."""
    for name, tensor in tensors.items():
        param = getattr(layer, name.rsplit(".", 1)[1])
        if shard_id is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard_id)


def _rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    step = w.shape[0] // size
    return w[rank * step:(rank + 1) * step]


SPECS = [
    WeightQuantSpec(bits=3, group_size=32, symmetric=True),
    WeightQuantSpec(bits=4, group_size=64, symmetric=False),
    WeightQuantSpec(bits=3, group_size=-1, symmetric=False),
]


def _quant_config(registered, spec: WeightQuantSpec, **kw):
    kw.setdefault("tp_sizes", [1, 2])
    config = HadaquantConfig(weight=spec, kv_cache=KVCacheSpec(bits=16), **kw)
    return registered.HadaquantQuantizationConfig(config)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
@pytest.mark.parametrize("tp, rank", [(1, 0), (2, 0), (2, 1)])
def test_qkv_shards(vllm_env, emulate_tp, spec, tp, rank):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    emulate_tp(tp, rank)
    qc = _quant_config(vllm_env, spec)
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, quant_config=qc,
                              params_dtype=torch.float32, prefix="model.layers.0.self_attn.qkv_proj")
    assert type(layer.quant_method).__name__ == "HadaquantLinearMethod"
    expected = []
    for i, (member, n) in enumerate((("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM),
                                     ("v", KV_HEADS * HEAD_DIM))):
        prefix = f"model.layers.0.self_attn.{member}_proj"
        tensors, w = _random_linear(prefix, n, HIDDEN, spec, seed=i)
        _load(layer, tensors, shard_id=member)
        expected.append(_rows(w, rank, tp))
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(layer.hq_weight, torch.cat(expected))

    x = torch.randn(5, HIDDEN)
    act = qc.config.activation
    want = F.linear(offline_fake_quantize_per_token(x, act.bits, act.clip_ratio, act.symmetric),
                    torch.cat(expected))
    assert torch.equal(layer.quant_method.apply(layer, x), want)


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: f"w{s.bits}g{s.group_size}")
@pytest.mark.parametrize("tp, rank", [(1, 0), (2, 1)])
def test_gate_up_shards(vllm_env, emulate_tp, spec, tp, rank):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    emulate_tp(tp, rank)
    qc = _quant_config(vllm_env, spec)
    layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, quant_config=qc,
                                       params_dtype=torch.float32, prefix="model.layers.1.mlp.gate_up_proj")
    expected = []
    for shard_id, member in enumerate(("gate", "up")):
        prefix = f"model.layers.1.mlp.{member}_proj"
        tensors, w = _random_linear(prefix, INTER, HIDDEN, spec, seed=10 + shard_id)
        _load(layer, tensors, shard_id=shard_id)
        expected.append(_rows(w, rank, tp))
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(layer.hq_weight, torch.cat(expected))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
@pytest.mark.parametrize("tp, rank", [(1, 0), (2, 0), (2, 1)])
def test_row_parallel_shards(vllm_env, emulate_tp, spec, tp, rank):
    """o_proj / down_proj split K: whole packing blocks of qweight, whole groups of scales, and
    per-channel scales replicated."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    emulate_tp(tp, rank)
    qc = _quant_config(vllm_env, spec)
    prefix = "model.layers.2.self_attn.o_proj"
    layer = RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=qc,
                              params_dtype=torch.float32, prefix=prefix)
    tensors, w = _random_linear(prefix, HIDDEN, HIDDEN, spec, seed=20)
    _load(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    k = HIDDEN // tp
    assert torch.equal(layer.hq_weight, w[:, rank * k:(rank + 1) * k])


def test_down_proj_applies_online_r4(vllm_env, emulate_tp):
    from vllm.model_executor.layers.linear import RowParallelLinear

    emulate_tp(1, 0)
    spec = SPECS[0]
    rotation = RotationSpec(r4={"kind": "hadamard", "size": INTER, "factor_k": 12})
    qc = _quant_config(vllm_env, spec, rotation=rotation, tp_sizes=[1])  # one block: TP 1 only
    prefix = "model.layers.0.mlp.down_proj"
    layer = RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=qc,
                              params_dtype=torch.float32, prefix=prefix)
    tensors, w = _random_linear(prefix, HIDDEN, INTER, spec, seed=30)
    _load(layer, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(7, INTER)
    act = qc.config.activation
    want = F.linear(offline_fake_quantize_per_token(hadamard_transform(x), act.bits, act.clip_ratio),
                    w)
    assert torch.equal(layer.quant_method.apply(layer, x), want)
    # an R4 over the whole intermediate size cannot be split across ranks
    emulate_tp(2, 0)
    with pytest.raises(CheckpointFormatError, match=r"tensor_parallel_size = 2: .*\[1\] only.*"
                                                    r"rotation\.r4\.blocks = 1"):
        RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=qc, params_dtype=torch.float32,
                          prefix=prefix)


SMOL_HIDDEN, SMOL_INTER = 576, 1536  # SmolLM2-135M's down_proj; R4 as 2 blocks of 768 = 12·64


def _simulated_down_proj(config: HadaquantConfig, w: torch.Tensor) -> torch.nn.Module:
    """The offline simulator's down_proj: a linear of weight ``w`` under attach_simulation's hooks
    (online R4, activation fake quantization), at its HF name in a minimal module tree."""
    from torch import nn

    from hq_vllm.offline.simulate import attach_simulation

    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([nn.Module()])
    root.model.layers[0].mlp = nn.Module()
    down = nn.Linear(w.shape[1], w.shape[0], bias=False)
    down.weight = nn.Parameter(w.clone(), requires_grad=False)
    root.model.layers[0].mlp.down_proj = down
    attach_simulation(root, config)  # kv 16 bits, no R3: only the linear's hook
    return down


@pytest.mark.parametrize("act_bits", [16, 8])
def test_shard_local_r4_at_emulated_tp2(vllm_env, emulate_tp, act_bits):
    """A down_proj with a 2-block R4 at emulated TP 2: each rank holds half of the packed weight
    and rotates its half of the input block by block; the sum of the partial products (what the
    all-reduce adds) is the TP-1 output, and TP 1 is the simulator's down_proj bit for bit.

    With quantized activations a rank's per-token scale comes from its own half of the row (as
    for any row-parallel linear), so TP 2 is close to TP 1 but not the same quantizer."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    from hq_vllm.format import ActQuantSpec

    spec = WeightQuantSpec(bits=4, group_size=64, symmetric=True)
    rotation = RotationSpec(r4={"kind": "hadamard", "size": SMOL_INTER, "factor_k": 12, "blocks": 2})
    act = ActQuantSpec(bits=act_bits, clip_ratio=0.9 if act_bits < 16 else 1.0)
    config = HadaquantConfig(weight=spec, activation=act, kv_cache=KVCacheSpec(bits=16),
                             rotation=rotation, tp_sizes=[1, 2])
    prefix = "model.layers.0.mlp.down_proj"
    tensors, w = _random_linear(prefix, SMOL_HIDDEN, SMOL_INTER, spec, seed=40)
    x = torch.randn(9, SMOL_INTER, generator=torch.Generator().manual_seed(41))
    x[:, 5] *= 30  # an outlier channel, which the rotation spreads over its block

    def build(tp: int, rank: int):
        emulate_tp(tp, rank)
        qc = vllm_env.HadaquantQuantizationConfig(config)
        layer = RowParallelLinear(SMOL_INTER, SMOL_HIDDEN, bias=False, quant_config=qc,
                                  params_dtype=torch.float32, prefix=prefix)
        _load(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        return layer

    tp1 = build(1, 0)
    y1 = tp1.quant_method.apply(tp1, x)
    with torch.no_grad():
        sim = _simulated_down_proj(config, w)(x)
    assert torch.equal(y1, sim)

    half = SMOL_INTER // 2
    partial = []
    for rank in range(2):
        layer = build(2, rank)
        assert layer.quant_method.online_input.r4_block_size == half
        assert torch.equal(layer.hq_weight, w[:, rank * half:(rank + 1) * half])
        partial.append(layer.quant_method.apply(layer, x[:, rank * half:(rank + 1) * half]))
    y2 = partial[0] + partial[1]
    err = float((y2 - y1).abs().max() / y1.abs().max())
    if act_bits == 16:
        assert err < 1e-5, err  # float32 summation order only
        assert float((y2 - sim).abs().max() / sim.abs().max()) < 1e-5
    else:
        assert err < 3e-2, err  # per-rank activation scales: 8-bit noise, no more


def test_tp_size_not_dividing_r4_blocks_is_refused(vllm_env, emulate_tp):
    from vllm.model_executor.layers.linear import RowParallelLinear

    rotation = RotationSpec(r4={"kind": "hadamard", "size": SMOL_INTER, "factor_k": 12, "blocks": 2})
    qc = _quant_config(vllm_env, SPECS[0], rotation=rotation)  # tp_sizes [1, 2]
    emulate_tp(4, 0)
    with pytest.raises(CheckpointFormatError, match=r"tensor_parallel_size = 4: .*\[1, 2\] only.*"
                                                    r"rotation\.r4\.blocks = 2 diagonal blocks of 768"):
        RowParallelLinear(SMOL_INTER, SMOL_HIDDEN, bias=False, quant_config=qc,
                          params_dtype=torch.float32, prefix="model.layers.0.mlp.down_proj")
    # the per-layer guard behind it: a rank's slice must be whole blocks
    online = vllm_env._OnlineInput(qc, "model.layers.0.mlp.down_proj")
    online.check_input_size(768)
    with pytest.raises(CheckpointFormatError, match=r"rotation\.r4\.blocks = 2 .* 384 down_proj input"):
        online.check_input_size(384)


def test_16_bit_override_uses_unquantized_weight_with_online_input(vllm_env, emulate_tp):
    from vllm.model_executor.layers.linear import RowParallelLinear

    emulate_tp(1, 0)
    prefix = "model.layers.0.mlp.down_proj"
    qc = _quant_config(vllm_env, SPECS[0], layers={prefix: LayerOverride(weight_bits=16, act_bits=8)})
    layer = RowParallelLinear(INTER, HIDDEN, bias=False, quant_config=qc,
                              params_dtype=torch.float32, prefix=prefix)
    assert type(layer.quant_method).__name__ == "HadaquantUnquantizedLinearMethod"
    w = torch.randn(HIDDEN, INTER).to(torch.bfloat16)
    layer.weight.weight_loader(layer.weight, w)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, INTER)
    want = F.linear(offline_fake_quantize_per_token(x, 8, qc.config.activation.clip_ratio), w.float())
    torch.testing.assert_close(layer.quant_method.apply(layer, x), want)


def test_tp_size_not_in_checkpoint_is_refused(vllm_env, emulate_tp):
    from vllm.model_executor.layers.linear import RowParallelLinear

    emulate_tp(4, 0)
    qc = _quant_config(vllm_env, SPECS[0])
    with pytest.raises(CheckpointFormatError, match=r"tensor_parallel_size = 4: .* \[1, 2\] only"):
        RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=qc, params_dtype=torch.float32,
                          prefix="model.layers.0.self_attn.o_proj")


# --------------------------------------------------------------------------------------------
# Checks against the model, before vLLM loads anything (maybe_update_config)
# --------------------------------------------------------------------------------------------


def _hf(**changes) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": 2, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS}
    return {**config, **changes}


def test_model_checks_name_the_culprit(registered):
    from hq_vllm.format import UnsupportedArchitecture

    cls = registered.HadaquantQuantizationConfig
    plain = cls(HadaquantConfig(kv_cache=KVCacheSpec(bits=16)))
    plain.maybe_update_config("not-a-local-dir", hf_config=_hf())  # fine
    with pytest.raises(UnsupportedArchitecture, match="'GPT2LMHeadModel'.*supports: Llama"):
        plain.maybe_update_config("not-a-local-dir", hf_config=_hf(architectures=["GPT2LMHeadModel"]))
    r4 = cls(HadaquantConfig(kv_cache=KVCacheSpec(bits=16),
                             rotation=RotationSpec(r4={"kind": "hadamard", "size": 384, "factor_k": 12})))
    with pytest.raises(CheckpointFormatError, match=r"rotation.r4.size = 384: .* has 192"):
        r4.maybe_update_config("not-a-local-dir", hf_config=_hf())
    lm_head = cls(HadaquantConfig(kv_cache=KVCacheSpec(bits=16),
                                  layers={"lm_head": LayerOverride(weight_bits=4)}))
    with pytest.raises(CheckpointFormatError, match=r"layers\['lm_head'\].weight_bits = 4"):
        lm_head.maybe_update_config("not-a-local-dir", hf_config=_hf())


def test_checkpoint_tensors_validated_from_headers(registered, tmp_path, smollm2_dir):
    """A mis-shaped tensor in a real (tiny) checkpoint is named before vLLM loads weights."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from hq_vllm.offline.pipeline import QuantizeOptions, quantize_to_checkpoint
    from tests.tiny_models import tiny_model

    src = tmp_path / "tiny"
    tiny_model("llama", hidden=64, intermediate=128).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(smollm2_dir) / name, src / name)
    ckpt = quantize_to_checkpoint(src, tmp_path / "ckpt", QuantizeOptions(recipe="w4a16", group_size=32),
                                  progress=False).out_dir
    hf_config = json.loads((ckpt / "config.json").read_text())
    qc = registered.HadaquantQuantizationConfig.from_config(hf_config["quantization_config"])
    qc.maybe_update_config(str(ckpt), hf_config=hf_config)  # the pipeline's output passes

    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.scales"
    tensors[name] = tensors[name][:1].contiguous()
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=rf"tensor {name} is \[1, 64\] torch.float16, "
                                                    r"expected \[2, 64\]"):
        qc.maybe_update_config(str(ckpt), hf_config=hf_config)
