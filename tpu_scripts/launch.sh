#!/usr/bin/env bash
# Starts `python -m prime_jax.main` on every worker of the slice (one process per host).
#
#   PRESET=v5p-32 tpu_scripts/launch.sh                                  # configs/qwen7b.py:v5p-32
#   PRESET=v4-64 tpu_scripts/launch.sh configs/qwen7b.py:v4-64 --config.total_steps=240
#
# jax.distributed finds the coordinator (worker 0) and every worker's id from the TPU metadata;
# PRIME_DISTRIBUTED=on makes prime_jax call jax.distributed.initialize() on every worker.
# HEARTBEAT_TIMEOUT (default 100 s): after that long without a heartbeat from a worker the others
# exit with an error instead of hanging (docs/scale_out.md). Relaunching the same RUN resumes, also
# on another slice (RUN=<RUN> PRESET=v4-64 tpu_scripts/launch.sh configs/qwen7b.py:v4-64).
# Each worker logs to ~/REMOTE_DIR/logs/RUN-<hostname>.log and writes its pid next to it;
# tpu_scripts/logs.sh follows worker 0's log, tpu_scripts/stop.sh --processes stops the run.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "${SCRIPT_DIR}/env.sh"

CONFIG="${1:-configs/qwen7b.py:${PRESET}}"
if [[ $# -gt 0 ]]; then shift; fi
RUN="${RUN:-$(date +%Y%m%d-%H%M%S)}"
# The run folder must be shared by all workers (orbax checkpoints): the gcsfuse mount of BUCKET.
if [[ -n "${BUCKET}" ]]; then
  WORKDIR="${WORKDIR:-${MOUNT_DIR}/runs/${RUN}}"
else
  WORKDIR="${WORKDIR:-runs/${RUN}}"
  echo "launch.sh: warning: no BUCKET: each worker writes runs/${RUN} on its own disk;" \
    "multi-host checkpoints need a shared folder (BUCKET=... tpu_scripts/setup.sh)" >&2
fi

# Quote every extra flag for the remote shell.
extra=""
for arg in "$@"; do
  extra+=" $(printf '%q' "${arg}")"
done

remote="cd ~/${REMOTE_DIR} && mkdir -p logs && \
export PRIME_DISTRIBUTED=on PRIME_HEARTBEAT_TIMEOUT=${HEARTBEAT_TIMEOUT:-100} TF_CPP_MIN_LOG_LEVEL=1 && \
log=logs/${RUN}-\$(hostname).log && \
nohup python3 -m prime_jax.main --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")${extra} \
> \"\${log}\" 2>&1 < /dev/null & \
echo \$! > logs/${RUN}-\$(hostname).pid && echo \"\$(hostname): pid \$! -> \${log}\""

echo "launching run ${RUN} on all workers of ${TPU_NAME}: ${CONFIG}$* (workdir ${WORKDIR})"
tpu_ssh all "${remote}"
mkdir -p "$(dirname "${LAST_RUN_FILE}")"
echo "${RUN}" > "${LAST_RUN_FILE}"
echo "follow it with: tpu_scripts/logs.sh ${RUN}"
