"""Fused online Hadamard + per-token activation quantization (kernels/hadamard_quant.py) on the
GPU: correctness against the torch reference, then speed against the device's measured HBM
bandwidth and against the unfused path.

    PYTHONPATH=. python benchmarks/hadamard_quant_bench.py [--n 4096 11008 14336 18944]
        [--t 1 16 256 4096] [--bits 4] [--clip 0.9] [--blocks 1] [--configs JSON] [--out FILE]

Paths timed, all on bf16 input ``x [T, N]``:

* ``fused``: ``hadamard_quant(x, bits, clip)``, int8 codes + float32 scales. Bytes: ``2TN``
  read + ``TN + 4T`` written.
* ``fused_dq``: ``hadamard_quant(..., dequantize=True)``, the bf16 fake-quantized activation
  (what the plugin consumes today). Bytes: ``2TN`` read + ``2TN`` written.
* ``unfused``: ``hadamard_transform`` (the Triton FWHT) then the torch quantizer
  (``quantize_per_token_reference``): what the plugin ran before. Its GB/s is reported over the
  *fused* byte count, so the column compares times.

Times are CUDA-graph replays (``--calls`` calls per graph, median of 5 replays, after warm-up),
inputs rotating over enough copies that each pass is several times the L2. The HBM ceiling is a
large device-to-device copy (bytes read + written), measured in the same run. ``--configs``
takes a JSON list of tunable overrides for the fused kernel (module attributes of
``hadamard_quant``, plus ``num_warps``; e.g. ``[{}, {"_FP16_MAX_BITS": 4}, {"num_warps": 16},
{"_NUM_STAGES": 2}]``) and times each (default: the shipped settings and the float16 second
product).
Each config's registers / spills come from compiling it for the device (``compile_for_gpu``).
Prints a table last; writes the full results as JSON (default
``benchmarks/results/hadamard_quant_<device>_<date>.json``). ``--help`` and ``--dry-run`` (the
interpreter, tiny sizes) work without a GPU. A sweep worth one call on the H200 (~5 min)::

    PYTHONPATH=. python benchmarks/hadamard_quant_bench.py --configs \
        '[{}, {"_FP16_MAX_BITS": 8}, {"num_warps": 16}, {"_NUM_STAGES": 2}, {"_NUM_STAGES": 4},
          {"_LEFT_TABLE_CACHE": ""}]'
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from cuda_bench import graph_time, hbm_copy_bandwidth, import_kernels, wall_time

ROOT = Path(__file__).resolve().parents[1]
ROTATE_BYTES = 256 << 20  # input copies per size: at least this many bytes (L2 is 50-60 MB)
DEVICE = "cuda"


# ---------------------------------------------------------------------------------------------
# CUDA-only measurement helpers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def _apply_config(hq, config: dict) -> dict:
    """Set the kernel's tunables from ``config``; return the previous values to restore."""
    saved = {}
    for key, value in config.items():
        if key == "num_warps":
            saved["_warps_for"] = hq._warps_for
            hq._warps_for = lambda tile, w=value: w
        else:
            if not hasattr(hq, key):
                raise ValueError(f"--configs: hadamard_quant has no tunable {key!r}")
            saved[key] = getattr(hq, key)
            setattr(hq, key, value)
    hq._plan.cache_clear()
    return saved


def _restore(hq, saved: dict) -> None:
    for key, value in saved.items():
        setattr(hq, key, value)
    hq._plan.cache_clear()


def build_info(hq, n: int, bits: int, blocks: int) -> dict:
    """Registers, spills and shared memory of the codes kernel for this size (None if the
    Triton version here cannot say)."""
    try:
        compiled = hq.compile_for_gpu(n, bits, blocks, torch.bfloat16, False,
                                      arch=10 * torch.cuda.get_device_capability()[0]
                                      + torch.cuda.get_device_capability()[1])
        compiled._init_handles()
        return {"regs": compiled.n_regs, "spills": compiled.n_spills, "shared": compiled.metadata.shared}
    except Exception as e:  # a diagnostic only: never fail the benchmark over it
        return {"error": repr(e)[:200]}


def check(hq, n: int, t: int, bits: int, clip: float, blocks: int) -> dict:
    """Fused vs reference on fresh random bf16 input with outlier channels (CUDA)."""
    g = torch.Generator(device=DEVICE).manual_seed(n * 31 + t)
    x = torch.randn(t, n, generator=g, device=DEVICE)
    x[:, torch.randint(0, n, (4,), generator=g, device=DEVICE)] *= 25.0
    x = x.bfloat16()
    codes, scales = hq.hadamard_quant(x, bits, clip, blocks)
    ref_codes, ref_scales = hq.hadamard_quant_reference(x, bits, clip, blocks)
    diff = (codes.int() - ref_codes.int()).abs()
    dq = hq.hadamard_quant(x, bits, clip, blocks, dequantize=True)
    return {
        "codes_max_diff": int(diff.max()),
        "codes_frac_diff": float((diff > 0).float().mean()),
        "scale_max_rel": float(((scales - ref_scales).abs() / ref_scales).max()),
        "dequant_matches_codes": bool(torch.equal(dq, hq.dequantize_per_token(codes, scales, x.dtype))),
    }


def bench(fwht, hq, n: int, t: int, bits: int, clip: float, blocks: int, hbm: float, calls: int,
          configs: list[dict]) -> dict:
    copies = max(2, -(-ROTATE_BYTES // (2 * t * n)))
    xs = [torch.randn(t, n, device=DEVICE).bfloat16() for _ in range(copies)]
    fused_bytes = 2 * t * n + t * n + 4 * t
    dq_bytes = 4 * t * n
    block = n // blocks

    def unfused(i):
        y = fwht.block_hadamard_transform(xs[i % copies], block)
        return hq.quantize_per_token_reference(y, bits, clip)

    row = {"N": n, "T": t, "bits": bits, "clip": clip, "blocks": blocks}
    row.update(check(hq, n, min(t, 512), bits, clip, blocks))
    row["unfused_us"] = graph_time(unfused, calls) * 1e6
    row["configs"] = []
    for config in configs:
        saved = _apply_config(hq, config)
        try:
            plan = hq._plan(n, blocks, bits > hq._FP16_MAX_BITS)
            fused = graph_time(lambda i: hq.hadamard_quant(xs[i % copies], bits, clip, blocks), calls)
            fused_dq = graph_time(
                lambda i: hq.hadamard_quant(xs[i % copies], bits, clip, blocks, dequantize=True), calls)
            entry = {
                "config": config, "plan": plan.__dict__, "build": build_info(hq, n, bits, blocks),
                "fused_us": fused * 1e6, "fused_GBps": fused_bytes / fused / 1e9,
                "fused_pct_hbm": 100 * fused_bytes / fused / 1e9 / hbm,
                "fused_dq_us": fused_dq * 1e6, "fused_dq_GBps": dq_bytes / fused_dq / 1e9,
                "fused_dq_pct_hbm": 100 * dq_bytes / fused_dq / 1e9 / hbm,
            }
            if config != configs[0]:
                entry.update(check(hq, n, min(t, 512), bits, clip, blocks))
        finally:
            _restore(hq, saved)
        row["configs"].append(entry)
    shipped = row["configs"][0]  # the first config: the shipped settings unless --configs says
    row.update({k: shipped[k] for k in ("fused_us", "fused_GBps", "fused_pct_hbm", "fused_dq_us",
                                        "fused_dq_GBps", "fused_dq_pct_hbm")})
    best = min(row["configs"], key=lambda e: e["fused_us"])
    row.update(best_config=best["config"], best_us=best["fused_us"], best_pct_hbm=best["fused_pct_hbm"])
    row["unfused_GBps"] = fused_bytes / (row["unfused_us"] / 1e6) / 1e9
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    del xs
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def diagnose(hq, n: int, t: int, bits: int, clip: float) -> list[str]:
    """Where the fused kernel and the reference disagree at size ``n`` (GPU triage): against the
    float32 reference and a float64 one, by token and by row of the left factor, per variant
    (warps, right-factor width, one accumulator segment, row-by-row launches)."""
    g = torch.Generator(device=DEVICE).manual_seed(n * 31 + t)
    x = torch.randn(t, n, generator=g, device=DEVICE)
    x[:, torch.randint(0, n, (4,), generator=g, device=DEVICE)] *= 25.0
    x = x.bfloat16()
    ref_codes, ref_scales = hq.hadamard_quant_reference(x, bits, clip)
    exact = hq._rotate_reference(x.double(), 1).to(x.dtype)  # float64 rotation, rounded to bf16
    ex_codes, ex_scales = hq.quantize_per_token_reference(exact, bits, clip)
    lines = [f"N={n} T={t}: float32 reference vs float64 one: codes off {float((ref_codes != ex_codes).float().mean()):.1e}, "
             f"scale max rel {float(((ref_scales - ex_scales).abs() / ex_scales).max()):.1e}"]

    def one_segment(r):
        return (hq._next_pow2(hq._round_up(r, hq._MIN_DOT)), 0)

    def big_first(r):
        s0, s1 = saved_segments(r)
        return (s1, s0) if s1 > s0 else (s0, s1)

    saved_segments = hq._segments
    variants = [("default", {}), ("big seg 1st", {"_segments": big_first}), ("warps 4", {"num_warps": 4}), ("warps 16", {"num_warps": 16}),
                ("B <= 64", {"_MAX_RIGHT": 64}), ("B <= 32", {"_MAX_RIGHT": 32}),
                ("one segment", {"_segments": one_segment}), ("fp16 pass", {"_FP16_MAX_BITS": 8}),
                ("stages 1", {"_NUM_STAGES": 1}), ("no .ca", {"_LEFT_TABLE_CACHE": ""})]
    for name, config in variants:
        saved = _apply_config(hq, config)
        try:
            plan = hq._plan(n, 1, bits > hq._FP16_MAX_BITS)
            codes, scales = hq.hadamard_quant(x, bits, clip)
            rows = [hq.hadamard_quant(x[i:i + 1], bits, clip) for i in range(min(t, 16))]
            torch.cuda.synchronize() if DEVICE == "cuda" else None
        except Exception as e:
            lines.append(f"  {name}: {type(e).__name__}: {str(e)[:160]}")
            continue
        finally:
            _restore(hq, saved)
        off = codes != ref_codes
        off_ex = codes != ex_codes
        tok = off.any(-1)
        per_row = torch.cat([c for c, _ in rows]) != ref_codes[: len(rows)]
        desc = f"plan b={plan.b} r={plan.r} seg={plan.seg0}+{plan.seg1} ch={plan.ch}x{plan.nch} warps={plan.num_warps}"
        if off.any() and not plan.rows_mode:
            # channel c = left row * b + column; which left rows carry the mismatches
            lrow = (torch.nonzero(off)[:, 1] // plan.b).float()
            where = (f"left rows of mismatches: min {int(lrow.min())} max {int(lrow.max())}, "
                     f"{float((lrow >= plan.seg0).float().mean()):.0%} in the 2nd segment")
        else:
            where = ""
        lines.append(f"  {name:12s} {desc}: off vs ref {float(off.float().mean()):.1e} "
                     f"(max {int((codes.int() - ref_codes.int()).abs().max())}), vs float64 {float(off_ex.float().mean()):.1e}, "
                     f"tokens hit {int(tok.sum())}/{t}, scale max rel {float(((scales - ref_scales).abs() / ref_scales).max()):.1e}, "
                     f"row-by-row off {float(per_row.float().mean()):.1e}; {where}")
    return lines


def compile_check(hq) -> str:
    """The custom ops under torch.compile(fullgraph=True, aot_eager): no graph break."""
    x = torch.randn(8, 4096, device=DEVICE).bfloat16()
    fn = torch.compile(lambda x: torch.ops.hadaquant.hadamard_quant(x, 4, 0.9, 1), fullgraph=True,
                       backend="aot_eager")
    codes, scales = fn(x)
    ref_codes, ref_scales = hq.hadamard_quant_reference(x, 4, 0.9)
    fn2 = torch.compile(lambda x: torch.ops.hadaquant.hadamard_quant_dequant(x, 4, 0.9, 1) * 2,
                        fullgraph=True, backend="aot_eager")
    fn2(x)
    frac = float((codes != ref_codes).float().mean())
    return f"torch.compile(fullgraph) ok, codes differing from the reference: {frac:.1e}"


def _dry_run_setup() -> None:
    """Make the script run on a CPU machine (to check it before spending device time): Triton's
    interpreter, one input copy, wall-clock timers, no HBM figure."""
    import os

    global DEVICE, ROTATE_BYTES, hbm_copy_bandwidth, graph_time
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE, ROTATE_BYTES = "cpu", 1
    hbm_copy_bandwidth = lambda: 1.0  # noqa: E731

    graph_time = wall_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 11008, 14336, 18944])
    p.add_argument("--t", type=int, nargs="+", default=[1, 16, 256, 4096])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--clip", type=float, default=0.9)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    p.add_argument("--configs", type=json.loads, default=[{}, {"_FP16_MAX_BITS": 8}],
                   help='JSON list of tunable overrides, e.g. \'[{}, {"_FP16_MAX_BITS": 8}, {"num_warps": 16}]\'')
    p.add_argument("--out", type=Path, help="JSON file (default under benchmarks/results/)")
    p.add_argument("--diagnose", action="store_true",
                   help="only locate mismatches against the reference per --n (T = first --t) and variant")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test of this script: interpreter, wall-clock timers (use small --n/--t)")
    args = p.parse_args()
    if args.dry_run:
        _dry_run_setup()
    elif not torch.cuda.is_available():
        sys.exit("hadamard_quant_bench.py needs a CUDA GPU (or --dry-run; the tests cover the interpreter)")
    fwht, hq = import_kernels("fwht", "hadamard_quant")
    import triton

    name = "cpu dry-run" if args.dry_run else torch.cuda.get_device_name()
    sms = 0 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    header = (f"{name}, {sms} SMs, "
              f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    hbm = hbm_copy_bandwidth()
    print(f"HBM device-to-device copy: {hbm:.0f} GB/s (read + written)", flush=True)
    if args.diagnose:
        for n in args.n:
            print("\n".join(diagnose(hq, n, args.t[0], args.bits, args.clip)), flush=True)
        return
    if not args.dry_run:  # (the compile check needs a CUDA tensor for the kernel path)
        print(compile_check(hq), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"hadamard_quant_{name.split()[-1].lower()}_{time.strftime('%Y-%m-%d')}.json")
    rows = []
    t0 = time.time()
    try:  # an interrupt (timeout -s INT) still prints the table of what was measured
        for n in args.n:
            for t in args.t:
                r = bench(fwht, hq, n, t, args.bits, args.clip, args.blocks, hbm, args.calls, args.configs)
                rows.append(r)
                cfgs = " ".join(f"{e['fused_us']:.1f} ({e['build'].get('regs')}r/{e['build'].get('spills')}s)"
                                for e in r["configs"])
                print(f"[{time.time() - t0:5.0f}s] N={n:<6} T={t:<5} fused {r['fused_us']:8.1f} us "
                      f"{r['fused_pct_hbm']:5.1f}% | dq {r['fused_dq_us']:8.1f} us {r['fused_dq_pct_hbm']:5.1f}% | "
                      f"unfused {r['unfused_us']:8.1f} us | codes off {r['codes_frac_diff']:.1e} "
                      f"(max {r['codes_max_diff']}) scale rel {r['scale_max_rel']:.1e} | configs us: {cfgs}",
                      flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"header": header, "hbm_GBps": hbm, "rows": rows}, indent=1))
    except KeyboardInterrupt:
        print("interrupted: table of the rows measured so far", flush=True)
    print(f"\n{header}; HBM copy {hbm:.0f} GB/s; bf16 input, {args.bits}-bit codes, clip {args.clip}, "
          f"blocks {args.blocks}; wrote {out}")
    print(f"(fused: first config {args.configs[0]}; best: fastest of --configs, its us and % HBM)")
    print("| N | T | fused us | fused GB/s | % HBM | fused bf16-out us | % HBM | unfused us | speedup | "
          "codes off (max) | best config | best us | best % HBM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['T']} | {r['fused_us']:.1f} | {r['fused_GBps']:.0f} | {r['fused_pct_hbm']:.1f} | "
              f"{r['fused_dq_us']:.1f} | {r['fused_dq_pct_hbm']:.1f} | {r['unfused_us']:.1f} | "
              f"{r['speedup']:.2f}x | {r['codes_frac_diff']:.1e} ({r['codes_max_diff']}) | {r['best_config']} | "
              f"{r['best_us']:.1f} | {r['best_pct_hbm']:.1f} |")


if __name__ == "__main__":
    main()
