"""KV-cache capacity: tokens that vLLM's KV-cache manager fits into the same memory with
hadaquant's packed cache (hq_int8 / hq_int4 / hq_int3) against the model-dtype cache.

One engine per KV dtype on the same checkpoint; each engine logs "KV cache size: N tokens" at
start-up, which is what is read (nothing is generated). On CPU the KV space is fixed by
``VLLM_CPU_KVCACHE_SPACE`` (GiB), so the ratio is exactly the page-size ratio; on a GPU it is
the memory left after weights and activations.

    .venv/bin/python benchmarks/kv_capacity.py [CKPT] [--dtype bfloat16] [--space-gib 1]

Without CKPT it makes a W4A16 SmolLM2 checkpoint under runs/ first. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

KV_DTYPES = ("auto", "hq_int8", "hq_int4", "hq_int3")

_CHILD = """
import sys
from vllm import LLM
LLM(model=sys.argv[1], dtype=sys.argv[2], kv_cache_dtype=sys.argv[3], enforce_eager=True,
    max_model_len=2048, seed=0)
"""


def capacity_tokens(ckpt: str, dtype: str, kv_cache_dtype: str, space_gib: int) -> int:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(space_gib), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, ckpt, dtype, kv_cache_dtype],
                          capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"engine with kv_cache_dtype={kv_cache_dtype} failed:\n{log[-4000:]}")
    return int(found[-1].replace(",", ""))


def _default_checkpoint() -> str:
    from hq_vllm.offline.model_io import cached_model_dir
    from hq_vllm.offline.pipeline import QuantizeOptions, quantize_to_checkpoint

    out = Path("runs/smollm2-w4a16-kvbench")
    if not (out / "config.json").exists():
        quantize_to_checkpoint(cached_model_dir("smollm2"), out, QuantizeOptions(recipe="w4a16"))
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", nargs="?")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (an integer)")
    args = p.parse_args()
    ckpt = args.ckpt or _default_checkpoint()

    from hq_vllm.kernels.kv_cache import kv_slot_bytes
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = 2 if args.dtype in ("bfloat16", "float16") else 4
    rows = []
    base = None
    for kv in KV_DTYPES:
        tokens = capacity_tokens(ckpt, args.dtype, kv, args.space_gib)
        base = base or tokens
        slot = 2 * head_dim * elem if kv == "auto" else kv_slot_bytes(head_dim, int(kv[len("hq_int"):]))
        rows.append((kv, slot, tokens, tokens / base))
    print(f"\ncheckpoint {ckpt}, dtype {args.dtype}, head_dim {head_dim}, KV space {args.space_gib} GiB\n")
    print("| kv_cache_dtype | bytes per token and KV head | KV cache tokens | vs model dtype |")
    print("|---|---|---|---|")
    for kv, slot, tokens, ratio in rows:
        name = f"auto ({args.dtype})" if kv == "auto" else kv
        print(f"| {name} | {slot} | {tokens:,} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
