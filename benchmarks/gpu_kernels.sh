#!/usr/bin/env bash
# Issue 5's kernels on a lent GPU, one call, nothing to install (the image's torch + Triton):
# each benchmark first checks its kernel against the torch reference on fresh random inputs on
# the GPU, then times it; JSON results and logs land in $OUT, a short table per benchmark last.
#   run(command="bash benchmarks/gpu_kernels.sh", timeout_s=600)
#   HQ_KERNELS="fhq attn gbs" bash benchmarks/gpu_kernels.sh   # a subset (kvw: the fused KV write)
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
step gemm 150 python3 benchmarks/gemm_bench.py --out "$OUT"
step kvw 300 python3 benchmarks/kv_write_bench.py --sweep --out "$OUT/kv_write.json"
