#!/usr/bin/env bash
# Issue 5's kernels on a lent GPU, one call, nothing to install (the image's torch + Triton):
# each benchmark first checks its kernel against the torch reference on fresh random inputs on
# the GPU, then times it; JSON results and logs land in $OUT, a short table per benchmark last.
#   run(command="bash benchmarks/gpu_kernels.sh", timeout_s=600)
#   HQ_KERNELS="gemm i8" bash benchmarks/gpu_kernels.sh   # a subset; one call must stay under 600 s:
#   steps: fhq (fused Hadamard+quant, ~60 s), attn (paged attention, ~120 s), gemm (GEMV/dot sweep,
#   <= 300 s), i8 (int8 prefill GEMM, 2-5 min), kvw (KV-cache write, ~60-120 s) (kvw: the fused KV write)
set -uo pipefail
OUT=${OUT:-runs/gpu_kernels}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/kcode PYTHONUNBUFFERED=1
rm -rf /tmp/kcode && mkdir -p /tmp/kcode && cp -r hq_vllm /tmp/kcode/hq_vllm && cp -r offline /tmp/kcode/hq_vllm/offline \
  && cp -r kernels /tmp/kcode/hq_vllm/kernels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
todo=${HQ_KERNELS:-fhq attn}
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [[ " $todo " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?" >> "$OUT/$name.log"
  tail -n 30 "$OUT/$name.log"
}
step fhq 200 python3 benchmarks/hadamard_quant_bench.py --out "$OUT/hadamard_quant.json" \
  --configs '[{}, {"_FP16_MAX_BITS": 8}, {"num_warps": 16}]'
step attn 200 python3 benchmarks/paged_attention_bench.py --out "$OUT/paged_attention.json"
step gemm 300 python3 benchmarks/gemm_bench.py --sweep --bits 3 4 --m 1 8 --budget-s 220 --out "$OUT"
step i8 280 python3 benchmarks/int8_gemm_bench.py --out "$OUT/int8_gemm.json"
step kvw 200 python3 benchmarks/kv_write_bench.py --sweep --out "$OUT/kv_write.json"
