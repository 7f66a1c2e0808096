#!/usr/bin/env bash
# Train on several machines: run this once on every node (by hand, or from slurm.sbatch). The container image does
# not ship it: its pods run torchrun directly, with the same PET_* variables set in the manifests (k8s/).
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/demo.toml
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config configs/demo.toml
#
# Every argument goes to `python -m trainer train` unchanged. Environment (default in brackets); each maps to
# the PET_* variable that torchrun reads for an option not given on its command line, and an already-set PET_*
# variable (Kubeflow PyTorchJob / TrainJob inject them) is kept when the plain one is unset:
#   NNODES          number of nodes                            -> PET_NNODES          [$PET_NNODES, else 1]
#   NODE_RANK       this node's rank, 0 .. NNODES-1            -> PET_NODE_RANK       [$PET_NODE_RANK, else 0]
#   MASTER_ADDR     address of node 0, reachable from all      -> PET_MASTER_ADDR     [$PET_MASTER_ADDR, else 127.0.0.1]
#   MASTER_PORT     TCP port on node 0 for the rendezvous      -> PET_MASTER_PORT     [$PET_MASTER_PORT, else 29500]
#   NPROC_PER_NODE  processes on each node                     -> PET_NPROC_PER_NODE  [$PET_NPROC_PER_NODE, else
#                   the number of GPUs nvidia-smi finds (CUDA_VISIBLE_DEVICES respected), else 1]. torchrun's
#                   "auto" / "cpu" are refused on a machine without GPUs: they mean one process per visible core,
#                   not per core the job was given.
#   MAX_RESTARTS    whole-group restarts after a failure       -> PET_MAX_RESTARTS    [$PET_MAX_RESTARTS, else 0]
#   RDZV_TIMEOUT    seconds node 0 waits for every node        -> PET_RDZV_CONF=timeout=N  [1800; torch's own
#                   default, 600, is short for a node that first pulls a multi-GB image or waits for a GPU]
#   CONFIG          config file, passed as `--config CONFIG`  [unset: give --config yourself]
#   DEVICE          cpu | cuda | auto, passed as --train.device [unset: the config's train.device]
#   OMP_NUM_THREADS threads per process [cores / NPROC_PER_NODE, at least 1]
#   CHECK_CONFIG    1: run `$PYTHON -m trainer train --check-config ARGS` first (settings, data paths on node 0,
#                   output folders; no torch, about 0.5 s), so a mistake is one line and status 2 instead of an
#                   error per rank plus torchrun's traceback and status 1; 0: skip it [1]
#   PYTHON          the python for that check, the one torchrun runs [python3]
#
# Rendezvous is static: torchrun's default backend with master address, port and node rank, so every node must
# start (within the rendezvous timeout). Prefer whole-gang restarts by the scheduler (Slurm requeue, JobSet, a
# resubmission) to MAX_RESTARTS: either way the new group resumes from the newest checkpoint in run.dir. Keep run.dir on storage every node shares. Multi-node gloo/NCCL also needs all TCP
# ports between the nodes open (workers listen on random ports). The script `exec`s torchrun: a SIGTERM to its
# PID (pre-emption) reaches the workers, which checkpoint at the next step boundary and exit.
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

fail() {
    echo "multinode.sh: $*" >&2
    exit 2
}

DEVICE="${DEVICE:-}"
case "${DEVICE:-auto}" in
    cpu | cuda | auto) ;;
    *) fail "DEVICE must be cpu, cuda or auto, got '$DEVICE'" ;;
esac
GPUS=0
if [[ "$DEVICE" != cpu ]]; then
    GPUS=$(gpu_count)
fi
[[ "$DEVICE" == cuda && "$GPUS" -eq 0 ]] && fail "DEVICE=cuda but no GPU found (nvidia-smi missing or lists none)"

export PET_NNODES="${NNODES:-${PET_NNODES:-1}}"
export PET_NODE_RANK="${NODE_RANK:-${PET_NODE_RANK:-0}}"
export PET_MASTER_ADDR="${MASTER_ADDR:-${PET_MASTER_ADDR:-127.0.0.1}}"
export PET_MASTER_PORT="${MASTER_PORT:-${PET_MASTER_PORT:-29500}}"
export PET_MAX_RESTARTS="${MAX_RESTARTS:-${PET_MAX_RESTARTS:-0}}"
if [[ "$GPUS" -gt 0 ]]; then
    export PET_NPROC_PER_NODE="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-$GPUS}}"
else
    export PET_NPROC_PER_NODE="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-1}}"
fi

[[ "$PET_NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES must be a positive integer (a fixed size; no elastic range), got '$PET_NNODES'"
[[ "$PET_NODE_RANK" =~ ^[0-9]+$ && "$PET_NODE_RANK" -lt "$PET_NNODES" ]] \
    || fail "NODE_RANK must be in 0..$((PET_NNODES - 1)), got '$PET_NODE_RANK'"
[[ "$PET_MASTER_PORT" =~ ^[0-9]+$ ]] || fail "MASTER_PORT must be a port number, got '$PET_MASTER_PORT'"
[[ "$PET_MAX_RESTARTS" =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS must be >= 0, got '$PET_MAX_RESTARTS'"
if ! [[ "$PET_NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
    if [[ "$GPUS" -eq 0 ]]; then
        fail "NPROC_PER_NODE must be a number of processes on a machine without GPUs, got '$PET_NPROC_PER_NODE'"
    fi
    [[ "$PET_NPROC_PER_NODE" == gpu || "$PET_NPROC_PER_NODE" == auto ]] \
        || fail "NPROC_PER_NODE must be a number, gpu or auto, got '$PET_NPROC_PER_NODE'"
    PET_NPROC_PER_NODE="$GPUS"
fi

CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
THREADS=$((CORES / PET_NPROC_PER_NODE))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun SIGKILLs its workers this long after passing on a SIGTERM (its default, 30 s, can cut a checkpoint short)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}"
# The rendezvous is fixed by master address, port and node rank; clear the other rendezvous variables a
# platform may have set, so torchrun does not pick an elastic backend behind our back.
unset PET_RDZV_BACKEND PET_RDZV_ENDPOINT PET_RDZV_ID PET_STANDALONE
export PET_RDZV_CONF="timeout=${RDZV_TIMEOUT:-1800}"

if [[ -n "$DEVICE" ]]; then
    set -- --train.device "$DEVICE" "$@"
fi
if [[ -n "${CONFIG:-}" ]]; then
    set -- --config "$CONFIG" "$@"
fi

# the settings checked once, without torch (CHECK_CONFIG above)
# shellcheck source=check_config.sh disable=SC1091  # checked on its own (tests/e2e/test_torchrun.py)
source "$(dirname "${BASH_SOURCE[0]}")/check_config.sh"

echo "multinode.sh: node $PET_NODE_RANK of $PET_NNODES, $PET_NPROC_PER_NODE processes, master" \
    "$PET_MASTER_ADDR:$PET_MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS, max restarts $PET_MAX_RESTARTS" >&2
exec torchrun -m trainer train "$@"
