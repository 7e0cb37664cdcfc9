#!/usr/bin/env bash
# Follows a run's log on one worker (default worker 0, the one that logs metrics).
#
#   tpu_scripts/logs.sh [RUN] [WORKER]
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "${SCRIPT_DIR}/env.sh"

RUN="${1:-$(cat "${LAST_RUN_FILE}" 2>/dev/null || true)}"
WORKER="${2:-0}"
if [[ -z "${RUN}" ]]; then
  echo "logs.sh: name the run (tpu_scripts/logs.sh RUN)" >&2
  exit 2
fi
tpu_ssh "${WORKER}" "tail -n 200 -F ~/${REMOTE_DIR}/logs/${RUN}-\$(hostname).log"
