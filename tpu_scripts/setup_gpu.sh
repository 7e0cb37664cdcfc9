#!/usr/bin/env bash
# Installs jax[cuda12] + requirements on every GPU node and copies this repository there.
#
#   HOSTS="gpu-node-0 gpu-node-1" tpu_scripts/setup_gpu.sh
#   HOSTS=localhost tpu_scripts/setup_gpu.sh        # one 8xH100 machine (installs in place)
#
# Needs: ssh access to each node (keys, no password), python3 >= 3.11 and an NVIDIA driver that
# supports CUDA 12 (the CUDA libraries come from pip).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
# shellcheck source=tpu_scripts/gpu_env.sh
source "${SCRIPT_DIR}/gpu_env.sh"

install="${PYTHON} -m pip install --upgrade pip && \
${PYTHON} -m pip install -r requirements.txt && \
${PYTHON} -m pip install 'jax[cuda12]==${JAX_VERSION}' && \
${PYTHON} -c 'import jax; print(jax.devices())'"

for host in "${HOST_LIST[@]}"; do
  echo "== ${host}"
  if [[ "${host}" == "localhost" || "${host}" == "127.0.0.1" ]]; then
    (cd "${REPO_DIR}" && bash -c "${install}")
  else
    tar -C "${REPO_DIR}" --exclude=.git --exclude=runs --exclude=logs --exclude='__pycache__' -czf - . \
      | ssh -o BatchMode=yes "${host}" "mkdir -p ~/${REMOTE_DIR} && tar -C ~/${REMOTE_DIR} -xzf -"
    node_run "${host}" "cd ~/${REMOTE_DIR} && ${install}"
  fi
done
