#!/usr/bin/env bash
# Stops a run and/or deletes the slice.
#
#   tpu_scripts/stop.sh --processes [RUN]   # SIGTERM the training processes of RUN (default: the last):
#                                           # they checkpoint at the next step boundary and exit 0
#   tpu_scripts/stop.sh                     # delete the slice (queued resource and TPU VM)
#   tpu_scripts/stop.sh --direct            # delete a slice made with create.sh --direct
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "${SCRIPT_DIR}/env.sh"

MODE="delete"
RUN=""
for arg in "$@"; do
  case "${arg}" in
    --processes) MODE="processes" ;;
    --direct) MODE="direct" ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) RUN="${arg}" ;;
  esac
done

case "${MODE}" in
  processes)
    RUN="${RUN:-$(cat "${LAST_RUN_FILE}" 2>/dev/null || true)}"
    if [[ -z "${RUN}" ]]; then
      echo "stop.sh: name the run (tpu_scripts/stop.sh --processes RUN)" >&2
      exit 2
    fi
    # Each worker kills exactly the pid that launch.sh recorded for this run.
    tpu_ssh all "f=~/${REMOTE_DIR}/logs/${RUN}-\$(hostname).pid; \
if [ -f \"\$f\" ]; then kill \"\$(cat \"\$f\")\" 2>/dev/null && echo \"\$(hostname): stopped\" || echo \"\$(hostname): not running\"; fi"
    ;;
  direct)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" --quiet
    ;;
  delete)
    gcloud compute tpus queued-resources delete "${QR_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
      --force --quiet
    ;;
esac
