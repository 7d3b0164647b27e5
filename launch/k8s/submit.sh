#!/usr/bin/env bash
# Renders launch/k8s/jobset.yaml (or indexed-job.yaml) with the train arguments and submits it with kubectl.
#
# Usage: [VAR=value ...] launch/k8s/submit.sh --config=configs/X.py --workdir=/workdir/RUN [--config.a.b=v ...]
# All arguments go to `python -m lipflow_jax.train` in every pod. Environment (defaults in brackets):
#   IMAGE (required)  NAME [lipflow-train]  NUM_PROCESSES [2]  GPUS_PER_PROCESS [8]  PVC [lipflow-workdir]
#   MAX_RESTARTS [3]  KIND [jobset | indexed-job]  DRY_RUN=1: print the manifest instead of applying it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kind="${KIND:-jobset}"
template="$here/$kind.yaml"
[[ -f "$template" ]] || { echo "$0: KIND must be jobset or indexed-job, got '$kind'" >&2; exit 2; }
[[ -n "${IMAGE:-}" || -n "${DRY_RUN:-}" ]] || { echo "$0: set IMAGE to the training image" >&2; exit 2; }
manifest="$(NAME="${NAME:-lipflow-train}" NUM_PROCESSES="${NUM_PROCESSES:-2}" \
  GPUS_PER_PROCESS="${GPUS_PER_PROCESS:-8}" PVC="${PVC:-lipflow-workdir}" MAX_RESTARTS="${MAX_RESTARTS:-3}" \
  IMAGE="${IMAGE:-IMAGE}" "${PYTHON:-python3}" - "$template" "$@" <<'PY'
import json, os, string, sys
template, args = sys.argv[1], sys.argv[2:]
values = {k: os.environ[k] for k in ('NAME', 'NUM_PROCESSES', 'GPUS_PER_PROCESS', 'PVC', 'MAX_RESTARTS', 'IMAGE')}
values['ARGS'] = json.dumps(args)  # a JSON list is a YAML flow sequence
with open(template) as f:
  print(string.Template(f.read()).substitute(values))
PY
)"
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%s\n' "$manifest"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
fi
