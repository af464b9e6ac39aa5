"""vLLM engines on real SmolLM2 hadaquant checkpoints, against the offline simulator.

Each engine runs in its own subprocess (``tests/vllm_runner.py``), found by vLLM through the
plugin entry point, exactly as ``vllm.LLM(ckpt)`` in user code. All engines start together and
the simulator runs in this process meanwhile; the broken checkpoints, which must fail while
vLLM builds its config, are tried first inside the W4A16 runner. Both sides compute in float32.

What "agrees with the simulator" can mean depends on the activation bits:

* **W4A16** (no activation quantization) is a continuous function of its inputs: vLLM and the
  simulator differ only by float32 summation order, so greedy tokens agree at >= 95% of
  positions (measured: all) and perplexity within 1% (measured: 3e-7 relative).
* **Quantized activations** make the network discontinuous: an activation within an ulp of a
  rounding boundary flips its code, and the flip propagates. Two float32 implementations that
  are not bit-identical (vLLM's CPU attention and fused ops vs transformers') therefore compute
  different, equally valid realizations of the quantization noise. The simulator itself shows
  it: perturbing its embeddings by 1e-6 (relative) moves W4A4 perplexity on these windows from
  130 to 119-120 and teacher-forced top-1 agreement with the unperturbed run to ~48%; W4A8
  moves perplexity by <0.5%, top-1 agreement ~96%, and free-running greedy agreement to 53-65%
  (one flipped near-tie changes all later tokens). So W4A8 is held to 1% perplexity and 90%
  teacher-forced top-1 agreement, and W4A4 to the simulator's own spread: its perplexity must
  lie within the range of an ensemble of perturbed simulator runs (widened by 3%), its top-1
  agreement at least 80% of the ensemble's self-agreement. Bit-exactness of the pieces
  (activation quantizer, R4, dequantized weights in vLLM's layers) is tested in
  ``test_vllm_plugin.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.vllm_checkpoints import edit_quant_config, quantized_checkpoint

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("vllm_runner.py")
MAX_TOKENS = 16
PPL_SEQ_LEN, PPL_WINDOWS = 256, 4
ENSEMBLE_SEEDS = (0, 1, 2)  # perturbed simulator runs for the W4A4 spread
ENGINE_TIMEOUT_S = 480

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "My favorite recipe for pancakes",
    "The stock market today",
    "A haiku about the ocean:",
    "The theory of relativity states that",
    "To install Python packages, you can use",
    "The largest planet in our solar system",
    "Dear hiring manager, I am writing to",
    "The quick brown fox",
]

#: Same packed tensors, different per-token activation specs (activation bits change nothing
#: stored, so one pipeline run serves all three; the KV cache stays at 16 bits in this slice).
ACTIVATIONS = {
    "w4a16": {"bits": 16, "clip_ratio": 1.0, "symmetric": True},
    "w4a8kv16": {"bits": 8, "clip_ratio": 0.9, "symmetric": True},
    "w4a4kv16": {"bits": 4, "clip_ratio": 0.9, "symmetric": True},
}


def _start(name: str, request: dict, workdir: Path) -> tuple[subprocess.Popen, Path, Path, Path]:
    """Start one runner; returns (process, result path, stdout path, stderr path)."""
    request = {**request, "out": str(workdir / f"{name}.json")}
    req_path = workdir / f"{name}.request.json"
    req_path.write_text(json.dumps(request))
    stdout, stderr = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, str(RUNNER), str(req_path)], stdout=out,
                                stderr=err, env=env, cwd=str(RUNNER.parent.parent))
    return proc, Path(request["out"]), stdout, stderr


def _error_checkpoints(good: Path, root: Path) -> dict[str, Path]:
    """Broken copies of a good checkpoint (other files linked, config.json or weights rewritten)."""
    from safetensors.torch import load_file, save_file

    def copy(name: str) -> Path:
        dst = root / name
        dst.mkdir()
        for f in good.iterdir():
            if f.name == "config.json":
                shutil.copyfile(f, dst / f.name)
            else:
                os.symlink(f, dst / f.name)
        return dst

    out = {}
    out["format_version_99"] = copy("format_version_99")
    edit_quant_config(out["format_version_99"], lambda q: q.update(format_version=99))
    out["weight_bits_9"] = copy("weight_bits_9")
    edit_quant_config(out["weight_bits_9"], lambda q: q["weight"].update(bits=9))
    missing = copy("missing_qweight")
    (missing / "model.safetensors").unlink()
    tensors = load_file(str(good / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.qweight"]
    save_file(tensors, str(missing / "model.safetensors"), metadata={"format": "pt"})
    out["missing_qweight"] = missing
    return out


@torch.inference_mode()
def _greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations without EOS stopping (vLLM side: ignore_eos), with HF's KV cache.

    Prompts are batched only with prompts of the same length, so there is no padding: the
    simulator's custom attention function is registered without a mask function, so
    transformers passes it no padding mask and left-padded rows would attend to their pads.
    """
    result: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    for rows in by_length.values():
        out = model(input_ids=torch.tensor([prompts[i] for i in rows]), use_cache=True)
        tokens = []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        for i, row in zip(rows, torch.cat(tokens, dim=1).tolist()):
            result[i] = row
    return result


@torch.inference_mode()
def _score(model, windows: torch.Tensor) -> dict:
    """Perplexity and the top-1 token at each position (teacher forced), like the runner."""
    nll, count, top1 = 0.0, 0, []
    for row in windows:
        logits = model(input_ids=row[None]).logits[0, :-1].float()
        nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
        count += row.numel() - 1
        top1.append(logits.argmax(-1).tolist())
    return {"ppl": math.exp(nll / count), "top1": top1}


@torch.inference_mode()
def _perturbed_scores(model, windows: torch.Tensor, seeds) -> list[dict]:
    """Scores with the embedding table scaled by (1 + 1e-6 * noise): the spread of equally
    valid float32 realizations of a quantized-activation model."""
    table = model.model.embed_tokens.weight
    original = table.clone()
    scores = []
    try:
        for seed in seeds:
            noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed))
            table.copy_(original * (1 + 1e-6 * noise))
            scores.append(_score(model, windows))
    finally:
        table.copy_(original)
    return scores


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    assert pairs and len(a) == len(b)
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Build the checkpoints, start every engine, run the simulator meanwhile, collect."""
    from transformers import AutoTokenizer

    from hq_vllm.offline.data import perplexity_batches
    from hq_vllm.offline.model_io import cached_model_dir
    from hq_vllm.offline.pipeline import load_checkpoint_simulated

    root = tmp_path_factory.mktemp("vllm_engine")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = Path(cached_model_dir("smollm2"))
    ckpts = {"w4a16": quantized_checkpoint(base, root / "w4a16", "w4a16", mse_clip=False)}
    for name, act in ACTIVATIONS.items():
        if name not in ckpts:
            ckpts[name] = root / name
            shutil.copytree(ckpts["w4a16"], ckpts[name])
            edit_quant_config(ckpts[name],
                              lambda q, act=act, name=name: q.update(activation=act, recipe=name))
    broken = _error_checkpoints(ckpts["w4a16"], root)
    bad_models = [{"name": name, "model": str(path)} for name, path in broken.items()]
    bad_models.append({"name": "plain_model_flag", "model": str(base), "quantization": "hadaquant"})
    timings["checkpoints"] = time.perf_counter() - t0

    tokenizer = AutoTokenizer.from_pretrained(str(ckpts["w4a16"]))
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    windows = perplexity_batches(tokenizer, PPL_SEQ_LEN, max_sequences=PPL_WINDOWS)
    request = {"prompts": prompts, "max_tokens": MAX_TOKENS, "ppl_windows": windows.tolist(),
               "dtype": "float32"}

    t1 = time.perf_counter()
    procs = {}
    for name, ckpt in ckpts.items():
        req = {**request, "model": str(ckpt)}
        if name == "w4a16":  # explicit --quantization here, auto-detection from config.json elsewhere
            req.update(quantization="hadaquant", bad_models=bad_models)
        procs[name] = _start(name, req, root)

    # One thread: the engines' workers run one each, and two OpenMP threads fighting them for
    # 2 cores are many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sim = {}
    try:
        for name, ckpt in ckpts.items():
            model, _, _, _ = load_checkpoint_simulated(ckpt, dtype=torch.float32)
            sim[name] = _score(model, windows)
            if name == "w4a16":  # free-running greedy is only comparable without activation quant
                sim[name]["tokens"] = _greedy(model, prompts, MAX_TOKENS)
            if name == "w4a4kv16":
                sim[name]["ensemble"] = _perturbed_scores(model, windows, ENSEMBLE_SEEDS)
            del model
    finally:
        torch.set_num_threads(threads)
    timings["simulator"] = time.perf_counter() - t1

    results = {}
    for name, (proc, out, stdout, stderr) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, ENGINE_TIMEOUT_S - (time.perf_counter() - t1)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        results[name] = {"rc": rc, "stderr": stderr.read_text(),
                         "log": stdout.read_text() + stderr.read_text(),
                         "out": json.loads(out.read_text()) if out.exists() else None}
    timings["engines"] = time.perf_counter() - t1
    (root / "timings.json").write_text(json.dumps(timings))
    (root / "simulator.json").write_text(json.dumps(sim))  # beside the runners' results, for triage
    return {"sim": sim, "vllm": results, "timings": timings}


def _engine(run, name: str) -> dict:
    r = run["vllm"][name]
    assert r["rc"] == 0 and r["out"] is not None, f"vLLM run {name} failed:\n{r['log'][-6000:]}"
    assert r["out"]["quantization"] == "hadaquant"
    return r["out"]


def _ppl(out: dict) -> float:
    assert out["num_predicted"] == PPL_WINDOWS * (PPL_SEQ_LEN - 1)
    return math.exp(out["nll_sum"] / out["num_predicted"])


def test_w4a16_greedy_tokens_match_simulator(run):
    out, sim = _engine(run, "w4a16"), run["sim"]["w4a16"]
    assert len(out["tokens"]) == len(sim["tokens"]) == len(PROMPTS)
    assert _agreement(out["tokens"], sim["tokens"]) >= 0.95, (out["tokens"], sim["tokens"])


@pytest.mark.parametrize("name, min_top1", [("w4a16", 0.99), ("w4a8kv16", 0.90)])
def test_perplexity_and_top1_match_simulator(run, name, min_top1):
    out, sim = _engine(run, name), run["sim"][name]
    assert abs(_ppl(out) / sim["ppl"] - 1) < 0.01, (_ppl(out), sim["ppl"])
    assert _agreement(out["top1"], sim["top1"]) >= min_top1


def test_w4a4_within_the_simulators_own_spread(run):
    out, sim = _engine(run, "w4a4kv16"), run["sim"]["w4a4kv16"]
    ppls = [sim["ppl"]] + [s["ppl"] for s in sim["ensemble"]]
    assert min(ppls) / 1.03 <= _ppl(out) <= max(ppls) * 1.03, (_ppl(out), ppls)
    self_agreement = min(_agreement(s["top1"], sim["top1"]) for s in sim["ensemble"])
    assert _agreement(out["top1"], sim["top1"]) >= 0.8 * self_agreement


def test_activation_bits_are_honoured(run):
    """Same tensors, three activation specs: perplexity must rise as activation bits fall (the
    plugin really applies the per-layer activation spec, not the W4A16 path for all)."""
    a16, a8, a4 = (_ppl(_engine(run, n)) for n in ("w4a16", "w4a8kv16", "w4a4kv16"))
    assert a16 < a8 < a4 and a4 > 1.5 * a16, (a16, a8, a4)


@pytest.mark.parametrize(
    "name, message",
    [
        ("format_version_99", r"quantization_config.format_version = 99: this checkpoint is newer"),
        ("weight_bits_9", r"quantization_config.weight.bits = 9: out of range"),
        ("missing_qweight", r"missing tensor model.layers.1.mlp.down_proj.qweight \(expected "
                            r"\[192, 576\] torch.int32 for the 4-bit linear"),
        ("plain_model_flag", r"--quantization hadaquant needs a hadaquant checkpoint"),
    ],
)
def test_bad_checkpoint_fails_with_our_message(run, name, message):
    """Each broken checkpoint fails in ``vllm.LLM(...)`` with our message on stderr.

    (A TP degree outside ``tp_sizes`` fails later, when the worker builds the model; that check
    is exercised in test_vllm_plugin.py without the cost of an engine start.)
    """
    r = run["vllm"]["w4a16"]
    assert r["out"] is not None and r["out"]["bad_models"][name] == "failed", r["log"][-6000:]
    section = re.search(rf"=== bad model {name} ===\n(.*?)=== end {name} ===", r["stderr"], re.S)
    assert section is not None, r["stderr"][-6000:]
    assert re.search(message, section.group(1)), section.group(1)[-6000:]
