"""Run the accuracy matrix of docs/ACCURACY.md: FP and each recipe without and with rotation.

    .venv/bin/python benchmarks/accuracy_matrix.py smollm2 --limit 500 --ppl-sequences 64

Each configuration is one `hadaquant eval` run in this process (the same code path as the CLI);
results go to runs/accuracy/<model>/<config>.json and a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hq_vllm.offline.cli import _resolve_model
from hq_vllm.offline.evaluate import TASKS, evaluate, results_to_markdown
from hq_vllm.offline.model_io import load_model
from hq_vllm.offline.pipeline import QuantizeOptions, simulated_model


def configurations(recipes: list[str]) -> list[tuple[str, QuantizeOptions | None]]:
    configs: list[tuple[str, QuantizeOptions | None]] = [("FP", None)]
    for recipe in recipes:
        configs.append((f"{recipe} RTN, no rotation", QuantizeOptions(recipe=recipe, rotate=False)))
        configs.append((f"{recipe} RTN, rotated", QuantizeOptions(recipe=recipe, rotate=True)))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--recipes", default="w4a16,w4a4kv4,w3a3kv3")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (0 or unset: all)")
    parser.add_argument("--ppl-sequences", type=int, default=None, help="held-out 512-token windows (0 or unset: all)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--only", default=None, help="run only configurations whose label contains this")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="token budget of one zero-shot batch (default 2048 on CPU, 32768 on GPU)")
    parser.add_argument("--out", default="runs/accuracy")
    args = parser.parse_args()

    args.limit = args.limit or None
    args.ppl_sequences = args.ppl_sequences or None
    model_dir = _resolve_model(args.model)
    out_dir = Path(args.out) / Path(args.model).name
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    dtype = getattr(torch, args.dtype)
    on_cpu = args.device == "cpu"
    batch_tokens = args.batch_tokens or (2048 if on_cpu else 32768)
    rows = []
    for label, options in configurations(args.recipes.split(",")):
        if args.only and args.only not in label:
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        if options is None:
            model, tokenizer = load_model(model_dir, dtype=dtype)
            model.to(args.device)
        else:
            model, tokenizer, _, _ = simulated_model(model_dir, options, dtype=dtype, device=args.device, progress=False)
        with torch.inference_mode():
            result = evaluate(model, tokenizer, seq_len=args.seq_len, tasks=tasks, limit=args.limit,
                              ppl_max_sequences=args.ppl_sequences, ppl_batch_size=4 if on_cpu else 32,
                              task_batch_size=64 if on_cpu else 512, task_max_batch_tokens=batch_tokens)
        result.update(label=label, model=args.model, dtype=args.dtype, device=torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu', seconds=round(time.perf_counter() - start, 1))
        slug = label.replace(" ", "_").replace(",", "")
        (out_dir / f"{slug}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        rows.append((label, result))
        del model
    print(results_to_markdown(rows))


if __name__ == "__main__":
    main()
