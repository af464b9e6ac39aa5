"""Int8 tensor-core prefill GEMM (kernels/int8_gemm.py) on the GPU: correctness against the torch
reference on fresh random inputs, then TFLOP/s against torch's int8 and bf16 GEMMs.

    PYTHONPATH=. python benchmarks/int8_gemm_bench.py [--bits 3 4] [--m 2048 8192] [--asymmetric]
        [--configs JSON] [--shapes 0 3] [--out FILE]

Shapes: Llama-2-7B (4096 -> 12288 qkv, 4096 -> 4096 o, 4096 -> 22016 gate_up, 11008 -> 4096
down) and Qwen2.5-7B (3584 -> 4608 qkv, 3584 -> 37888 gate_up, 18944 -> 3584 down), random
packed weights (every bit pattern is a valid code), group size 128, symmetric unless
``--asymmetric`` (which adds asymmetric rows). Paths timed at each (shape, bits, M), all on the
same ``[M, K]`` input:

* ``int8_gemm``: int8 codes + per-token scales x packed weights -> bf16 (the kernel alone).
* ``int8_linear``: ``quantize_per_token`` (4-bit codes) from bf16 input, then ``int8_gemm``:
  what the plugin's ``packed_linear`` runs at prefill for a linear without an online rotation.
* ``int_mm``: ``torch._int_mm`` (cuBLASLt int8 x int8 -> int32) on unpacked int8 weights, no
  scales: the vendor's int8 ceiling.
* ``bf16``: ``F.linear`` on bf16 weights (cuBLAS).
* ``dequant``: ``dequant_gemm`` on bf16 input: today's prefill path (a Triton pass writes a
  transient bf16 ``W.T``, then cuBLAS).

Times are CUDA-graph replays (``benchmarks/cuda_bench.py``), weights rotating over enough copies
that a pass is several times the L2. ``--configs`` takes a JSON list of plan overrides for the
int8 kernel (fields of ``plan_int8_gemm``: block_m, block_n, block_k, num_warps, num_stages,
group_m; e.g. ``[{}, {"block_m": 256, "block_n": 64}, {"num_stages": 4}]``), each checked for
correctness and timed; the first is the one in the ``int8_gemm`` columns, the fastest is
reported too, with the registers / spills of its build. Prints a markdown table last; writes
JSON (default ``benchmarks/results/int8_gemm_<device>_<date>.json``). ``--dry-run`` (Triton's
interpreter, tiny shapes, wall-clock timers) checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cuda_bench import graph_time, import_kernels, wall_time

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # (model, layer, K, N)
    ("llama2-7b", "qkv", 4096, 12288),
    ("llama2-7b", "o", 4096, 4096),
    ("llama2-7b", "gate_up", 4096, 22016),
    ("llama2-7b", "down", 11008, 4096),
    ("qwen2.5-7b", "qkv", 3584, 4608),
    ("qwen2.5-7b", "gate_up", 3584, 37888),
    ("qwen2.5-7b", "down", 18944, 3584),
]
GROUP = 128
ACT_BITS = 4
CLIP = 0.9
ROTATE_BYTES = 256 << 20  # weight bytes per rotation (the L2 is 50-60 MB)
MAX_COPIES = 8
#: Plan overrides timed by default. 128x256 and 256x128 spill (255 registers) in the sm_90a build;
#: these do not (203-230 registers): 256x64 amortizes the unpack over more rows, 4-warp 128x64
#: fits two CTAs per SM (one's MMA under the other's unpack).
DEFAULT_CONFIGS = [{}, {"block_m": 256, "block_n": 64}, {"block_m": 128, "block_n": 64, "num_warps": 4},
                   {"block_m": 64, "block_n": 128, "num_warps": 4}, {"num_stages": 4}, {"num_stages": 2}]
DEVICE = "cuda"
ig = gemm = hq = None  # hq_vllm.kernels.int8_gemm, .gemm, .hadamard_quant (set in main)
_BUILDS: dict = {}


def random_linear(n: int, k: int, bits: int, symmetric: bool, seed: int) -> tuple:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31 - 1, (bits * k // 32, n), generator=g, device=DEVICE, dtype=torch.int32)
    scales = (torch.rand(k // GROUP, n, generator=g, device=DEVICE) * 0.02 + 0.001).half()
    zeros = None if symmetric else torch.randint(0, 2**bits, (k // GROUP, n), generator=g, device=DEVICE,
                                                 dtype=torch.uint8)
    return qweight, scales, zeros


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build_info(bits: int, symmetric: bool, plan) -> dict:
    """Registers, spills and shared memory of the kernel's build for this device (diagnostic;
    one compile per distinct build)."""
    key = (bits, symmetric, plan)
    if key not in _BUILDS:
        _BUILDS[key] = _build_info(bits, symmetric, plan)
    return _BUILDS[key]


def _build_info(bits: int, symmetric: bool, plan) -> dict:
    try:
        major, minor = torch.cuda.get_device_capability()
        compiled = ig.compile_for_gpu(bits, symmetric, False, plan, arch=10 * major + minor)
        compiled._init_handles()
        return {"regs": compiled.n_regs, "spills": compiled.n_spills, "shared": compiled.metadata.shared}
    except Exception as e:  # never fail the benchmark over a diagnostic
        return {"error": repr(e)[:200]}


def check(model: str, k: int, n: int, bits: int, symmetric: bool, m: int) -> dict:
    """int8_gemm vs the float64 reference (float32 and bf16 outputs), and the int8 linear vs the
    simulator's fake-quantized bf16 input into a float32 GEMM, on fresh random inputs."""
    qw, s, z = random_linear(n, k, bits, symmetric, seed=n * 7 + k + bits)
    g = torch.Generator(device=DEVICE).manual_seed(m + k)
    x = torch.randn(m, k, generator=g, device=DEVICE)
    x[:, torch.randint(0, k, (4,), generator=g, device=DEVICE)] *= 20.0  # outlier channels
    x = x.bfloat16()
    codes, a_s = ig.quantize_per_token(x, ACT_BITS, CLIP)
    ref_codes, ref_s = hq.quantize_per_token_reference(x, ACT_BITS, CLIP)
    want = ig.int8_gemm_reference(codes, a_s, qw, s, z, None, bits, GROUP, torch.float64)
    y32 = ig.int8_gemm(codes, a_s, qw, s, z, None, bits, GROUP, torch.float32)
    y16 = ig.int8_gemm(codes, a_s, qw, s, z, None, bits, GROUP, torch.bfloat16)
    sim_x = hq.dequantize_per_token(ref_codes, ref_s, torch.bfloat16).float()
    w_t = gemm.dequantize_packed_reference(qw, s, z, bits, GROUP, k, torch.float32)
    return {"rel_fp32": _rel(y32, want), "rel_bf16": _rel(y16, want), "rel_vs_simulator": _rel(y16, sim_x @ w_t),
            "codes_equal": bool(torch.equal(codes, ref_codes) and torch.equal(a_s, ref_s))}


def bench(model, layer, k, n, bits, symmetric, m, configs, calls_cap) -> dict:
    packed_bytes = bits * k * n // 8
    copies = max(2, min(MAX_COPIES, -(-ROTATE_BYTES // packed_bytes), calls_cap))
    weights = [random_linear(n, k, bits, symmetric, seed=i) for i in range(copies)]
    x = (torch.randn(m, k, device=DEVICE) * 2).bfloat16()
    codes, a_s = ig.quantize_per_token(x, ACT_BITS, CLIP)
    flops = 2 * m * n * k
    row = {"model": model, "layer": layer, "K": k, "N": n, "bits": bits, "symmetric": symmetric, "M": m}
    row.update(check(model, k, n, bits, symmetric, min(m, 2048)))

    row["configs"] = []
    want = ig.int8_gemm_reference(codes, a_s, *weights[0], None, bits, GROUP, torch.float32)
    for config in configs:
        entry = {"config": config}
        try:
            plan = ig.plan_int8_gemm(m, n, k, GROUP, **config)
            entry["plan"] = plan.__dict__
            y = ig.int8_gemm(codes, a_s, *weights[0], None, bits, GROUP, torch.bfloat16, plan=plan)
            entry["rel"] = _rel(y, want)
            if not entry["rel"] < 1e-2:
                entry["error"] = f"wrong result: rel {entry['rel']:.2e}"
            else:
                t = graph_time(lambda i, p=plan: ig.int8_gemm(codes, a_s, *weights[i % copies], None, bits, GROUP,
                                                              torch.bfloat16, plan=p), copies)
                entry.update(us=t * 1e6, TFLOPs=flops / t / 1e12)
                if DEVICE == "cuda":
                    entry["build"] = build_info(bits, symmetric, plan)
        except Exception as e:  # a configuration that does not compile or fit is reported, not fatal
            entry["error"] = repr(e)[:200]
        row["configs"].append(entry)
    first = row["configs"][0]
    ok = [e for e in row["configs"] if "us" in e]
    if "us" in first:
        row.update(int8_us=first["us"], int8_TFLOPs=first["TFLOPs"])
    if ok:
        best = min(ok, key=lambda e: e["us"])
        row.update(best_config=best["config"], best_us=best["us"], best_TFLOPs=best["TFLOPs"],
                   best_build=best.get("build"))

    def timed(name, fn, count):
        try:
            t = graph_time(fn, count)
            row[f"{name}_us"], row[f"{name}_TFLOPs"] = t * 1e6, flops / t / 1e12
        except Exception as e:
            row[f"{name}_error"] = repr(e)[:200]

    timed("int8_linear", lambda i: ig.int8_gemm(*ig.quantize_per_token(x, ACT_BITS, CLIP), *weights[i % copies],
                                                 None, bits, GROUP, torch.bfloat16), copies)
    timed("dequant", lambda i: gemm.dequant_gemm(x, weights[i % copies][0], weights[i % copies][1],
                                                 weights[i % copies][2], bits, GROUP), copies)
    del weights
    w_copies = max(2, min(MAX_COPIES, -(-ROTATE_BYTES // (2 * k * n)), calls_cap))
    w8 = [torch.randint(-8, 8, (n, k), device=DEVICE, dtype=torch.int8) for _ in range(w_copies)]
    timed("int_mm", lambda i: torch._int_mm(codes, w8[i % w_copies].t()), w_copies)
    del w8
    w16 = [torch.randn(n, k, device=DEVICE).bfloat16() for _ in range(w_copies)]
    timed("bf16", lambda i: F.linear(x, w16[i % w_copies]), w_copies)
    del w16
    for base in ("bf16", "int_mm", "dequant"):
        if "int8_us" in row and f"{base}_us" in row:
            row[f"int8_vs_{base}"] = row[f"{base}_us"] / row["int8_us"]
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def compile_check() -> str:
    """The custom ops under torch.compile(fullgraph=True, aot_eager): no graph break."""
    qw, s, _ = random_linear(512, 1024, 3, True, 0)
    x = torch.randn(64, 1024, device=DEVICE).bfloat16()

    def fn(x):
        codes, scales = torch.ops.hadaquant.quantize_per_token(x, ACT_BITS, CLIP)
        return torch.ops.hadaquant.int8_gemm(codes, scales, qw, s, None, None, 3, GROUP, torch.float32) * 2

    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    codes, scales = hq.quantize_per_token_reference(x, ACT_BITS, CLIP)
    want = 2 * ig.int8_gemm_reference(codes, scales, qw, s, None, None, 3, GROUP, torch.float64)
    return f"torch.compile(fullgraph) ok, rel {_rel(y, want):.1e}"


def _dry_run_setup() -> None:
    """Run on a CPU machine (to check the script before spending device time): the interpreter,
    tiny shapes, one weight copy per rotation, wall-clock timers."""
    import os

    global DEVICE, SHAPES, ROTATE_BYTES, graph_time
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE, ROTATE_BYTES = "cpu", 1
    SHAPES = [("tiny", "a", 256, 96), ("tiny", "b", 384, 40)]
    graph_time = wall_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--m", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--asymmetric", action="store_true", help="also time asymmetric weights")
    p.add_argument("--configs", type=json.loads, default=None,
                   help='JSON list of plan overrides, e.g. \'[{}, {"block_m": 256, "block_n": 64}]\'')
    p.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
    p.add_argument("--out", type=Path, help="JSON file (default under benchmarks/results/)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test of this script: interpreter, tiny shapes, wall-clock timers")
    args = p.parse_args()
    if args.dry_run:
        _dry_run_setup()
        args.m = [m for m in args.m if m <= 128] or [64]
    elif not torch.cuda.is_available():
        sys.exit("int8_gemm_bench.py needs a CUDA GPU (or --dry-run; the tests cover the interpreter)")
    configs = args.configs if args.configs is not None else (
        [{}, {"block_m": 64, "block_n": 32}] if args.dry_run else DEFAULT_CONFIGS)
    global ig, gemm, hq
    ig, gemm, hq = import_kernels("int8_gemm", "gemm", "hadamard_quant")
    import triton

    name = "cpu dry-run" if args.dry_run else torch.cuda.get_device_name()
    sms = 0 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    header = (f"{name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, "
              f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    print(compile_check(), flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"int8_gemm_{name.split()[-1].lower()}_{time.strftime('%Y-%m-%d')}.json")
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    rows = []
    t0 = time.time()
    try:  # an interrupt (timeout -s INT) still prints the table of what was measured
        for symmetric in (True, False) if args.asymmetric else (True,):
            for bits in args.bits:
                for m in args.m:
                    for model, layer, k, n in shapes:
                        r = bench(model, layer, k, n, bits, symmetric, m, configs,
                                  calls_cap=MAX_COPIES if m <= 2048 else 4)
                        rows.append(r)
                        cfgs = " ".join(f"{e['us']:.0f}" if "us" in e else "err" for e in r["configs"])
                        print(f"[{time.time() - t0:5.0f}s] W{bits}{'s' if symmetric else 'a'} M={m:<5} {model:10s} "
                              f"{layer:7s} {k:>5}->{n:<5} int8 {r.get('int8_TFLOPs', 0):6.1f} TF/s "
                              f"(+quant {r.get('int8_linear_TFLOPs', 0):6.1f}) | int_mm {r.get('int_mm_TFLOPs', 0):6.1f} "
                              f"| bf16 {r.get('bf16_TFLOPs', 0):6.1f} | dequant {r.get('dequant_TFLOPs', 0):6.1f} | "
                              f"rel {r['rel_fp32']:.1e}/{r['rel_bf16']:.1e} sim {r['rel_vs_simulator']:.1e} | "
                              f"configs us: {cfgs}", flush=True)
                        if not (r["rel_fp32"] < 1e-5 and r["codes_equal"]):
                            print(f"  MISMATCH: {r}", flush=True)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_text(json.dumps({"header": header, "configs": configs, "rows": rows}, indent=1))
    except KeyboardInterrupt:
        print("interrupted: table of the rows measured so far", flush=True)
    print(f"\n{header}; group {GROUP}; activations {ACT_BITS}-bit per token (clip {CLIP}); bf16 output; wrote {out}")
    print("(TFLOP/s = 2MNK / time; int8 = int8_gemm alone with the first config, +quant = with "
          "quantize_per_token; best = fastest of the configs)")
    print("| model | layer | K->N | W | M | int8 us | int8 TF/s | +quant TF/s | int_mm TF/s | bf16 TF/s | dequant TF/s | "
          "vs bf16 | vs int_mm | rel fp32 | best config | best TF/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f(r, key, fmt="{:.1f}"):
        return fmt.format(r[key]) if key in r else "-"

    for r in rows:
        print(f"| {r['model']} | {r['layer']} | {r['K']}->{r['N']} | {r['bits']}{'' if r['symmetric'] else 'a'} | "
              f"{r['M']} | {f(r, 'int8_us')} | {f(r, 'int8_TFLOPs')} | {f(r, 'int8_linear_TFLOPs')} | {f(r, 'int_mm_TFLOPs')} | "
              f"{f(r, 'bf16_TFLOPs')} | {f(r, 'dequant_TFLOPs')} | {f(r, 'int8_vs_bf16', '{:.2f}x')} | "
              f"{f(r, 'int8_vs_int_mm', '{:.2f}x')} | {r['rel_fp32']:.1e} | {json.dumps(r.get('best_config'))} | "
              f"{f(r, 'best_TFLOPs')} |")


if __name__ == "__main__":
    main()
