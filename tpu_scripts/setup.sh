#!/usr/bin/env bash
# Copies this repository to every worker of the slice and installs jax[tpu] + requirements there.
#
#   PRESET=v5p-32 BUCKET=my-bucket tpu_scripts/setup.sh
#
# BUCKET (recommended for multi-host slices): a GCS bucket mounted with gcsfuse at MOUNT_DIR on
# every worker; launch.sh puts the run folder (checkpoints, metrics) there, since orbax needs one
# folder that all workers share.
# The working tree (without .git, runs/ and caches) is packed here and unpacked in ~/REMOTE_DIR
# on all workers; rerun after changing code (it only reinstalls what changed).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
# shellcheck source=tpu_scripts/env.sh
source "${SCRIPT_DIR}/env.sh"

archive="$(mktemp -t prime-jax-XXXXXX.tar.gz)"
trap 'rm -f "${archive}"' EXIT
tar -C "${REPO_DIR}" --exclude=.git --exclude=runs --exclude=logs --exclude='__pycache__' \
  --exclude='.pytest_cache' --exclude='*.egg-info' -czf "${archive}" .

echo "copying the code to all workers of ${TPU_NAME}"
gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:/tmp/prime-jax.tar.gz" \
  --zone="${ZONE}" --project="${PROJECT}" --worker=all

remote="set -e
mkdir -p ~/${REMOTE_DIR} && tar -C ~/${REMOTE_DIR} -xzf /tmp/prime-jax.tar.gz
cd ~/${REMOTE_DIR}
python3 -m pip install --upgrade pip
python3 -m pip install -r requirements.txt
python3 -m pip install 'jax[tpu]==${JAX_VERSION}' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"

echo "installing on all workers"
tpu_ssh all "${remote}"

if [[ -n "${BUCKET}" ]]; then
  echo "mounting gs://${BUCKET} at ${MOUNT_DIR} on all workers"
  mount="set -e
if ! command -v gcsfuse >/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p ${MOUNT_DIR} && sudo chown \$(id -u):\$(id -g) ${MOUNT_DIR}
mountpoint -q ${MOUNT_DIR} || gcsfuse --implicit-dirs ${BUCKET} ${MOUNT_DIR}"
  tpu_ssh all "${mount}"
fi
echo "ready: next run tpu_scripts/launch.sh"
