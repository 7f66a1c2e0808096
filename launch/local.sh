#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU, or a few CPU processes.
#
#   launch/local.sh --config configs/demo.toml [--section.field VALUE ...]
#   NPROC=4 DEVICE=cpu launch/local.sh --config configs/demo.toml --train.threads 1
#   CONFIG=configs/demo.toml MAX_RESTARTS=2 launch/local.sh --run.dir runs/demo
#
# Every argument goes to `python -m trainer train` unchanged. Environment (default in brackets):
#   CONFIG          config file, passed as `--config CONFIG` before the arguments [unset: give --config yourself]
#   DEVICE          cpu | cuda | auto, passed as --train.device [unset: the config's train.device]
#   NPROC           processes on this machine [number of GPUs when nvidia-smi finds any (and DEVICE is not
#                   cpu), else 2]. Never torchrun's "auto": on CPU that means one process per visible core.
#   OMP_NUM_THREADS threads per process [cores / NPROC, at least 1]
#   MAX_RESTARTS    times torchrun restarts the whole group after a worker fails; each restart resumes from the
#                   newest checkpoint in run.dir [0]
#   MASTER_PORT     fixed port for the rendezvous (static, on 127.0.0.1) [unset: --standalone picks a free port]
#   CHECK_CONFIG    1: run `$PYTHON -m trainer train --check-config ARGS` first (settings, data paths on node 0,
#                   output folders; no torch, about 0.5 s), so a mistake is one line and status 2 instead of an
#                   error per rank plus torchrun's traceback and status 1; 0: skip it [1]
#   PYTHON          the python for that check, the one torchrun runs [python3]
#
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is exported: under --standalone, without it a restarted group sometimes fails
# to reconnect on torch 2.13 (gloo "connectFullMesh ... Connection refused"); with MASTER_PORT set (static
# rendezvous) torch shares the agent's store anyway, and the trainer's per-restart key prefix covers that case.
# The script `exec`s torchrun, so a SIGTERM sent to this script's PID reaches torchrun, which passes it to the
# workers: they checkpoint at the next step boundary and exit with 128 + the signal (torchrun then exits non-zero;
# run the same command again to resume). A worker signalled on its own (not through torchrun) also exits 143 (the
# ranks that stopped with it exit 0): torchrun counts that as a failure and, with MAX_RESTARTS > 0, restarts the
# group, which resumes from that checkpoint.
set -euo pipefail

gpu_count() {
    # GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every GPU nvidia-smi lists; 0 without one.
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ "$n" -gt 0 && -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" ]]; then
            n=0
        else
            n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
        fi
    fi
    echo "$n"
}

DEVICE="${DEVICE:-}"
case "${DEVICE:-auto}" in
    cpu | cuda | auto) ;;
    *) echo "local.sh: DEVICE must be cpu, cuda or auto, got '$DEVICE'" >&2; exit 2 ;;
esac
GPUS=0
if [[ "$DEVICE" != cpu ]]; then
    GPUS=$(gpu_count)
fi
if [[ "$DEVICE" == cuda && "$GPUS" -eq 0 ]]; then
    echo "local.sh: DEVICE=cuda but no GPU found (nvidia-smi missing or lists none)" >&2
    exit 2
fi
if [[ "$GPUS" -gt 0 ]]; then
    NPROC="${NPROC:-$GPUS}"
else
    NPROC="${NPROC:-2}"
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
MAX_RESTARTS="${MAX_RESTARTS:-0}"
CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
THREADS=$((CORES / NPROC))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun SIGKILLs its workers this long after passing on a SIGTERM (its default, 30 s, can cut a checkpoint short)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}"

if [[ -n "${MASTER_PORT:-}" ]]; then
    RDZV=(--nnodes 1 --node-rank 0 --master-addr 127.0.0.1 --master-port "$MASTER_PORT")
else
    RDZV=(--standalone --nnodes 1)
fi
if [[ -n "$DEVICE" ]]; then
    set -- --train.device "$DEVICE" "$@"
fi
if [[ -n "${CONFIG:-}" ]]; then
    set -- --config "$CONFIG" "$@"
fi

# the settings checked once, without torch (CHECK_CONFIG above)
# shellcheck source=check_config.sh disable=SC1091  # checked on its own (tests/e2e/test_torchrun.py)
source "$(dirname "${BASH_SOURCE[0]}")/check_config.sh"

echo "local.sh: $NPROC processes, device ${DEVICE:-from config}, OMP_NUM_THREADS=$OMP_NUM_THREADS, max restarts $MAX_RESTARTS" >&2
exec torchrun "${RDZV[@]}" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    -m trainer train "$@"
