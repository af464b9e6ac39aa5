"""Weight-only dequant GEMM (kernels/gemm.py) on the GPU: correctness, then speed against the
device's measured HBM bandwidth and against torch's bf16 matmul, at decode batch sizes.

    PYTHONPATH=. python benchmarks/gemm_bench.py [--bits 3 4] [--m 1 16 64] [--sweep] [--out DIR]

Shapes: Llama-2-7B (4096 -> 12288 qkv, 4096 -> 4096 o, 4096 -> 22016 gate_up, 11008 -> 4096 down)
and Qwen2.5-7B (3584 -> 4608 qkv, 3584 -> 3584 o, 3584 -> 37888 gate_up, 18944 -> 3584 down),
random packed weights, group size 128, symmetric. Bytes counted: packed weights + scales +
activations read, output written. Times: CUDA-profiler kernel durations (the kernel alone, what
the roofline is about) and CUDA-graph replay per call (kernel plus the launch gap in a graph).
Weights rotate over enough copies that each pass is several times the L2. The HBM ceiling is a
large device-to-device copy (bytes read + written). ``--sweep`` also times the tile
configurations listed in SWEEP and reports the best one per shape. Prints a table last; with
``--out`` writes the full results as JSON.
"""

from __future__ import annotations

import argparse
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
#: Tile configurations timed with --sweep: (use_dot, block_n, block_k, num_warps, programs/SM).
SWEEP = {
    "gemv": [(False, 256, 32, 1, 2), (False, 256, 32, 1, 4), (False, 256, 32, 1, 8), (False, 256, 64, 1, 2),
             (False, 256, 64, 1, 4), (False, 512, 32, 1, 4), (False, 512, 32, 2, 4), (False, 128, 64, 1, 4)],
    "dot": [(True, 64, 512, 4, 4), (True, 128, 512, 4, 4), (True, 128, 512, 8, 4), (True, 64, 512, 4, 8),
            (True, 256, 512, 8, 4)],
}
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
        sms = _sm_count(device)
        for use_dot, bn, bk, nw, per_sm in SWEEP["dot" if m > 1 else "gemv"] + (SWEEP["dot"] if m == 1 else []):
            bm = 16 if not use_dot else (16 if m <= 16 else 64)
            tiles = -(-m // (bm if use_dot else 1)) * -(-n // bn)
            split = max(1, -(-per_sm * sms // tiles))
            plans[f"{'dot' if use_dot else 'gemv'}-n{bn}-k{bk}-w{nw}-s{per_sm}"] = gemm.plan_dequant_gemm(
                m, n, k, x.device, use_dot=use_dot, block_n=bn, block_k=bk, num_warps=nw, split_k=split,
                **({"block_m": bm} if use_dot else {}))
    results = {}
    for name, plan in plans.items():
        def call(i, plan=plan):
            return gemm.dequant_gemm(x, *weights[i % copies], None, bits, GROUP, plan=plan)
        try:
            call(0)
            if name != "default":  # every configuration must also be right
                yc = call(0).float()
                rel_c = ((yc - want).norm() / want.norm()).item()
                if not rel_c < 1e-2:
                    results[name] = {"error": f"rel {rel_c:.2e}"}
                    continue
            t = kernel_time(call, 3 * copies)
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

    global SHAPES, ROTATE_BYTES, hbm_copy_bandwidth, kernel_time, graph_time
    os.environ["TRITON_INTERPRET"] = "1"
    SHAPES = [("tiny", "a", 640, 72), ("tiny", "b", 1536, 40)]
    ROTATE_BYTES = 1
    hbm_copy_bandwidth = lambda device: 1.0  # noqa: E731

    kernel_time = graph_time = wall_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP tile configurations")
    p.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
    p.add_argument("--out", type=Path)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test of this script: interpreter, tiny shapes, wall-clock timers")
    args = p.parse_args()
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
    rows = []
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    t0 = time.time()
    try:  # an interrupt (timeout -s INT) still prints the table of what was measured
        for bits in args.bits:
            for m in args.m:
                for model, layer, k, n in shapes:
                    r = bench_shape(model, layer, k, n, bits, m, device, hbm, args.sweep and bits == 3)
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


if __name__ == "__main__":
    main()
