#!/usr/bin/env bash
# Shared settings of the tpu_scripts. Sourced by the other scripts; every value can be set in the
# environment first (e.g. `export TPU_NAME=my-slice ZONE=us-east5-a`), or in tpu_scripts/local.env.
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

_ENV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "${_ENV_DIR}/local.env" ]]; then
  # shellcheck source=/dev/null
  source "${_ENV_DIR}/local.env"
fi

# Which slice: v5p-32 | v4-64 | v5e-64 (the presets of configs/qwen7b.py); sets the defaults below.
PRESET="${PRESET:-v5p-32}"

case "${PRESET}" in
  v5p-32)
    _ACCEL="v5p-32"; _RUNTIME="v2-alpha-tpuv5"; _ZONE="us-east5-a" ;;
  v4-64)
    _ACCEL="v4-64"; _RUNTIME="tpu-ubuntu2204-base"; _ZONE="us-central2-b" ;;
  v5e-64)
    _ACCEL="v5litepod-64"; _RUNTIME="v2-alpha-tpuv5-lite"; _ZONE="us-west4-a" ;;
  *)
    _ACCEL="${PRESET}"; _RUNTIME="tpu-ubuntu2204-base"; _ZONE="us-central2-b" ;;
esac

PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
ZONE="${ZONE:-${_ZONE}}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-${_ACCEL}}"
RUNTIME_VERSION="${RUNTIME_VERSION:-${_RUNTIME}}"
TPU_NAME="${TPU_NAME:-prime-jax-${PRESET}}"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
# Where the code lives on every worker, and the jax version to install there.
REMOTE_DIR="${REMOTE_DIR:-prime-jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
# Multi-host checkpoints need one folder that every worker sees: a GCS bucket mounted with gcsfuse
# at MOUNT_DIR on all workers (setup.sh mounts it when BUCKET is set; launch.sh writes runs there).
BUCKET="${BUCKET:-}"
MOUNT_DIR="${MOUNT_DIR:-/mnt/prime-jax}"
# The name of the last run launch.sh started (for logs.sh and stop.sh).
LAST_RUN_FILE="${LAST_RUN_FILE:-${HOME}/.cache/prime-jax/${TPU_NAME}.last_run}"

# gcloud ssh/scp to the workers of the slice: tpu_ssh WORKER COMMAND...
tpu_ssh() {
  local worker="$1"
  shift
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker="${worker}" --command="$*"
}
