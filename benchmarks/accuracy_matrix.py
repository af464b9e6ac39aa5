"""Run the accuracy matrices of docs/ACCURACY.md.

    .venv/bin/python benchmarks/accuracy_matrix.py smollm2 --limit 500 --ppl-sequences 64
    .venv/bin/python benchmarks/accuracy_matrix.py smollm2 --matrix calibration --workers 6   # on a GPU

Matrices (``--matrix``):

* ``rtn``: FP and each recipe round-to-nearest, without and with rotation (the first table).
* ``calibration``: issue 4's comparison, per recipe: RTN without rotation; *QuaRot-style*
  (rotation + GPTQ + fixed clips, 0.9 activations / 0.95 KV); *hadaquant full* (rotation + GPTQ +
  GBS + SmoothRot + spike-aware mixed precision, :func:`full_options`); the ablation (the full
  pipeline with one component removed at a time; "random orthogonal" replaces the random-Hadamard R1
  and R2 by random orthogonal matrices; the online R3/R4 stay Hadamard, since they must be fast
  transforms). Rows that would repeat another (e.g. GBS or SmoothRot at W3A16,
  where there is nothing to clip or smooth) are left out.

Each configuration is one ``hadaquant eval``-style run (the same code path as the CLI): calibrate
(``simulated_model``), then evaluate; results go to ``<out>/<model>/<config>.json`` with the
calibration and evaluation times, and a markdown table is printed last. A configuration whose JSON
exists is not run again (``--force`` reruns). ``--workers N`` runs N configurations at a time in
subprocesses (they share one GPU: these models are far too small to fill one alone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from hq_vllm.offline.cli import _resolve_model
from hq_vllm.offline.evaluate import TASKS, evaluate, results_to_markdown
from hq_vllm.offline.model_io import load_model
from hq_vllm.offline.pipeline import RECIPES, QuantizeOptions, full_options, method_options, simulated_model

MATRICES = ("rtn", "calibration")


def rtn_configurations(recipes: list[str]) -> list[tuple[str, QuantizeOptions | None]]:
    configs: list[tuple[str, QuantizeOptions | None]] = [("FP", None)]
    for recipe in recipes:
        configs.append((f"{recipe} RTN, no rotation", QuantizeOptions(recipe=recipe, rotate=False)))
        configs.append((f"{recipe} RTN, rotated", QuantizeOptions(recipe=recipe, rotate=True)))
    return configs


def calibration_configurations(recipes: list[str]) -> list[tuple[str, QuantizeOptions | None]]:
    configs: list[tuple[str, QuantizeOptions | None]] = [("FP", None)]
    for recipe in recipes:
        full = full_options(recipe)
        rows = [
            ("RTN, no rotation", QuantizeOptions(recipe=recipe, rotate=False)),
            ("QuaRot-style", method_options("quarot", recipe)),  # the recipe's fixed clips: 0.9 / 0.95
            ("hadaquant full", full),
            ("full - GPTQ (RTN)", replace(full, weight_method="rtn")),
            ("full - GBS (fixed clips)", replace(full, clip_search="fixed")),
            ("full - SmoothRot", replace(full, smoothrot=False)),
            ("full - mixed precision", replace(full, mp_budget=0)),
            ("full, random orthogonal", replace(full, rotation=replace(full.rotation, r1_kind="random_orthogonal", r2_kind="random_orthogonal"))),
        ]
        merged: dict[QuantizeOptions, str] = {}  # identical rows share one run, labels joined
        for label, options in rows:  # e.g. at w3a16 the full pipeline is the QuaRot-style one
            if options not in merged:
                merged[options] = label
            elif not label.startswith("full -"):  # an ablation equal to the full row says nothing
                merged[options] = f"{merged[options]} = {label}"
        configs += [(f"{recipe} {label}", options) for options, label in merged.items()]
    return configs


def configurations(matrix: str, recipes: list[str]) -> list[tuple[str, QuantizeOptions | None]]:
    return rtn_configurations(recipes) if matrix == "rtn" else calibration_configurations(recipes)


def slug(label: str) -> str:
    return label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")


def run_one(label: str, options: QuantizeOptions | None, args, model_dir: Path, out_dir: Path) -> dict:
    dtype = getattr(torch, args.dtype)
    on_cpu = args.device == "cpu"
    start = time.perf_counter()
    torch.manual_seed(0)
    if options is None:
        model, tokenizer = load_model(model_dir, dtype=dtype)
        model.to(args.device)
    else:
        model, tokenizer, _, _ = simulated_model(model_dir, options, dtype=dtype, device=args.device, progress=False)
    calib_s = time.perf_counter() - start
    tasks = tuple(t for t in args.tasks.split(",") if t)
    # GPU batches sized for SmolLM2's 49k vocabulary, shrunk for larger ones (Qwen's 152k): the
    # float32 logits [tokens, V] dominate memory when several configurations share the GPU.
    shrink = max(1.0, json.loads((model_dir / "config.json").read_text()).get("vocab_size", 49152) / 49152)
    with torch.inference_mode():
        result = evaluate(model, tokenizer, seq_len=args.seq_len, tasks=tasks, limit=args.limit,
                          ppl_max_sequences=args.ppl_sequences,
                          ppl_batch_size=4 if on_cpu else max(1, int(32 / shrink)),
                          task_batch_size=64 if on_cpu else 512,
                          task_max_batch_tokens=args.batch_tokens or (2048 if on_cpu else int(32768 / shrink)))
    result.update(
        label=label, model=args.model, dtype=args.dtype,
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        options=None if options is None else repr(options),
        calibration_seconds=round(calib_s, 1), seconds=round(time.perf_counter() - start, 1),
    )
    (out_dir / f"{slug(label)}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--matrix", default="rtn", choices=MATRICES)
    parser.add_argument("--recipes", default=None,
                        help="comma-separated (default: w4a16,w4a4kv4,w3a3kv3 for rtn; "
                             "w3a3kv3,w4a4kv4,w3a8kv4,w3a16 for calibration)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (0 or unset: all)")
    parser.add_argument("--ppl-sequences", type=int, default=None, help="held-out windows (0 or unset: all)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--only", default=None, help="run only configurations whose label contains this")
    parser.add_argument("--exact", default=None, help="run only the configuration with exactly this label")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="token budget of one zero-shot batch (default 2048 on CPU, 32768 on GPU)")
    parser.add_argument("--workers", type=int, default=1, help="configurations run at a time (subprocesses)")
    parser.add_argument("--force", action="store_true", help="rerun configurations whose JSON exists")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="with --workers: start no configuration after deadline - 150 s and stop the "
                             "running ones at the deadline (they rerun next time)")
    parser.add_argument("--out", default="runs/accuracy")
    args = parser.parse_args()

    args.limit = args.limit or None
    args.ppl_sequences = args.ppl_sequences or None
    default_recipes = "w4a16,w4a4kv4,w3a3kv3" if args.matrix == "rtn" else "w3a3kv3,w4a4kv4,w3a8kv4,w3a16"
    recipes = (args.recipes or default_recipes).split(",")
    for r in recipes:
        if r not in RECIPES:
            parser.error(f"unknown recipe {r!r}; choose from {', '.join(RECIPES)}")
    configs = configurations(args.matrix, recipes)
    if args.exact is not None:
        configs = [c for c in configs if c[0] == args.exact]
    elif args.only:
        configs = [c for c in configs if args.only in c[0]]
    if args.list:
        for label, options in configs:
            print(f"{label}: {options!r}")
        return
    model_dir = _resolve_model(args.model)
    out_dir = Path(args.out) / Path(args.model).name
    out_dir.mkdir(parents=True, exist_ok=True)

    todo = [(label, o) for label, o in configs if args.force or not (out_dir / f"{slug(label)}.json").exists()]
    if args.workers > 1 and len(todo) > 1:
        # One subprocess per configuration, at most `workers` at a time; each writes its JSON.
        argv = sys.argv[1:]
        passthrough = [a for i, a in enumerate(argv) if not (a in ("--workers", "--deadline-s") or
                                                              (i > 0 and argv[i - 1] in ("--workers", "--deadline-s")))]
        running: list[tuple[str, subprocess.Popen, object]] = []
        # The rows the goals compare first (FP, RTN, QuaRot-style, full, random orthogonal), the
        # ablations after them: a deadline then cuts ablations, not headline rows.
        queue = sorted(todo, key=lambda c: " - " in c[0])
        began = time.monotonic()
        while queue or running:
            elapsed = time.monotonic() - began
            if args.deadline_s is not None and elapsed > args.deadline_s - 150:
                queue.clear()
            if args.deadline_s is not None and elapsed > args.deadline_s:
                for label, proc, log in running:
                    proc.kill()
                    print(f"stopped at the deadline: {label}", file=sys.stderr, flush=True)
            while queue and len(running) < args.workers:
                label, _ = queue.pop(0)
                log = open(out_dir / f"{slug(label)}.log", "w")
                cmd = [sys.executable, __file__, *passthrough, "--exact", label, "--workers", "1"]
                running.append((label, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
            time.sleep(2)
            for item in list(running):
                label, proc, log = item
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    print(f"{'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}: {label}",
                          file=sys.stderr, flush=True)
    else:
        for label, options in todo:
            try:
                run_one(label, options, args, model_dir, out_dir)
            except Exception as e:  # one bad configuration must not lose the others' results
                if args.exact is not None:
                    raise
                print(f"FAILED: {label}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    rows = []
    for label, _ in configs:
        path = out_dir / f"{slug(label)}.json"
        if path.exists():
            rows.append((label, json.loads(path.read_text())))
    print(results_to_markdown(rows))
    print("| config | calibration s | total s |\n|---|---:|---:|")
    for label, result in rows:
        print(f"| {label} | {result.get('calibration_seconds', '–')} | {result.get('seconds', '–')} |")


if __name__ == "__main__":
    main()
