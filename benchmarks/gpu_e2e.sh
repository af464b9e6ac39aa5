#!/usr/bin/env bash
# Device side of benchmarks/e2e_bench.py (its docstring has the call plan).
#   bash benchmarks/gpu_e2e.sh stash N            # keep bundle part N (carried as .gpu/partN) in /tmp/b
#   bash benchmarks/gpu_e2e.sh run N|- ARGS...    # stash part N (or none: "-"), unpack the bundle once,
#                                                 # install the plugin, run e2e_bench.py ARGS
# Results: /tmp/hq_e2e/e2e_<shape>.json (kept between calls, resumed), copied to $OUT with the logs.
set -euo pipefail
mode=$1 n=$2
shift 2
mkdir -p /tmp/b
if [[ $n != - && -f .gpu/part$n/part$n ]]; then cp .gpu/part$n/part$n /tmp/b/part$n; fi
[[ -f .gpu/SHA256 ]] && cp .gpu/SHA256 /tmp/b/SHA256
ls -l /tmp/b
if [[ $mode == stash ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  df -h /tmp | tail -1
  exit 0
fi
[[ $mode == run ]] || { echo "usage: gpu_e2e.sh stash N | run N|- ARGS"; exit 2; }

# (benchmarks/gpu_plugin_check.sh unpacks the same bundle from its chunks c0..c2 to /tmp/site too)
if [[ ! -f /tmp/site/.unpacked && ! -d /tmp/site/vllm ]]; then
  for i in 0 1 2; do [[ -f /tmp/b/part$i ]] || { echo "bundle part $i missing: run 'stash $i' first"; exit 1; }; done
  if [[ -f /tmp/b/SHA256 ]]; then
    got=$(cat /tmp/b/part0 /tmp/b/part1 /tmp/b/part2 | sha256sum | cut -d' ' -f1)
    [[ $got == "$(cat /tmp/b/SHA256)" ]] || { echo "bundle: bad sha256 ($got)"; exit 1; }
  fi
  rm -rf /tmp/site && mkdir -p /tmp/site
  cat /tmp/b/part0 /tmp/b/part1 /tmp/b/part2 | xz -d -T0 | tar -x -C /tmp/site
  touch /tmp/site/.unpacked
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

shape=llama2-7b
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --shape ]] && { j=$((i + 1)); shape=${!j}; }; done
work=/tmp/hq_e2e results=/tmp/hq_e2e/e2e_$shape.json
mkdir -p $work
# A results file carried back from an earlier session continues there (a fresh machine).
[[ ! -f $results && -f runs/e2e/e2e_$shape.json ]] && cp runs/e2e/e2e_$shape.json "$results"

# Whole call <= 600 s: keep the benchmark (and its last table) inside ~565 s from the start.
budget=$((565 - SECONDS))
out=${OUT:-runs/e2e}
mkdir -p "$out"
set +e
timeout -k 5 $budget python3 benchmarks/e2e_bench.py run --workdir $work --out "$results" \
  --deadline-s $((budget - 20)) "$@" 2>&1 | tee "$out/stdout.txt"
set -e
cp "$results" "$out/" 2>/dev/null || true
mkdir -p "$out/logs" && cp $work/logs/*.log "$out/logs/" 2>/dev/null || true
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
df -h /tmp | tail -1
python3 benchmarks/e2e_bench.py table --out "$results" --shape "$shape"
