# Sourced by local.sh and multinode.sh before they exec torchrun, with the trainer's arguments as "$@".
# Settings, data paths (node 0) and output folders checked once, without torch: a mistake is one line and status 2,
# not one error per rank followed by torchrun's traceback and status 1. CHECK_CONFIG=0 skips it; PYTHON is the
# python to run it with (torchrun's) [python3]. Only a refusal (status 2) stops the launch: a python3 on PATH that
# is not torchrun's (without the trainer) fails otherwise, and then the check is skipped, not the launch.
# shellcheck shell=bash
if [[ "${CHECK_CONFIG:-1}" == 1 ]]; then
    check=0
    "${PYTHON:-python3}" -m trainer train --check-config "$@" || check=$?
    if [[ "$check" == 2 ]]; then
        exit 2
    elif [[ "$check" != 0 ]]; then
        echo "${0##*/}: the settings check could not run (status $check; set PYTHON to torchrun's python); going on" >&2
    fi
fi
