"""Time the gradual binary search (GBS) on a model of real shape with random weights.

    python3 benchmarks/gbs_time.py --shape llama2-7b --layers 4 --out $OUT     # on the GPU
    .venv/bin/python benchmarks/gbs_time.py --shape smollm2 --layers 30        # the CPU figure

Builds a Llama-architecture model of the named shape with ``--layers`` decoder layers and random
weights (the clips it finds mean nothing; the time per layer is what is measured, since every
layer of a real model costs the same), writes it as a Hugging Face directory with SmolLM2's
tokenizer (whose ids fit the vocabulary chosen here), and runs the offline pipeline's rotation,
RTN weights and GBS at the recipe (default w3a3kv3, 16 windows of 256 tokens, as
``hadaquant quantize --clip-search gbs`` does). Prints the search time, the time per layer and the
full-depth extrapolation (per layer × the shape's real depth), and writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, heads, kv heads, real depth
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "qwen2.5-7b": (3584, 18944, 28, 4, 28),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 24),
    "smollm2": (576, 1536, 9, 3, 30),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--recipe", default="w3a3kv3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/gbs_time")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from hq_vllm.offline.cli import _resolve_model
    from hq_vllm.offline.pipeline import QuantizeOptions, prepare_model, quantize_model_weights

    hidden, inter, heads, kv_heads, depth = SHAPES[args.shape]
    tok_dir = _resolve_model("smollm2")
    work = Path(tempfile.mkdtemp(prefix="gbs_time_"))
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, num_hidden_layers=args.layers, vocab_size=49152,
                          max_position_embeddings=4096, tie_word_embeddings=False)
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(work)
        del model
        for f in tok_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name.startswith("special_tokens"):
                shutil.copy(f, work / f.name)

        options = QuantizeOptions(recipe=args.recipe, clip_search="gbs")
        t0 = time.perf_counter()
        prepared = prepare_model(work, options, device=args.device, progress=False)
        t_prepare = time.perf_counter() - t0
        quantize_model_weights(prepared, options, progress=True, pack=False)
        search = prepared.clip_search
        seconds = search.seconds if search is not None else float("nan")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_layer = seconds / args.layers
    result = {
        "shape": args.shape, "layers_run": args.layers, "real_depth": depth, "recipe": args.recipe,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "prepare_s": round(t_prepare, 1), "gbs_s": round(seconds, 1), "gbs_s_per_layer": round(per_layer, 2),
        "gbs_s_full_depth_extrapolated": round(per_layer * depth, 1), "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gbs_time_{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| shape | layers run | GBS s | s / layer | full depth (extrapolated) s |\n|---|---:|---:|---:|---:|")
    print(f"| {args.shape} | {args.layers} | {seconds:.1f} | {per_layer:.2f} | {per_layer * depth:.1f} ({depth} layers) |")


if __name__ == "__main__":
    main()
