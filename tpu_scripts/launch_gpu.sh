#!/usr/bin/env bash
# Starts `python -m prime_jax.main` on every GPU node: one process per node driving all its GPUs.
#
#   HOSTS="gpu-node-0 gpu-node-1" tpu_scripts/launch_gpu.sh configs/qwen7b.py:16xh100
#   HOSTS=localhost tpu_scripts/launch_gpu.sh configs/qwen7b.py:8xh100 --config.total_steps=240
#
# Process i runs on the i-th host of HOSTS with PRIME_PROCESS_ID=i, PRIME_NUM_PROCESSES=#HOSTS
# and PRIME_COORDINATOR_ADDRESS=<first host>:COORD_PORT; prime_jax calls
# jax.distributed.initialize() with them (single node: no coordinator needed).
# Under SLURM use `srun python -m prime_jax.main ...` instead: jax detects SLURM by itself.
# Logs: ~/REMOTE_DIR/logs/RUN-<host>.log on each node (pid next to it); RUN defaults to a timestamp.
# WORKDIR: the run folder (default runs/RUN); on several nodes it must be a shared folder.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
# shellcheck source=tpu_scripts/gpu_env.sh
source "${SCRIPT_DIR}/gpu_env.sh"

CONFIG="${1:-configs/qwen7b.py:8xh100}"
if [[ $# -gt 0 ]]; then shift; fi
RUN="${RUN:-$(date +%Y%m%d-%H%M%S)}"
COORDINATOR="${COORDINATOR:-${HOST_LIST[0]}:${COORD_PORT}}"
# Multi-node checkpoints need a folder every node sees (NFS, a gcsfuse/s3 mount): set WORKDIR to it.
WORKDIR="${WORKDIR:-runs/${RUN}}"
if [[ "${NUM_HOSTS}" -gt 1 && "${WORKDIR}" != /* ]]; then
  echo "launch_gpu.sh: warning: WORKDIR=${WORKDIR} is relative: each node writes its own copy;" \
    "set WORKDIR to a shared folder for multi-node checkpoints" >&2
fi

extra=""
for arg in "$@"; do
  extra+=" $(printf '%q' "${arg}")"
done

echo "launching run ${RUN} on ${NUM_HOSTS} node(s) (coordinator ${COORDINATOR}): ${CONFIG}$*"
for i in "${!HOST_LIST[@]}"; do
  host="${HOST_LIST[$i]}"
  if [[ "${host}" == "localhost" || "${host}" == "127.0.0.1" ]]; then
    dir="${REPO_DIR}"
  else
    dir="\${HOME}/${REMOTE_DIR}"  # expanded on the node
  fi
  # Use (almost) all of each GPU's memory: XLA preallocates 75% by default.
  env_vars="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PRIME_NUM_PROCESSES=${NUM_HOSTS} PRIME_PROCESS_ID=${i}"
  env_vars+=" PRIME_HEARTBEAT_TIMEOUT=${HEARTBEAT_TIMEOUT:-100}"
  if [[ "${NUM_HOSTS}" -gt 1 ]]; then
    env_vars+=" PRIME_DISTRIBUTED=on PRIME_COORDINATOR_ADDRESS=${COORDINATOR}"
  fi
  log="logs/${RUN}-${host}.log"
  node_run "${host}" "cd ${dir} && mkdir -p logs && export ${env_vars} && \
nohup ${PYTHON} -m prime_jax.main --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")${extra} \
> ${log} 2>&1 < /dev/null & \
echo \$! > logs/${RUN}-${host}.pid && echo '${host}: process ${i} -> ${log}'"
done
mkdir -p "$(dirname "${LAST_RUN_FILE}")"
echo "${RUN}" > "${LAST_RUN_FILE}"
echo "stop it with: kill \$(cat logs/${RUN}-<host>.pid) on each node (SIGTERM: a checkpoint, then exit 0)"
