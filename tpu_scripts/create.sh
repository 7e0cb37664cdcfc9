#!/usr/bin/env bash
# Creates the TPU VM slice for a preset through a queued resource (waits until it is ACTIVE).
#
#   PRESET=v5p-32 tpu_scripts/create.sh            # on-demand / reserved capacity
#   PRESET=v4-64 tpu_scripts/create.sh --spot      # spot (cheaper; may be preempted)
#   PRESET=v5e-64 tpu_scripts/create.sh --direct   # plain `tpu-vm create` without a queue
#
# Settings (env or tpu_scripts/local.env): PROJECT ZONE TPU_NAME QR_NAME ACCELERATOR_TYPE
# RUNTIME_VERSION; see tpu_scripts/env.sh for the defaults of each preset.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "${SCRIPT_DIR}/env.sh"

SPOT=0
DIRECT=0
RESERVED=0
for arg in "$@"; do
  case "${arg}" in
    --spot) SPOT=1 ;;
    --direct) DIRECT=1 ;;
    --reserved) RESERVED=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "create.sh: unknown argument ${arg}" >&2; exit 2 ;;
  esac
done

if [[ -z "${PROJECT}" ]]; then
  echo "create.sh: set PROJECT (or gcloud config set project ...)" >&2
  exit 2
fi

extra=()
if [[ "${SPOT}" == 1 ]]; then extra+=(--spot); fi
if [[ "${RESERVED}" == 1 ]]; then extra+=(--reserved); fi

echo "creating ${TPU_NAME}: ${ACCELERATOR_TYPE} (${RUNTIME_VERSION}) in ${ZONE}, project ${PROJECT}"
if [[ "${DIRECT}" == 1 ]]; then
  gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${extra[@]}"
  exit 0
fi

gcloud compute tpus queued-resources create "${QR_NAME}" --node-id="${TPU_NAME}" \
  --zone="${ZONE}" --project="${PROJECT}" --accelerator-type="${ACCELERATOR_TYPE}" \
  --runtime-version="${RUNTIME_VERSION}" "${extra[@]}"

echo "waiting for queued resource ${QR_NAME} to become ACTIVE (Ctrl-C stops waiting, not the request)"
while true; do
  state="$(gcloud compute tpus queued-resources describe "${QR_NAME}" --zone="${ZONE}" \
    --project="${PROJECT}" --format='value(state.state)' 2>/dev/null || echo UNKNOWN)"
  echo "$(date +%H:%M:%S) ${QR_NAME}: ${state}"
  case "${state}" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) echo "create.sh: queued resource is ${state}" >&2; exit 1 ;;
  esac
  sleep 60
done
echo "ready: next run tpu_scripts/setup.sh"
