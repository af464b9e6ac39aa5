"""Paged attention over the packed KV cache (kernels/paged_attention.py) on the GPU: correctness
against the torch reference, then decode speed against torch's scaled_dot_product_attention on
dense bf16 K/V of the same lengths.

    PYTHONPATH=. python benchmarks/paged_attention_bench.py [--bits 3 4] [--batch 1 8 64]
        [--ctx 1024 4096] [--models llama3-8b llama2-7b] [--sweep] [--out DIR] [--dry-run]

Shapes: Llama-3-8B (32 query heads, 8 KV heads, head_dim 128) and Llama-2-7B (32 / 32 / 128),
one decode token per sequence, every sequence ``ctx`` tokens long, vLLM's page of 16 tokens,
bf16 queries. The cache holds random codes with valid float16 scales (speed does not depend on
the values; correctness is checked on the same bytes). Each timed call uses another block table
over its own pages of a pool several times the L2, so reads come from HBM; the dense baseline
rotates over as many K/V copies. Bytes counted: the KV bytes a call must read (slots, or bf16 K
and V), queries and outputs. Times: CUDA events around a run of calls after a warm-up (median
of 5 runs; includes launch gaps) and per call in a CUDA-graph replay (what a captured decode
step pays). The HBM ceiling is a large device-to-device copy. ``--sweep`` also times launch
variants (unpacking, code dtype, KV tile, warps, splits) and reports the best per case. The
correctness pass covers decode with and without KV splits, mixed prefill / chunked prefill,
sliding windows, bits 3/4/8, GQA 1/4, head_dim 64/128 and bf16/fp16/fp32 queries. Prints a
table last; writes the results as JSON to ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from cuda_bench import graph_time, hbm_copy_bandwidth, import_kernels, wall_time

ROOT = Path(__file__).resolve().parents[1]


kv_cache, pa = import_kernels("kv_cache", "paged_attention")

MODELS = {"llama3-8b": (32, 8, 128), "llama2-7b": (32, 32, 128)}  # query heads, KV heads, head_dim
PAGE = 16
ROTATE_BYTES = 256 << 20  # bytes touched before a page is read again (several L2 sizes)
MAX_ROTATIONS = 256
#: Launch variants timed with --sweep: (unpack, codes16, block_n, num_warps); unpack 0 gather,
#: 1 whole words, 2 nibble words (see kernels/paged_attention.py).
SWEEP = [(u, c, bn, 4) for u in (0, 1, 2) for c in (False, True) for bn in (32, 64, 128)] + \
        [(2, True, bn, w) for bn in (64, 128) for w in (2, 8)]
SWEEP_SPLITS = (1, 4, 8, 16, 32, 64)
SWEEP_STAGES = (1, 3)  # software-pipelining depths tried on the default plan
REFERENCE_CASE = ("llama3-8b", 8, 1024, 3)  # model, batch, ctx, bits of the torch-reference timing


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def event_time(fn, count: int, reps: int = 5) -> float:
    """Seconds per call over runs of ``count`` calls (CUDA events, after a warm-up run)."""
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


def random_cache(num_blocks: int, hkv: int, d: int, bits: int, device, seed: int = 0) -> torch.Tensor:
    """Random code bytes with valid float16 scales (0.01..0.06) in every slot."""
    g = torch.Generator(device=device).manual_seed(seed)
    slot = kv_cache.kv_slot_bytes(d, bits)
    cache = torch.randint(0, 256, (num_blocks, hkv, PAGE, slot), generator=g, device=device, dtype=torch.uint8)
    half = 2 * (bits * d // 8) // 2  # K scale, in float16 units
    scales = (torch.rand(num_blocks, hkv, PAGE, 2, generator=g, device=device) * 0.05 + 0.01).half()
    cache.view(torch.float16)[..., half:half + 2] = scales
    return cache


def written_batch(lens, q_lens, hq, hkv, d, bits, device, dtype, seed):
    """A cache written through the real path (quantize + pack + paged write) from random K/V,
    in shuffled pages: (query, cache, block_table, seq_lens, query_start_loc)."""
    g = torch.Generator(device=device).manual_seed(seed)
    pages = [math.ceil(s / PAGE) for s in lens]
    n_blocks = sum(pages) + 3
    cache = random_cache(n_blocks, hkv, d, bits, device, seed)
    perm = torch.randperm(n_blocks, generator=g, device=device)
    bt = torch.zeros(len(lens), max(pages) + 1, dtype=torch.int32, device=device)
    used = 0
    for i, s in enumerate(lens):
        bt[i, :pages[i]] = perm[used:used + pages[i]]
        used += pages[i]
        spread = torch.exp(torch.randn(s, hkv, 1, generator=g, device=device))
        k = torch.randn(s, hkv, d, generator=g, device=device) * spread + 0.3
        v = torch.randn(s, hkv, d, generator=g, device=device) * spread
        pos = torch.arange(s, device=device)
        kv_cache.write_kv_slots(cache, kv_cache.quantize_kv_to_slots(k, v, bits, 0.95, False),
                                bt[i, pos // PAGE].long() * PAGE + pos % PAGE)
    query = torch.randn(sum(q_lens), hq, d, generator=g, device=device).to(dtype)
    qsl = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    return query, cache, bt, torch.tensor(lens, dtype=torch.int32, device=device), qsl


def correctness(device) -> list[dict]:
    """Kernel vs reference on this device over the launch shapes that matter."""
    rows = []
    bounds = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    cases = []
    for bits in (3, 4, 8):
        for hq, hkv, d in ((8, 2, 128), (4, 4, 64), (12, 3, 64)):
            cases.append((bits, hq, hkv, d, [700, 37, 16, 5], [1] * 4, None, torch.bfloat16))
    cases += [
        (3, 8, 2, 128, [700, 37, 16, 5], [1] * 4, 100, torch.bfloat16),
        (3, 8, 2, 128, [700, 37, 16, 5], [1] * 4, None, torch.float16),
        (3, 8, 2, 128, [700, 37, 16, 5], [1] * 4, None, torch.float32),
        (3, 8, 2, 128, [300, 257, 40, 9], [300, 100, 1, 9], None, torch.bfloat16),
        (4, 12, 3, 64, [300, 257, 40, 9], [300, 100, 1, 9], 64, torch.bfloat16),
        (8, 8, 8, 128, [300, 257, 40, 9], [300, 100, 1, 9], None, torch.float16),
        (3, 8, 2, 128, [300, 257, 40, 9], [300, 100, 1, 9], None, torch.float32),
    ]
    for n, (bits, hq, hkv, d, lens, q_lens, window, dtype) in enumerate(cases):
        query, cache, bt, sl, qsl = written_batch(lens, q_lens, hq, hkv, d, bits, device, dtype, seed=n)
        want = pa.paged_attention_reference(query.float(), cache, bt, sl, qsl, head_dim=d, bits=bits,
                                            scale=d**-0.5, sliding_window=window)
        variants = {"default": None}
        if max(q_lens) == 1:
            variants["splits=7"] = pa.plan_paged_attention(len(lens), hkv, hq // hkv, 1, max(lens), device,
                                                           num_splits=7)
        for unpack in (0, 1, 2):
            for c16 in (False, True):
                variants[f"unpack={unpack},c16={int(c16)}"] = pa.plan_paged_attention(
                    len(lens), hkv, hq // hkv, max(q_lens), max(lens), device, unpack=unpack, codes16=c16)
        for name, plan in variants.items():
            row = {"bits": bits, "hq": hq, "hkv": hkv, "d": d, "lens": lens, "q_lens": q_lens,
                   "window": window, "dtype": str(dtype), "variant": name}
            try:
                got = pa.paged_attention(query, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=d**-0.5,
                                         sliding_window=window, max_query_len=max(q_lens),
                                         max_seq_len=max(lens), plan=plan)
            except Exception as e:  # e.g. a variant over the shared-memory limit: reported, not fatal
                rows.append(row | {"rel": float("nan"), "ok": name != "default", "error": repr(e)[:200]})
                continue
            rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
            rows.append(row | {"rel": rel, "ok": rel < bounds[dtype]})
    return rows


def _dense_sdpa(b, hq, hkv, s, d, device):
    """Time closure of torch SDPA decode on dense bf16 K/V [B, Hkv, S, D] (GQA via enable_gqa),
    rotating over enough copies to leave the L2; and the bytes it must read."""
    per_copy = 2 * b * hkv * s * d * 2
    copies = max(1, min(MAX_ROTATIONS, ROTATE_BYTES // per_copy))
    kv = [(torch.randn(b, hkv, s, d, device=device).bfloat16(), torch.randn(b, hkv, s, d, device=device).bfloat16())
          for _ in range(copies)]
    q = torch.randn(b, hq, 1, d, device=device).bfloat16()
    gqa = {"enable_gqa": True} if hq != hkv else {}

    def call(i):
        k, v = kv[i % copies]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=d**-0.5, **gqa)

    return call, copies, per_copy + 2 * b * hq * d * 2


def bench_case(model, b, s, bits, device, hbm, sweep):
    hq, hkv, d = MODELS[model]
    slot = kv_cache.kv_slot_bytes(d, bits)
    pages = math.ceil(s / PAGE)
    case_bytes = b * hkv * s * slot
    rot = max(1, min(MAX_ROTATIONS, ROTATE_BYTES // case_bytes))
    cache = random_cache(rot * b * pages, hkv, d, bits, device, seed=b + s)
    perm = torch.randperm(rot * b * pages, device=device).to(torch.int32)
    tables = perm.view(rot, b, pages)  # disjoint pages per rotation and sequence
    sl = torch.full((b,), s, dtype=torch.int32, device=device)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, device=device).bfloat16()
    out = torch.empty_like(q)
    nbytes = case_bytes + 2 * b * hq * d * 2

    # Correctness on these bytes (the first two sequences), then speed.
    n_ref = min(b, 2)
    want = pa.paged_attention_reference(q[:n_ref].float(), cache, tables[0, :n_ref], sl[:n_ref], qsl[:n_ref + 1],
                                        head_dim=d, bits=bits, scale=d**-0.5)
    got = pa.paged_attention(q, cache, tables[0], sl, qsl, head_dim=d, bits=bits, scale=d**-0.5,
                             max_query_len=1, max_seq_len=s)
    rel = ((got[:n_ref].double() - want.double()).norm() / want.double().norm()).item()

    def runner(plan):
        def call(i):
            return pa.paged_attention(q, cache, tables[i % rot], sl, qsl, head_dim=d, bits=bits, scale=d**-0.5,
                                      output=out, max_query_len=1, max_seq_len=s, plan=plan)
        return call

    plan = pa.plan_paged_attention(b, hkv, hq // hkv, 1, s, device, bits=bits)
    count = max(rot, 8)
    t = event_time(runner(plan), count)
    t_graph = graph_time(runner(plan), count)
    sdpa, copies, bytes16 = _dense_sdpa(b, hq, hkv, s, d, device)
    t16 = event_time(sdpa, max(copies, 8))
    t16_graph = graph_time(sdpa, max(copies, 8))
    row = {
        "model": model, "hq": hq, "hkv": hkv, "d": d, "batch": b, "ctx": s, "bits": bits, "slot_bytes": slot,
        "rel_err": rel, "plan": plan.__dict__, "us": t * 1e6, "graph_us": t_graph * 1e6,
        "GBps": nbytes / t / 1e9, "graph_GBps": nbytes / t_graph / 1e9, "pct_hbm": 100 * nbytes / t / 1e9 / hbm,
        "sdpa_us": t16 * 1e6, "sdpa_graph_us": t16_graph * 1e6, "sdpa_GBps": bytes16 / t16 / 1e9,
        "speedup_vs_sdpa": t16 / t, "graph_speedup_vs_sdpa": t16_graph / t_graph,
        "kv_bytes": case_bytes, "sdpa_bytes": bytes16,
    }
    if sweep:
        configs = {}
        for unpack, c16, bn, nw in SWEEP:
            configs[f"unpack={unpack},c16={int(c16)},n{bn},w{nw}"] = dict(unpack=unpack, codes16=c16, block_n=bn,
                                                                          num_warps=nw)
        for sp in SWEEP_SPLITS:
            configs[f"default,splits={sp}"] = dict(num_splits=sp)
        for st in SWEEP_STAGES:
            configs[f"default,stages={st}"] = dict(num_stages=st)
        results = {}
        for name, fields in configs.items():
            try:
                p = pa.plan_paged_attention(b, hkv, hq // hkv, 1, s, device, bits=bits, **fields)
                g2 = runner(p)(0)[:n_ref].double()
                r2 = ((g2 - want.double()).norm() / want.double().norm()).item()
                if not r2 < 1e-2:
                    results[name] = {"error": f"rel {r2:.2e}"}
                    continue
                tc = event_time(runner(p), count)
                results[name] = {"us": tc * 1e6, "pct_hbm": 100 * nbytes / tc / 1e9 / hbm}
            except Exception as e:  # a configuration that does not compile or fit is reported, not fatal
                results[name] = {"error": repr(e)[:200]}
        ok = {k: v for k, v in results.items() if "us" in v}
        best = min(ok, key=lambda k: ok[k]["us"]) if ok else None
        row.update(configs=results, best=best, best_us=ok[best]["us"] if best else None)
    return row


def reference_timing(device) -> dict:
    """The torch reference (a Python loop over requests) on a small case, beside the kernel."""
    model, b, s, bits = REFERENCE_CASE
    hq, hkv, d = MODELS[model]
    pages = s // PAGE
    cache = random_cache(b * pages, hkv, d, bits, device, seed=1)
    bt = torch.randperm(b * pages, device=device).to(torch.int32).view(b, pages)
    sl = torch.full((b,), s, dtype=torch.int32, device=device)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device)
    q = torch.randn(b, hq, d, device=device).bfloat16()
    t_ref = event_time(lambda i: pa.paged_attention_reference(q, cache, bt, sl, qsl, head_dim=d, bits=bits,
                                                              scale=d**-0.5), 3, reps=3)
    t_k = event_time(lambda i: pa.paged_attention(q, cache, bt, sl, qsl, head_dim=d, bits=bits, scale=d**-0.5,
                                                  max_query_len=1, max_seq_len=s), 20)
    return {"model": model, "batch": b, "ctx": s, "bits": bits, "reference_us": t_ref * 1e6,
            "kernel_us": t_k * 1e6, "speedup": t_ref / t_k}


def _dry_run_setup() -> None:
    """Make the script run on a CPU machine (to check it before spending device time)."""
    import os

    global MODELS, ROTATE_BYTES, REFERENCE_CASE, hbm_copy_bandwidth, event_time, graph_time, correctness
    os.environ["TRITON_INTERPRET"] = "1"
    MODELS = {"tiny-gqa": (4, 2, 64), "tiny-mha": (2, 2, 64)}
    ROTATE_BYTES = 1
    REFERENCE_CASE = ("tiny-gqa", 2, 32, 3)
    hbm_copy_bandwidth = lambda device: 1.0  # noqa: E731

    event_time = graph_time = wall_time
    correctness = lambda device: []  # noqa: E731  (tests/test_paged_attention.py covers it on CPU)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"of {list(MODELS)}")
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP launch variants")
    p.add_argument("--sweep-at", nargs="+", default=None, metavar="MODEL:BITS:BATCH:CTX",
                   help="sweep only these cases (default: every case when --sweep)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness pass")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default=None, help="file name tag (default: device and date)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test of this script: interpreter, tiny shapes, wall-clock timers")
    args = p.parse_args()
    if args.dry_run:
        _dry_run_setup()
        args.models = list(MODELS)
        args.batch, args.ctx = [b for b in args.batch if b <= 2] or [1], [c for c in args.ctx if c <= 64] or [40]
    device = torch.device("cpu" if args.dry_run else "cuda")
    import triton

    header = (f"{_device_name(device)}, {_sm_count(device)} SMs, torch {torch.__version__}, "
              f"triton {triton.__version__}, python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    hbm = hbm_copy_bandwidth(device)
    print(f"HBM device-to-device copy: {hbm:.0f} GB/s (read + written)", flush=True)
    result = {"header": header, "hbm_GBps": hbm}
    tag = args.tag or ("dry_run" if args.dry_run else
                       f"{_device_name(device).split()[-1].lower()}_{time.strftime('%Y-%m-%d')}")
    path = args.out / f"paged_attention_{tag}.json"

    def save():
        if not args.dry_run:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))

    t0 = time.time()
    if not args.skip_check:
        checks = correctness(device)
        result["correctness"] = checks
        bad = [c for c in checks if not c["ok"]]
        worst = max((c["rel"] for c in checks if "error" not in c), default=0.0)
        for c in checks:
            if "error" in c:
                print(f"  not run: {c['variant']} bits {c['bits']} d {c['d']}: {c['error'][:100]}", flush=True)
        print(f"[{time.time() - t0:5.0f}s] correctness: {len(checks)} launches, {len(bad)} over bound, "
              f"worst rel {worst:.1e}", flush=True)
        for c in bad:
            print("  FAIL", c, flush=True)
        save()
    rows = []
    result["rows"] = rows
    try:  # an interrupt (timeout -s INT) still prints the table of what was measured
        for model in args.models:
            for bits in args.bits:
                for b in args.batch:
                    for s in args.ctx:
                        sweep = args.sweep and (args.sweep_at is None or f"{model}:{bits}:{b}:{s}" in args.sweep_at)
                        r = bench_case(model, b, s, bits, device, hbm, sweep)
                        rows.append(r)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        best = f" | best {r['best']} {r['best_us']:.1f} us" if r.get("best") else ""
                        print(f"[{time.time() - t0:5.0f}s] {model} KV{bits} B={b:<3} S={s:<5} {r['us']:8.1f} us "
                              f"(graph {r['graph_us']:7.1f}) {r['GBps']:6.0f} GB/s | sdpa {r['sdpa_us']:8.1f} us "
                              f"{r['speedup_vs_sdpa']:.2f}x | rel {r['rel_err']:.1e}{best}", flush=True)
                        save()
        result["reference"] = reference_timing(device)
        save()
    except KeyboardInterrupt:
        print("interrupted: table of the rows measured so far", flush=True)
    print(f"\n{header}; HBM copy {hbm:.0f} GB/s; decode, page {PAGE}, bf16 queries; results in {path}")
    print("| model | KV bits | batch | ctx | us | graph us | GB/s | % HBM | sdpa bf16 us | sdpa GB/s | "
          "vs sdpa | vs sdpa (graph) | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {r['batch']} | {r['ctx']} | {r['us']:.1f} | {r['graph_us']:.1f} | "
              f"{r['GBps']:.0f} | {r['pct_hbm']:.1f} | {r['sdpa_us']:.1f} | {r['sdpa_GBps']:.0f} | "
              f"{r['speedup_vs_sdpa']:.2f}x | {r['graph_speedup_vs_sdpa']:.2f}x | {r['rel_err']:.1e} |")
    if "reference" in result:
        ref = result["reference"]
        print(f"torch reference, {ref['model']} B={ref['batch']} S={ref['ctx']} KV{ref['bits']}: "
              f"{ref['reference_us']:.0f} us vs kernel {ref['kernel_us']:.1f} us ({ref['speedup']:.0f}x)")


if __name__ == "__main__":
    main()
