"""Weight-only dequant GEMM (kernels/gemm.py) on the GPU: correctness, then speed against the
device's measured HBM bandwidth and against torch's bf16 matmul, at decode batch sizes.

    PYTHONPATH=. python benchmarks/gemm_bench.py [--bits 3 4] [--m 1 16 64] [--sweep] [--out DIR]
    PYTHONPATH=. python benchmarks/gemm_bench.py --sweep --bits 3 4 --m 1 2 4 8 --out DIR  # GEMV sweep
    python benchmarks/gemm_bench.py --sass          # CPU only: registers / SASS of the GEMV tiles

Shapes: Llama-2-7B (4096 -> 12288 qkv, 4096 -> 4096 o, 4096 -> 22016 gate_up, 11008 -> 4096 down)
and Qwen2.5-7B (3584 -> 4608 qkv, 3584 -> 3584 o, 3584 -> 37888 gate_up, 18944 -> 3584 down),
random packed weights, group size 128, symmetric. Bytes counted: packed weights + scales +
activations read, output written. Times: CUDA-profiler kernel durations (the kernel alone, what
the roofline is about) and CUDA-graph replay per call (kernel plus the launch gap in a graph).
Weights rotate over enough copies that each pass is several times the L2. The HBM ceiling is a
large device-to-device copy (bytes read + written). ``--sweep`` first checks every GEMV sweep
tile against the reference (M = 1..8, W3/W4, sym/asym, ragged N and K), then also times the
configurations of SWEEP at every shape: for M = 1 the GEMV tiles (block_n, block_k, warps) x
resident-warps targets (HQ_GEMM_GEMV_WARPS_PER_SM), the minimum tiles per split
(HQ_GEMM_GEMV_MIN_TILES) and the plain nibble unpack (-noasm, HQ_GEMM_GEMV_ASM_BITSEL=0); for
2 <= M <= 8 the default GEMV against the dot path (HQ_GEMM_GEMV_MAX_M). It reports the best per shape and, last, a summary per
configuration (mean % HBM over the shapes) from which the defaults are picked; they are set
without code edits by the HQ_GEMM_GEMV_* environment variables (kernels/gemm.py). ``--budget-s``
stops the sweep in time to print. ``--sass`` compiles the GEMV tiles for sm_90 on the CPU and
prints registers, spills, shared memory, inner-loop SASS instructions per weight, load widths
and the resident warps per SM the registers allow. Prints a table last; with ``--out`` writes
the full results as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from cuda_bench import graph_time, hbm_copy_bandwidth, import_kernels, wall_time

ROOT = Path(__file__).resolve().parents[1]


(gemm,) = import_kernels("gemm")

SHAPES = [  # (model, layer, K, N)
    ("llama2-7b", "qkv", 4096, 12288),
    ("llama2-7b", "o", 4096, 4096),
    ("llama2-7b", "gate_up", 4096, 22016),
    ("llama2-7b", "down", 11008, 4096),
    ("qwen2.5-7b", "qkv", 3584, 4608),
    ("qwen2.5-7b", "o", 3584, 3584),
    ("qwen2.5-7b", "gate_up", 3584, 37888),
    ("qwen2.5-7b", "down", 18944, 3584),
]
GROUP = 128
#: --sweep, M = 1: GEMV tiles (block_n, block_k, num_warps) x resident-warp targets per SM (the
#: split-K heuristic's HQ_GEMM_GEMV_WARPS_PER_SM); the dot path's default is timed beside them.
SWEEP_GEMV_TILES = [(256, 256, 8), (256, 128, 4), (512, 128, 4), (512, 256, 8), (128, 128, 4), (256, 64, 2)]
SWEEP_WARPS_PER_SM = [16, 24, 32, 48]
SWEEP_MIN_TILES = [2, 4]  # HQ_GEMM_GEMV_MIN_TILES (default 1), for the first two tiles
CHECK_NK = (1000, 2944)  # the sweep's correctness check: N, K
CHECK_CASES = [(3, True, 128, 1), (3, False, 64, 3), (4, True, -1, 8), (4, False, 128, 1), (3, True, 64, 2)]
ROTATE_BYTES = 512 << 20  # weight bytes per rotation (several L2 sizes)


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def random_linear(n: int, k: int, bits: int, device) -> tuple:
    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    qweight = torch.randint(-2**31, 2**31 - 1, (bits * k // 32, n), generator=g, device=device, dtype=torch.int32)
    scales = (torch.rand(k // GROUP, n, generator=g, device=device) * 0.02 + 0.001).half()
    return qweight, scales


def kernel_time(fn, calls: int) -> float:
    """Mean summed GPU kernel time per call (seconds), from the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / calls / 1e6


def gemv_plan(m, n, k, device, block_n, block_k, warps, warps_per_sm=None, min_tiles=None):
    """The GEMV plan the heuristic would pick with these tunables (``HQ_GEMM_GEMV_*``)."""
    saved = gemm._GEMV_WARPS_PER_SM, gemm._GEMV_MIN_TILES
    try:
        if warps_per_sm is not None:
            gemm._GEMV_WARPS_PER_SM = warps_per_sm
        if min_tiles is not None:
            gemm._GEMV_MIN_TILES = min_tiles
        return gemm.plan_dequant_gemm(m, n, k, device, use_dot=False, block_n=block_n, block_k=block_k,
                                      num_warps=warps)
    finally:
        gemm._GEMV_WARPS_PER_SM, gemm._GEMV_MIN_TILES = saved


def sweep_plans(m, n, k, device) -> dict:
    plans = {}
    if m == 1:
        for bn, bk, w in SWEEP_GEMV_TILES:
            for wps in SWEEP_WARPS_PER_SM:
                plans[f"gemv-n{bn}-k{bk}-w{w}-wps{wps}"] = gemv_plan(m, n, k, device, bn, bk, w, wps)
        for wps in (16, 24):  # the 16-column tile capped at 128 registers (spills a little)
            plans[f"gemv-n512-k128-w4-wps{wps}-r128"] = dataclasses.replace(
                gemv_plan(m, n, k, device, 512, 128, 4, wps), max_registers=128)
        for bn, bk, w in SWEEP_GEMV_TILES[:2]:
            for mt in SWEEP_MIN_TILES:
                plans[f"gemv-n{bn}-k{bk}-w{w}-min{mt}"] = gemv_plan(m, n, k, device, bn, bk, w, min_tiles=mt)
    if m <= 8:
        plans["gemv"] = gemv_plan(m, n, k, device, gemm._GEMV_BLOCK_N, gemm._GEMV_BLOCK_K, gemm._GEMV_WARPS)
        plans["gemv-noasm"] = plans["gemv"]  # HQ_GEMM_GEMV_ASM_BITSEL=0: the plain and/or nibble words
        plans["dot"] = gemm.plan_dequant_gemm(m, n, k, device, use_dot=True)
    return plans


def check_gemv_tiles(device, all_tiles: bool = True) -> str:
    """Every sweep tile (or only the default) against the reference before any timing: M = 1..8,
    W3/W4, symmetric/asymmetric, group 64/128/per-channel, N and K not multiples of the tiles."""
    worst, count = 0.0, 0
    tiles = {(gemm._GEMV_BLOCK_N, gemm._GEMV_BLOCK_K, gemm._GEMV_WARPS)}
    tiles = sorted(tiles | set(SWEEP_GEMV_TILES) if all_tiles else tiles)
    cases = CHECK_CASES
    for bn, bk, w in tiles:
        for bits, sym, group, m in cases:
            n, k = CHECK_NK  # GPU: 92 blocks, 23 groups of 128 (46 of 64)
            g = torch.Generator(device=device).manual_seed(bn + bk + bits + m)
            qweight = torch.randint(-2**31, 2**31 - 1, (bits * k // 32, n), generator=g, device=device,
                                    dtype=torch.int32)
            groups = 1 if group == -1 else k // group
            scales = (torch.rand(groups, n, generator=g, device=device) * 0.02 + 0.001).half()
            zeros = None if sym else torch.randint(0, 2**bits, (groups, n), generator=g, device=device,
                                                    dtype=torch.uint8)
            x = torch.randn(m, k, generator=g, device=device).bfloat16()
            want = gemm.dequant_gemm_reference(x, qweight, scales, zeros, bits, group, out_dtype=torch.float32)
            for wps in (SWEEP_WARPS_PER_SM[0], SWEEP_WARPS_PER_SM[-1]):
                plan = gemv_plan(m, n, k, device, bn, bk, w, wps)
                y = gemm.dequant_gemm(x, qweight, scales, zeros, bits, group, out_dtype=torch.float32, plan=plan)
                rel = ((y - want).norm() / want.norm()).item()
                assert rel < 1e-4, (bn, bk, w, wps, bits, sym, group, m, plan, rel)
                y2 = gemm.dequant_gemm(x, qweight, scales, zeros, bits, group, out_dtype=torch.float32, plan=plan)
                assert torch.equal(y, y2), "split-K result not deterministic"
                worst, count = max(worst, rel), count + 1
    return f"GEMV tiles checked: {count} launches, worst rel err {worst:.1e} (float32 out), deterministic"


def bench_shape(model, layer, k, n, bits, m, device, hbm, sweep):
    copies = max(2, ROTATE_BYTES // (bits * k * n // 8))
    weights = [random_linear(n, k, bits, device) for _ in range(copies)]
    x = torch.randn(m, k, device=device).bfloat16()
    # Correctness on this GPU: fresh random inputs against the torch reference.
    y = gemm.dequant_gemm(x, *weights[0], None, bits, GROUP)
    want = gemm.dequant_gemm_reference(x, *weights[0], None, bits, GROUP, out_dtype=torch.float32)
    rel = ((y.float() - want).norm() / want.norm()).item()
    nbytes = bits * k * n / 8 + weights[0][1].numel() * 2 + m * k * 2 + m * n * 2
    flops = 2 * m * n * k

    plans = {"default": gemm.plan_dequant_gemm(m, n, k, x.device)}
    if sweep:
        plans.update(sweep_plans(m, n, k, x.device))
    results = {}
    for name, plan in plans.items():
        def call(i, plan=plan, asm=not name.endswith("-noasm")):
            saved, gemm._GEMV_ASM_BITSEL = gemm._GEMV_ASM_BITSEL, asm and gemm._GEMV_ASM_BITSEL
            try:
                return gemm.dequant_gemm(x, *weights[i % copies], None, bits, GROUP, plan=plan)
            finally:
                gemm._GEMV_ASM_BITSEL = saved
        try:
            call(0)
            if name != "default":  # every configuration must also be right
                yc = call(0).float()
                rel_c = ((yc - want).norm() / want.norm()).item()
                if not rel_c < 1e-2:
                    results[name] = {"error": f"rel {rel_c:.2e}"}
                    continue
            t = kernel_time(call, 3 * copies if name == "default" else copies)  # the sweep: one pass
            results[name] = {"kernel_s": t, "plan": plan.__dict__}
        except Exception as e:  # a configuration that does not compile or fit is reported, not fatal
            results[name] = {"error": repr(e)[:200]}
    ok = {kk: v for kk, v in results.items() if "kernel_s" in v}
    best = min(ok, key=lambda kk: ok[kk]["kernel_s"])
    plan = plans["default"]
    t_graph = graph_time(lambda i: gemm.dequant_gemm(x, *weights[i % copies], None, bits, GROUP, plan=plan),
                         copies)

    # torch bf16 baseline at the same shape.
    w_copies = max(2, ROTATE_BYTES // (2 * k * n))
    w16 = [torch.randn(n, k, device=device).bfloat16() for _ in range(min(w_copies, 32))]
    t16 = kernel_time(lambda i: torch.nn.functional.linear(x, w16[i % len(w16)]), 3 * len(w16))
    t16_graph = graph_time(lambda i: torch.nn.functional.linear(x, w16[i % len(w16)]), len(w16))
    bytes16 = 2 * k * n + m * k * 2 + m * n * 2
    t = ok["default"]["kernel_s"]
    return {
        "model": model, "layer": layer, "K": k, "N": n, "bits": bits, "M": m, "rel_err": rel,
        "bytes": nbytes, "hbm_GBps": hbm,
        "kernel_us": t * 1e6, "graph_us": t_graph * 1e6, "GBps": nbytes / t / 1e9,
        "pct_hbm": 100 * nbytes / t / 1e9 / hbm, "TFLOPs": flops / t / 1e12,
        "bf16_kernel_us": t16 * 1e6, "bf16_graph_us": t16_graph * 1e6,
        "bf16_pct_hbm": 100 * bytes16 / t16 / 1e9 / hbm,
        "speedup_vs_bf16": t16 / t, "best": best, "best_us": ok[best]["kernel_s"] * 1e6,
        "best_pct_hbm": 100 * nbytes / ok[best]["kernel_s"] / 1e9 / hbm,
        "configs": results, "default_plan": plan.__dict__,
    }


def compile_check(device) -> str:
    """The custom op under torch.compile(fullgraph=True, aot_eager): dynamo and AOTAutograd
    trace it through its fake implementation, no graph break."""
    qweight, scales = random_linear(4096, 4096, 3, device)
    x = torch.randn(1, 4096, device=device).bfloat16()
    fn = torch.compile(lambda x: torch.ops.hadaquant.dequant_gemm(x, qweight, scales, None, None, 3, GROUP) * 2,
                       fullgraph=True, backend="aot_eager")
    y = fn(x)
    want = 2 * gemm.dequant_gemm_reference(x, qweight, scales, None, 3, GROUP, out_dtype=torch.float32)
    return f"torch.compile(fullgraph) ok, rel {((y.float() - want).norm() / want.norm()).item():.1e}"


def _dry_run_setup() -> None:
    """Make the script run on a CPU machine (to check it before spending device time)."""
    import os

    global SHAPES, ROTATE_BYTES, hbm_copy_bandwidth, kernel_time, graph_time, CHECK_NK
    global SWEEP_GEMV_TILES, SWEEP_WARPS_PER_SM, CHECK_CASES
    os.environ["TRITON_INTERPRET"] = "1"
    SHAPES = [("tiny", "a", 640, 72), ("tiny", "b", 1536, 40)]
    SWEEP_GEMV_TILES, SWEEP_WARPS_PER_SM, CHECK_NK = SWEEP_GEMV_TILES[:1], SWEEP_WARPS_PER_SM[:2], (200, 384)
    global SWEEP_MIN_TILES
    SWEEP_MIN_TILES = SWEEP_MIN_TILES[:1]
    CHECK_CASES = CHECK_CASES[:2]
    ROTATE_BYTES = 1
    hbm_copy_bandwidth = lambda device: 1.0  # noqa: E731

    kernel_time = graph_time = wall_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--sweep", action="store_true",
                   help="check, then also time, the GEMV sweep configurations (and GEMV vs dot for M <= 8)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="stop starting new shapes after this many seconds (the table still prints)")
    p.add_argument("--sass", action="store_true",
                   help="CPU only: compile the GEMV tiles for sm_90, print registers and SASS per weight")
    p.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
    p.add_argument("--out", type=Path)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test of this script: interpreter, tiny shapes, wall-clock timers")
    args = p.parse_args()
    if args.sass:
        return sass_report(args.bits)
    if args.dry_run:
        _dry_run_setup()
    device = torch.device("cpu" if args.dry_run else "cuda")
    import triton

    header = (f"{_device_name(device)}, {_sm_count(device)} SMs, torch {torch.__version__}, "
              f"triton {triton.__version__}, python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    hbm = hbm_copy_bandwidth(device)
    print(f"HBM device-to-device copy: {hbm:.0f} GB/s (read + written)", flush=True)
    print(compile_check(device), flush=True)
    try:  # before any timing; the inline-PTX unpack is only ever executed on the GPU
        print(check_gemv_tiles(device, all_tiles=args.sweep), flush=True)
    except AssertionError as e:
        if not gemm._GEMV_ASM_BITSEL:
            raise
        print(f"GEMV check FAILED with the inline-PTX bit-selects ({str(e)[:300]}); "
              "continuing with HQ_GEMM_GEMV_ASM_BITSEL=0", flush=True)
        gemm._GEMV_ASM_BITSEL = False
        print(check_gemv_tiles(device, all_tiles=args.sweep), flush=True)
    rows = []
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    t0 = time.time()
    try:  # an interrupt (timeout -s INT) still prints the table of what was measured
        for bits in args.bits:
            for m in args.m:
                for model, layer, k, n in shapes:
                    if time.time() - t0 > args.budget_s:
                        raise KeyboardInterrupt
                    r = bench_shape(model, layer, k, n, bits, m, device, hbm, args.sweep)
                    torch.cuda.empty_cache()  # the shape's weight copies are gone
                    rows.append(r)
                    print(f"[{time.time() - t0:5.0f}s] W{bits} M={m:<3} {model:10s} {layer:7s} {k:>5}->{n:<5} "
                          f"{r['kernel_us']:7.1f} us {r['GBps']:6.0f} GB/s {r['pct_hbm']:5.1f}% "
                          f"rel {r['rel_err']:.1e} | best {r['best']} {r['best_pct_hbm']:.1f}%", flush=True)
                    assert r["rel_err"] < 1e-2, r
                    if args.out:
                        args.out.mkdir(parents=True, exist_ok=True)
                        (args.out / "gemm_bench.json").write_text(
                            json.dumps({"header": header, "hbm_GBps": hbm, "rows": rows}, indent=1))
    except KeyboardInterrupt:
        print("interrupted: table of the rows measured so far", flush=True)
    print(f"\n{header}; HBM copy {hbm:.0f} GB/s; group {GROUP}, symmetric; bf16 activations")
    print("| model | layer | K->N | W | M | kernel us | graph us | GB/s | % HBM | TFLOP/s | "
          "bf16 us | bf16 % HBM | vs bf16 | best config (% HBM) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layer']} | {r['K']}->{r['N']} | {r['bits']} | {r['M']} | "
              f"{r['kernel_us']:.1f} | {r['graph_us']:.1f} | {r['GBps']:.0f} | {r['pct_hbm']:.1f} | "
              f"{r['TFLOPs']:.2f} | {r['bf16_kernel_us']:.1f} | {r['bf16_pct_hbm']:.1f} | "
              f"{r['speedup_vs_bf16']:.2f}x | {r['best']} ({r['best_pct_hbm']:.1f}) |")
    if args.sweep:
        print_sweep_summary(rows)


def print_sweep_summary(rows) -> None:
    """Per (bits, M) and configuration: mean % HBM over the shapes, and the shapes it won."""
    print("\nSweep summary: mean % HBM over the shapes timed (higher is better); wins = shapes where best")
    print("| W | M | config | mean % HBM | min % HBM | wins | plan (block_n x block_k, warps) |")
    print("|---|---|---|---|---|---|---|")
    for bits, m in sorted({(r["bits"], r["M"]) for r in rows}):
        group = [r for r in rows if r["bits"] == bits and r["M"] == m]
        names = set.intersection(*({c for c, v in r["configs"].items() if "kernel_s" in v} for r in group))
        stats = []
        for c in names:
            pct = [100 * r["bytes"] / r["configs"][c]["kernel_s"] / 1e9 / r["hbm_GBps"] for r in group]
            stats.append((sum(pct) / len(pct), min(pct), sum(r["best"] == c for r in group), c))
        ranked = sorted(stats, reverse=True)
        for mean, low, wins, c in ranked[:12]:
            plan = group[0]["configs"][c]["plan"]
            print(f"| {bits} | {m} | {c} | {mean:.1f} | {low:.1f} | {wins} | "
                  f"{plan['block_n']} x {plan['block_k']}, {plan['num_warps']} |")
        best = ranked[0][3] if ranked else ""
        if best.startswith("gemv-n"):  # the environment that makes it the default
            fields = dict(zip(("BLOCK_N", "BLOCK_K", "WARPS"), best.split("-")[1:4]))
            env = [f"HQ_GEMM_GEMV_{f}={v.lstrip('nkw')}" for f, v in fields.items()]
            tail = best.split("-")[4]
            env.append(f"HQ_GEMM_GEMV_WARPS_PER_SM={tail[3:]}" if tail.startswith("wps")
                       else f"HQ_GEMM_GEMV_MIN_TILES={tail[3:]}")
            if best.endswith("-r128"):
                env.append("HQ_GEMM_GEMV_MAX_REGISTERS=128")
            print(f"best W{bits} M={m} as defaults: {' '.join(env)}")


def sass_report(bits_list) -> None:
    """Static cost of the GEMV tiles on sm_90 (no GPU): registers, spills, shared memory, the
    inner loop's SASS instructions per weight (loop length / weights per thread per tile), its
    global loads by width, and the resident warps per SM the registers allow (64 K registers,
    allocated per warp in units of 256; at most 64 warps and 32 programs per SM)."""
    import collections
    import re
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tiles = sorted(set(SWEEP_GEMV_TILES) | {(gemm._GEMV_BLOCK_N, gemm._GEMV_BLOCK_K, gemm._GEMV_WARPS)})
    print(f"triton {triton.__version__}, sm_90, GEMV (M = 1), bf16 x, group {GROUP}")
    print("| W | sym | block_n x block_k, warps | regs | spill B | smem B | loop instr / weight | "
          "loads per tile (per thread) | warps/SM by regs | top opcodes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bits in bits_list:
        for sym in (True, False):
            for bn, bk, w in tiles:
                plan = gemm.GemmPlan(False, 1, bn, bk, w, 1, 1)
                kern = gemm.compile_for_gpu(plan, bits, GROUP, sym)
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kern.asm["cubin"])
                    f.flush()
                    sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
                    res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
                ins = [(int(mm.group(1), 16), mm.group(2))
                       for mm in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
                loops = [(int(mm.group(1), 16), a) for a, op in ins
                         if (mm := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)) and int(mm.group(1), 16) < a]
                start, end = max(loops, key=lambda x: x[1] - x[0])
                ops = [re.sub(r"^@!?U?P\w+\s+", "", op).split()[0] for a, op in ins if start <= a <= end]
                regs = int(re.search(r"REG:(\d+)", res).group(1))
                spill = int(re.search(r"LOCAL:(\d+)", res).group(1)) + int(re.search(r"STACK:(\d+)", res).group(1))
                per_thread = bn * bk // (32 * w)  # weights per thread per tile
                loads = collections.Counter(o for o in ops if o.startswith("LDG"))
                by_regs = min(64, (65536 // (-(-regs * 32 // 256) * 256) // w) * w, 32 * w)
                top = ", ".join(f"{o} {c}" for o, c in collections.Counter(o.split(".")[0] for o in ops).most_common(6))
                print(f"| {bits} | {'sym' if sym else 'asym'} | {bn} x {bk}, {w} | {regs} | {spill} | "
                      f"{kern.metadata.shared} | {len(ops) / per_thread:.2f} | "
                      f"{', '.join(f'{c} {o[4:]}' for o, c in sorted(loads.items()))} | {by_regs} | {top} |",
                      flush=True)


if __name__ == "__main__":
    main()
