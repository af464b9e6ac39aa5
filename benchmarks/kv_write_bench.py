"""The fused KV-cache write (kernels/kv_write.py) on the GPU: correctness against the torch
reference, then speed against today's torch path, eager and in CUDA graphs.

    PYTHONPATH=. python benchmarks/kv_write_bench.py [--bits 3 4] [--tokens 1 8 64 256 2048 8192]
        [--models llama3-8b llama2-7b qwen2.5-7b smollm2] [--sweep] [--out DIR] [--dry-run]

Correctness (fresh random K/V of very different row ranges, never exact zeros, on the device):
bits 2-8, head_dim 64/128 (and 96: the table path), bf16/fp16/fp32, symmetric and asymmetric,
R3 on and off, scattered slots with padding (-1) and a garbage-filled cache. Per case: whether
the bytes equal the reference's (``write_kv_cache_reference``: R3 by the torch butterflies) and
today's GPU path's (R3 by the Triton FWHT, then torch quantize + write), the fraction of codes
that differ, the largest dequantized difference in quantization steps (<= 1 is a rounding tie
moved by float reordering), and whether any byte outside the batch's slots changed (must not).

Speed: one layer's write of ``tokens`` new tokens (decode batch = tokens, or one prefill chunk),
bf16 K/V, vLLM's 16-token pages, slots scattered over a cache of several L2 sizes; each timed
call writes other K/V rows (rotating over copies) so reads come from HBM. Times: CUDA events
around a run of eager calls (includes Python and launch), and per call in a CUDA-graph replay
(the kernel only; today's path reads the slot mapping on the host, so it cannot be captured).
Bytes: K and V read plus slots written, against a device-to-device copy's bandwidth.
``--sweep`` also times the tile / warp variants (``_ROW_ELEMS``, ``_NUM_WARPS``) in graphs.
Prints a table last; writes the results as JSON to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cuda_bench import graph_time, hbm_copy_bandwidth, import_kernels, wall_time

ROOT = Path(__file__).resolve().parents[1]

kv_cache, kv_write, fwht = import_kernels("kv_cache", "kv_write", "fwht")

MODELS = {"llama3-8b": (8, 128), "llama2-7b": (32, 128), "qwen2.5-7b": (4, 128), "smollm2": (3, 64)}  # KV heads, D
PAGE = 16
ROTATE_BYTES = 256 << 20  # bytes touched before inputs / cache pages are reused (several L2 sizes)
MAX_COPIES = 16
SWEEP = [(1024, 2), (2048, 2), (2048, 4), (4096, 4), (4096, 8)]  # (_ROW_ELEMS, _NUM_WARPS)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def event_time(fn, count: int, reps: int = 5) -> float:
    """Seconds per call over runs of ``count`` eager calls (CUDA events, after a warm-up run)."""
    for i in range(count):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(count):
            fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / count)
    return statistics.median(times)


def random_kv(t, h, d, dtype, device, g):
    spread = torch.exp(2 * torch.randn(t, h, 1, generator=g, device=device))
    k = torch.randn(t, h, d, generator=g, device=device) * spread + 0.3 * spread
    v = torch.randn(t, h, d, generator=g, device=device) * spread
    k, v = (torch.where(x == 0, torch.full_like(x, 1e-3), x).to(dtype) for x in (k, v))
    return k, v


def today_path(key, value, cache, slot_mapping, *, bits, clip_ratio, symmetric, value_clip_ratio, rotate):
    """The backend's cache write before the fused kernel (hq_vllm/attention.py's torch path)."""
    n = slot_mapping.shape[0]
    k = fwht.hadamard_transform(key[:n]) if rotate else key[:n]
    slots = kv_cache.quantize_kv_to_slots(k, value[:n], bits, clip_ratio, symmetric, value_clip_ratio=value_clip_ratio)
    kv_cache.write_kv_slots(cache, slots, slot_mapping)


def compare(got, want, start, slot_mapping, d, bits) -> dict:
    """Bytes equal?, fraction of differing codes, worst dequantized difference in steps, and
    whether a byte outside the written slots changed."""
    nb, h, page, _ = start.shape
    written = torch.zeros(nb * page, dtype=torch.bool, device=start.device)
    written[slot_mapping[slot_mapping >= 0].long()] = True
    written = written.view(nb, page).unsqueeze(1).expand(nb, h, page)
    outside = not torch.equal(got[~written], start[~written])
    g, w = got[written], want[written]
    cb = bits * d // 8
    codes_g = torch.cat([kv_cache._unpack_rows(g[:, i * cb:(i + 1) * cb], bits, d) for i in range(2)], 1)
    codes_w = torch.cat([kv_cache._unpack_rows(w[:, i * cb:(i + 1) * cb], bits, d) for i in range(2)], 1)
    kg, vg = kv_cache.dequantize_kv_slots(g, d, bits)
    kw_, vw = kv_cache.dequantize_kv_slots(w, d, bits)
    steps = 0.0
    for i, (a, b) in enumerate(((kg, kw_), (vg, vw))):
        sg = g[:, 2 * cb + 2 * i:2 * cb + 2 * i + 2].contiguous().view(torch.float16).float()
        sw = w[:, 2 * cb + 2 * i:2 * cb + 2 * i + 2].contiguous().view(torch.float16).float()
        steps = max(steps, ((a - b).abs() / torch.maximum(sg, sw)).max().item())
    return {"equal": torch.equal(got, want), "codes_differ": (codes_g != codes_w).float().mean().item(),
            "max_steps": steps, "outside_changed": outside}


def correctness(device, tokens: int = 300, every: int = 1) -> list[dict]:
    """Kernel vs reference (and today's path) on this device; ``every``: a subset of the cases."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    cases = [(bits, d, dtype, sym, rot)
             for bits in (3, 4, 8) for d in (64, 128) for dtype in (torch.bfloat16, torch.float32)
             for sym in (False, True) for rot in (True, False)]
    cases += [(bits, 128, torch.bfloat16, False, True) for bits in (2, 5, 6, 7)]
    cases += [(3, 128, torch.float16, False, True), (3, 96, torch.bfloat16, False, True),
              (4, 96, torch.float32, True, True)]
    for bits, d, dtype, sym, rot in cases[::every]:
        t, h, n_blocks = tokens, 4, -(-tokens // PAGE) + 3
        k, v = random_kv(t + 5, h, d, dtype, device, g)
        start = torch.randint(0, 256, (n_blocks, h, PAGE, kv_cache.kv_slot_bytes(d, bits)), generator=g,
                              device=device, dtype=torch.uint8)
        slots = torch.randperm(n_blocks * PAGE, generator=g, device=device)[:t]
        slots[torch.randperm(t, generator=g, device=device)[:7]] = -1
        args = dict(bits=bits, clip_ratio=0.9, symmetric=sym, value_clip_ratio=0.8, rotate=rot)
        out = {}
        for name, fn in (("kernel", kv_write.write_kv_cache), ("reference", kv_write.write_kv_cache_reference),
                         ("today", today_path)):
            out[name] = start.clone()
            fn(k, v, out[name], slots, **args)
        vs_ref = compare(out["kernel"], out["reference"], start, slots, d, bits)
        vs_today = compare(out["kernel"], out["today"], start, slots, d, bits)
        ok = not vs_ref["outside_changed"] and vs_ref["max_steps"] <= 1.01 and vs_ref["codes_differ"] <= 2e-3
        ok = ok and (vs_ref["equal"] or rot)  # without R3 the bytes must be equal
        rows.append({"bits": bits, "d": d, "dtype": str(dtype).split(".")[-1], "symmetric": sym, "r3": rot,
                     "ok": ok, "vs_reference": vs_ref, "vs_today": vs_today})
    return rows


def bench_case(model, tokens, bits, device, hbm, sweep) -> dict:
    h, d = MODELS[model]
    g = torch.Generator(device=device).manual_seed(tokens)
    slot = kv_cache.kv_slot_bytes(d, bits)
    call_bytes = tokens * h * (2 * d * 2 + slot)  # bf16 K and V read, slots written
    copies = max(1, min(MAX_COPIES, ROTATE_BYTES // max(call_bytes, 1)))
    n_blocks = max(-(-tokens * copies // PAGE) + 1, ROTATE_BYTES // (h * PAGE * slot))
    cache = torch.zeros(n_blocks, h, PAGE, slot, dtype=torch.uint8, device=device)
    pool = torch.randperm(n_blocks * PAGE, generator=g, device=device)
    inputs = []
    for c in range(copies):
        k, v = random_kv(tokens, h, d, torch.bfloat16, device, g)
        inputs.append((k, v, pool[c * tokens:(c + 1) * tokens].clone()))
    args = dict(bits=bits, clip_ratio=0.9, symmetric=False, value_clip_ratio=None, rotate=True)

    def kernel(i):
        k, v, s = inputs[i % copies]
        kv_write.write_kv_cache(k, v, cache, s, **args)

    def today(i):
        k, v, s = inputs[i % copies]
        today_path(k, v, cache, s, **args)

    count = 2 * copies if copies > 1 else 20
    if device.type != "cuda":
        count = 2
    t_eager = event_time(kernel, count)
    t_graph = graph_time(kernel, count)
    t_today = event_time(today, count)
    row = {"model": model, "tokens": tokens, "bits": bits, "kv_heads": h, "d": d,
           "kernel_eager_us": t_eager * 1e6, "kernel_graph_us": t_graph * 1e6, "today_eager_us": t_today * 1e6,
           "graph_GBps": call_bytes / t_graph / 1e9, "graph_pct_hbm": 100 * call_bytes / t_graph / 1e9 / hbm}
    if sweep:
        saved = (kv_write._ROW_ELEMS, kv_write._NUM_WARPS)
        row["sweep"] = {}
        try:
            for elems, warps in SWEEP:
                kv_write._ROW_ELEMS, kv_write._NUM_WARPS = elems, warps
                row["sweep"][f"{elems}x{warps}w"] = graph_time(kernel, count) * 1e6
        finally:
            kv_write._ROW_ELEMS, kv_write._NUM_WARPS = saved
    return row


def _dry_run_setup() -> None:
    """Make the script run on a CPU machine (to check it before spending device time)."""
    import os

    global MODELS, ROTATE_BYTES, MAX_COPIES, hbm_copy_bandwidth, event_time, graph_time, correctness
    os.environ["TRITON_INTERPRET"] = "1"
    MODELS = {"tiny-gqa": (2, 64), "tiny-d128": (1, 128)}
    ROTATE_BYTES, MAX_COPIES = 1 << 16, 2
    check = correctness
    correctness = lambda device: check(device, tokens=24, every=5)  # noqa: E731  (tests cover the rest)
    hbm_copy_bandwidth = lambda device: 1.0  # noqa: E731
    event_time = graph_time = wall_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 2048, 8192])
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"of {list(MODELS)}")
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP tile / warp variants")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness pass")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default=None, help="file name tag (default: device and date)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test of this script: interpreter, tiny shapes, wall-clock timers")
    args = p.parse_args()
    if args.dry_run:
        _dry_run_setup()
        args.models = list(MODELS)
        args.tokens = [t for t in args.tokens if t <= 8] or [4]
    device = torch.device("cpu" if args.dry_run else "cuda")
    import triton

    header = (f"{_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
              f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    hbm = hbm_copy_bandwidth(device)
    print(f"HBM device-to-device copy: {hbm:.0f} GB/s (read + written)", flush=True)
    result = {"header": header, "hbm_GBps": hbm}
    tag = args.tag or ("dry_run" if args.dry_run else
                       f"{_device_name(device).split()[-1].lower()}_{time.strftime('%Y-%m-%d')}")
    path = args.out if args.out.suffix == ".json" else args.out / f"kv_write_{tag}.json"

    def save():
        if not args.dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))

    t0 = time.time()
    if not args.skip_check:
        checks = correctness(device)
        result["correctness"] = checks
        bad = [c for c in checks if not c["ok"]]
        n_equal = sum(c["vs_reference"]["equal"] for c in checks)
        n_today = sum(c["vs_today"]["equal"] for c in checks)
        worst = max(c["vs_reference"]["codes_differ"] for c in checks)
        print(f"[{time.time() - t0:5.0f}s] correctness: {len(checks)} cases, {len(bad)} failed; bytes equal to "
              f"the reference in {n_equal}, to today's GPU path in {n_today}; worst differing codes {worst:.1e}",
              flush=True)
        for c in bad:
            print("  FAIL", c, flush=True)
        save()
    rows = []
    result["rows"] = rows
    try:  # an interrupt (timeout -s INT) still prints the table of what was measured
        for model in args.models:
            for bits in args.bits:
                for tokens in args.tokens:
                    r = bench_case(model, tokens, bits, device, hbm, args.sweep)
                    rows.append(r)
                    print(f"[{time.time() - t0:5.0f}s] {model} {bits}b {tokens} tokens: graph "
                          f"{r['kernel_graph_us']:.1f} us, eager {r['kernel_eager_us']:.1f} us, today "
                          f"{r['today_eager_us']:.1f} us" + ("; graph us by variant: " + ", ".join(
                              f"{k} {t:.1f}" for k, t in r["sweep"].items()) if "sweep" in r else ""),
                          flush=True)
                    save()
    except KeyboardInterrupt:
        print("interrupted: table of the cases measured so far", flush=True)
    save()
    print(f"\n{header}\n{'model':<11} {'bits':>4} {'tokens':>6} {'graph us':>9} {'GB/s':>7} {'%HBM':>5} "
          f"{'eager us':>9} {'today us':>9} {'today/graph':>11}")
    for r in rows:
        print(f"{r['model']:<11} {r['bits']:>4} {r['tokens']:>6} {r['kernel_graph_us']:>9.1f} {r['graph_GBps']:>7.0f} "
              f"{r['graph_pct_hbm']:>5.1f} {r['kernel_eager_us']:>9.1f} {r['today_eager_us']:>9.1f} "
              f"{r['today_eager_us'] / r['kernel_graph_us']:>11.1f}")
    if not args.dry_run:
        print(f"results: {path}")


if __name__ == "__main__":
    main()
