#!/usr/bin/env bash
# Runs N processes of one training job on this machine's CPU, joined by jax.distributed on 127.0.0.1
# (gloo collectives). Each process gets its own host CPU devices, its output is prefixed with [p<i>], the
# launcher waits for all, and if one fails the others are killed and the launcher exits non-zero.
#
# Usage:
#   launch/local.sh [--devices_per_process=K] [--heartbeat_timeout=S] N --config=configs/X.py[:variant] \
#       --workdir=DIR [--config.a.b=v ...]
# Everything after N is passed to `python -m lipflow_jax.train` unchanged. Environment:
#   PYTHON                 interpreter (default: python)
#   LIPFLOW_LOCAL_COMMAND  the command each process runs instead of "$PYTHON -m lipflow_jax.train"
# Example:
#   launch/local.sh --devices_per_process=2 2 --config=configs/dam_synthetic.py:tiny --workdir=/tmp/lipflow_2p
set -euo pipefail

devices=1
heartbeat=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}"; shift ;;
    --devices_per_process) devices="$2"; shift 2 ;;
    --heartbeat_timeout=*) heartbeat="${1#*=}"; shift ;;
    --heartbeat_timeout) heartbeat="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--devices_per_process=K] [--heartbeat_timeout=S] N [train args...]" >&2
  exit 2
fi
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: --devices_per_process must be a positive integer, got '$devices'" >&2
  exit 2
fi
num_processes="$1"
shift

PYTHON="${PYTHON:-python}"
read -r -a command <<< "${LIPFLOW_LOCAL_COMMAND:-$PYTHON -m lipflow_jax.train}"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# Every process gets exactly $devices CPU devices, whatever XLA_FLAGS says outside.
xla_flags="$(printf '%s\n' ${XLA_FLAGS:-} | grep -v -- '^--xla_force_host_platform_device_count' | tr '\n' ' ' || true)"
xla_flags="${xla_flags}--xla_force_host_platform_device_count=${devices}"

pids=()
cleanup() {
  local sig="${1:-TERM}"
  for pid in "${pids[@]}"; do
    kill -s "$sig" -- "-$pid" 2>/dev/null || true
  done
}
on_signal() {
  echo "[launcher] interrupted: stopping all processes" >&2
  cleanup TERM
  sleep 2
  cleanup KILL
  exit 130
}
trap on_signal INT TERM

echo "[launcher] ${num_processes} processes x ${devices} CPU devices, coordinator 127.0.0.1:${port}: ${command[*]} $*"
for ((i = 0; i < num_processes; i++)); do
  # setsid: each process leads its own process group, so that killing it also kills its children.
  env XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$devices" PYTHONUNBUFFERED=1 \
      LIPFLOW_COORDINATOR_ADDRESS="127.0.0.1:${port}" LIPFLOW_NUM_PROCESSES="$num_processes" \
      LIPFLOW_PROCESS_ID="$i" ${heartbeat:+LIPFLOW_HEARTBEAT_TIMEOUT="$heartbeat"} \
      setsid "${command[@]}" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 < /dev/null &
  pids+=("$!")
done

status=0
killer=""
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  finished=""
  set +e
  wait -n -p finished "${remaining[@]}"
  rc=$?
  set -e
  [[ -z "$finished" ]] && break
  for i in "${!pids[@]}"; do
    [[ "${pids[$i]}" == "$finished" ]] && index=$i
  done
  new=()
  for pid in "${remaining[@]}"; do
    [[ "$pid" != "$finished" ]] && new+=("$pid")
  done
  remaining=("${new[@]+"${new[@]}"}")
  if [[ $rc -ne 0 ]]; then
    echo "[launcher] process ${index} failed (exit ${rc})" >&2
    if [[ $status -eq 0 ]]; then
      status=$rc
      if [[ ${#remaining[@]} -gt 0 ]]; then
        echo "[launcher] stopping the other processes" >&2
        cleanup TERM  # a multi-process JAX worker may treat TERM as a preemption notice: KILL follows
        ( sleep 5; cleanup KILL ) &
        killer=$!
      fi
    fi
  fi
done
[[ -n "$killer" ]] && kill "$killer" 2>/dev/null || true
wait 2>/dev/null || true  # the output filters
if [[ $status -eq 0 ]]; then
  echo "[launcher] all ${num_processes} processes finished"
fi
exit "$status"
