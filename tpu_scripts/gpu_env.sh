#!/usr/bin/env bash
# Shared settings of the GPU scripts (setup_gpu.sh, launch_gpu.sh); sourced. Set in the environment
# or in tpu_scripts/local.env:
#   HOSTS        space-separated ssh names of the nodes, the first is the coordinator (process 0)
#   COORD_PORT   port the coordinator listens on (default 12355)
#   REMOTE_DIR   where the code lives on every node (default prime-jax, relative to ~)
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

_ENV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -f "${_ENV_DIR}/local.env" ]]; then
  # shellcheck source=/dev/null
  source "${_ENV_DIR}/local.env"
fi

HOSTS="${HOSTS:-localhost}"
COORD_PORT="${COORD_PORT:-12355}"
REMOTE_DIR="${REMOTE_DIR:-prime-jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
PYTHON="${PYTHON:-python3}"
read -r -a HOST_LIST <<< "${HOSTS}"
NUM_HOSTS="${#HOST_LIST[@]}"
LAST_RUN_FILE="${LAST_RUN_FILE:-${HOME}/.cache/prime-jax/gpu.last_run}"

# Runs a command on one node (locally when the node is localhost).
node_run() {
  local host="$1"
  shift
  if [[ "${host}" == "localhost" || "${host}" == "127.0.0.1" ]]; then
    bash -c "$*"
  else
    ssh -o BatchMode=yes "${host}" "$*"
  fi
}
