#!/usr/bin/env bash
# Runs N processes of one training job on this machine's CPU, joined by jax.distributed on 127.0.0.1
# (gloo collectives). Each process gets its own host CPU devices, its output is prefixed with [p<i>], the
# launcher waits for all, and if one fails the others are killed and the launcher exits non-zero.
#
# Usage:
#   launch/local.sh [--devices_per_process=K] [--heartbeat_timeout=S] [--timeout=T] N \
#       --config=configs/X.py[:variant] --workdir=DIR [--config.a.b=v ...]
# Everything after N is passed to `python -m lipflow_jax.train` unchanged. Environment:
#   PYTHON                 interpreter of the launcher and of the training (default: python)
#   LIPFLOW_LOCAL_COMMAND  the command each process runs instead of "$PYTHON -m lipflow_jax.train"
# Example:
#   launch/local.sh --devices_per_process=2 2 --config=configs/dam_synthetic.py:tiny --workdir=/tmp/lipflow_2p
# The launcher is lipflow_jax/launch_local.py (the tests use it too); its docstring has the exit codes.
set -euo pipefail

exec "${PYTHON:-python}" -m lipflow_jax.launch_local "$@"
