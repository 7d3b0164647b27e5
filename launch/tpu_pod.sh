#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: the same command on every worker (one process per host), started over
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the hosts from the TPU metadata (LIPFLOW_DISTRIBUTED=jax).
#
# Usage (from the repository root; TPU_NAME and ZONE name an existing TPU VM, e.g. a v4-32 or v5litepod-16):
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh --install     # copy this checkout + install, all hosts
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh --config=configs/dam_synthetic.py \
#       --workdir=/mnt/shared/runs/dam1 [--config.a.b=v ...]
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh --install --config=... --workdir=...   # both
# Environment: TPU_NAME, ZONE (required), PROJECT (default: gcloud's), REMOTE_DIR (default: lipflow_jax, in the
# remote home). Arguments other than --install go to `python -m lipflow_jax.train` unchanged. The workdir (and the
# dataset's data_dir) must be a filesystem all hosts see (e.g. a Filestore/NFS mount); rerunning resumes.
# To stop a run: Ctrl-C here stops the ssh sessions; processes left on the hosts (they hold the TPU) can be
# stopped with: gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
#   --command='sudo lsof -t /dev/accel* | xargs -r kill'
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REMOTE_DIR="${REMOTE_DIR:-lipflow_jax}"
gcloud_args=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

install=0
train_args=()
for arg in "$@"; do
  if [[ "$arg" == "--install" ]]; then install=1; else train_args+=("$arg"); fi
done

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command "$1"
}

if [[ $install -eq 1 ]]; then
  # The committed tree of this checkout (git archive), copied to every worker, then a venv with jax[tpu].
  archive="$(mktemp -t lipflow_jax.XXXXXX.tar.gz)"
  trap 'rm -f "$archive"' EXIT
  git archive --format=tar.gz -o "$archive" HEAD
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":lipflow_jax.tar.gz "${gcloud_args[@]}" --worker=all
  on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf lipflow_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR \
    && python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip \
    && pip install -q -r requirements.txt && pip install -q 'jax[tpu]==$jax_version' && pip install -q --no-deps -e . \
    && python -c 'import jax; print(jax.devices())'"
fi

if [[ ${#train_args[@]} -gt 0 ]]; then
  quoted="$(printf '%q ' "${train_args[@]}")"
  echo "[tpu_pod] $TPU_NAME ($ZONE), every worker: python -m lipflow_jax.train $quoted"
  on_all_workers "cd $REMOTE_DIR && . .venv/bin/activate && LIPFLOW_DISTRIBUTED=jax PYTHONUNBUFFERED=1 \
    python -m lipflow_jax.train $quoted"
fi
