"""Static cost of the paged-attention kernel without a GPU: compile it for sm_90a (H100/H200)
with Triton's bundled ptxas and count the SASS instructions of its KV loop.

    python benchmarks/paged_attention_sass.py [--bits 3 4] [--group 4 1] [--unpack 0 1 2]
        [--block-n 32 64 128] [--warps 4] [--dtype bf16] [--no-codes16]

Prints, per launch variant, the warp instructions the KV loop issues per (token, KV head)
(loop length x warps / BLOCK_N), the registers, and the most frequent opcodes. An H200 SM
issues 4 warp instructions per clock, so at 132 SMs x 1.98 GHz and ~4.8 TB/s a loop that
reads ``slot`` bytes per token and head must stay under ~``slot / 4.5`` of them to be bound by
memory (about 23 for head_dim 128 at 3 bits). The count leaves out latency, occupancy and the
tensor cores: it ranks variants, ``paged_attention_bench.py`` on the GPU measures them. The
KV loop is found as the longest backward branch of the SASS; decode shapes (q_len 1).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paged_attention_bench import pa  # noqa: E402  (hq_vllm.kernels from the checkout)

_ARGS = {  # the kernel's runtime arguments and their Triton types (pointer dtypes per query dtype)
    "q_ptr": None, "out_ptr": None, "cache_i32_ptr": "*i32", "cache_f16_ptr": "*fp16", "cache_u8_ptr": "*u8",
    "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "part_acc_ptr": "*fp32",
    "part_ml_ptr": "*fp32", "num_q_heads": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32",
    "stride_oh": "i32", "stride_cb": "i64", "stride_ch": "i32", "stride_bt": "i32", "qk_scale": "fp32",
    "window": "i32", "magic": "i32", "k16_magic": "i32", "v16_magic": "i32", "k16_magic2": "i32",
    "v16_magic2": "i32", "num_splits": "i32",
}
_ALIGNED = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_cb", "stride_ch", "stride_bt")


def compile_decode(bits, group, block_n, unpack, codes16, num_warps, dtype="bf16", head_dim=128, page=16):
    """The compiled kernel (sm_90a) for one decode launch of ``pa.paged_attention``."""
    fn = triton.runtime.JITFunction(pa._paged_attention_kernel_source)
    fp32, bf16 = dtype == "fp32", dtype == "bf16"
    k16 = codes16 and not fp32 and not (bf16 and bits > 7)
    gp = pa._next_pow2(group)
    unpack = unpack if unpack != 2 or bits in (3, 4) else 1
    const = dict(GROUP=group, GROUP_PAD=gp, BLOCK_Q=max(1, 16 // gp), BLOCK_N=block_n, HEAD_DIM=head_dim,
                 D_PAD=pa._next_pow2(head_dim), BITS=bits, SLOT=pa.kv_slot_bytes(head_dim, bits), PAGE=page,
                 SPLIT=False, HAS_QSL=True, HAS_WINDOW=False, DOT_IN_FP32=False,
                 QK_PRECISION="tf32x3" if fp32 else "exact16", PV_PRECISION="tf32x3" if fp32 else "tf32",
                 UNPACK=unpack, K16=k16, K16_OFF=128.0 if bf16 else 1024.0,
                 K16_DTYPE=tl.bfloat16 if bf16 else tl.float16, V16=codes16 and not fp32)
    q_type = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    sig = {k: (v or q_type) for k, v in _ARGS.items()} | {k: "constexpr" for k in const}
    names = fn.arg_names
    src = ASTSource(fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                           if n.endswith("_ptr") or n in _ALIGNED})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def kv_loop(kernel) -> tuple[list[str], int]:
    """(opcodes of the longest loop, registers per thread) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    loops = [(int(m.group(1), 16), a) for a, op in ins if (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op))
             and int(m.group(1), 16) < a]
    if not loops:
        raise RuntimeError("no backward branch found in the SASS")
    start, end = max(loops, key=lambda x: x[1] - x[0])
    ops = [re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0] for a, op in ins if start <= a <= end]
    regs = re.search(r"REG:(\d+)", res)
    return ops, int(regs.group(1)) if regs else -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group", type=int, nargs="+", default=[4, 1], help="query heads per KV head")
    p.add_argument("--unpack", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-codes16", action="store_true")
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    print(f"triton {triton.__version__}, sm_90a, decode, head_dim {args.head_dim}, {args.dtype} queries")
    print("| bits | G | unpack | block_n | warps | instr / (token, KV head) | registers | top opcodes |")
    print("|---|---|---|---|---|---|---|---|")
    for bits, g, unpack, bn, w in itertools.product(args.bits, args.group, args.unpack, args.block_n, args.warps):
        try:
            ops, regs = kv_loop(compile_decode(bits, g, bn, unpack, not args.no_codes16, w, args.dtype, args.head_dim))
        except Exception as e:  # a variant that does not compile (or pipelines away its loop) is reported
            print(f"| {bits} | {g} | {unpack} | {bn} | {w} | error: {str(e)[:80]} | | |", flush=True)
            continue
        top = ", ".join(f"{o} {c}" for o, c in collections.Counter(ops).most_common(6))
        print(f"| {bits} | {g} | {unpack} | {bn} | {w} | {len(ops) * w / bn:.0f} | {regs} | {top} |", flush=True)


if __name__ == "__main__":
    main()
