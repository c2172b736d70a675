#!/usr/bin/env bash
# Runs ON EACH TPU worker (tpu_vm.sh starts it with `gcloud compute tpus tpu-vm ssh --worker=all`), from the
# copy of this repository there: creates a Python 3.11 environment with uv (stock TPU images ship Python
# 3.10, for which jax >= 0.10 has no wheels), installs the package with its TPU extra into it, and mounts the
# run's GCS bucket with Cloud Storage FUSE, so that every worker sees the same workdir (Orbax multi-host
# checkpoints need one shared directory; c2c_jax reads and writes plain POSIX paths).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BUCKET=""       # bucket name, without gs://
MOUNT_DIR=""    # where to mount it
VENV="${HOME}/${TPU_VENV}"  # the environment train and evaluate run in (tpu_vm.sh calls its python)
PYTHON="${VENV}/bin/python"
UV="${HOME}/.local/bin/uv"  # where uv's installer puts it

usage() {
  cat <<EOF
Usage: launch/tpu_worker_setup.sh --bucket=BUCKET --mount=DIR [--dry-run]

Run on a TPU worker from the repository root (tpu_vm.sh does this on every worker):
  1. install uv (https://docs.astral.sh/uv/) unless it is installed, and create ~/${TPU_VENV} with a
     uv-managed CPython ${TPU_PYTHON_VERSION} (the image's own python3 may be 3.10, too old for jax >= 0.10);
  2. pip install -e ".[tpu]" into it (after upgrading pip, for PEP 660 editable installs);
  3. install gcsfuse from Google's apt repository unless it is installed;
  4. mount gs://BUCKET at DIR (--implicit-dirs; --rename-dir-limit so that Orbax can rename a finished
     checkpoint's temporary directory) unless DIR is already a mount point.

Flags:
  --bucket=BUCKET   GCS bucket name (no gs:// prefix)
  --mount=DIR       mount point, the same absolute path on every worker
  --dry-run         print the commands (all of them: the "already installed / mounted" checks are skipped)
  -h, --help        this help
EOF
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --bucket | --bucket=*) BUCKET=$(flag_value "$arg") ;;
    --mount | --mount=*) MOUNT_DIR=$(flag_value "$arg") ;;
    *) unknown_flag "$arg" ;;
  esac
done
[[ -n $BUCKET ]] || die "--bucket=BUCKET is required"
[[ $BUCKET != gs://* ]] || die "--bucket takes the bucket name without gs:// (got ${BUCKET})"
[[ $MOUNT_DIR == /* ]] || die "--mount=DIR is required and must be an absolute path"

if ((DRY_RUN)) || [[ ! -x $UV ]]; then
  run sh -c "curl -LsSf https://astral.sh/uv/install.sh | sh"
fi
run "$UV" venv --seed --python "$TPU_PYTHON_VERSION" "$VENV"  # --seed: with pip in it
run "$PYTHON" -m pip install --upgrade pip
run "$PYTHON" -m pip install -e ".[tpu]"

if ((DRY_RUN)) || ! command -v gcsfuse >/dev/null; then
  # Google's apt repository for gcsfuse (https://cloud.google.com/storage/docs/cloud-storage-fuse/install).
  codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-jammy}") || codename=jammy
  run sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc https://packages.cloud.google.com/apt/doc/apt-key.gpg
  run sudo sh -c "echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-${codename} main' > /etc/apt/sources.list.d/gcsfuse.list"
  run sudo apt-get update -q
  run sudo apt-get install -y -q fuse gcsfuse
fi

run mkdir -p "$MOUNT_DIR"
if ((DRY_RUN)) || ! mountpoint -q "$MOUNT_DIR"; then
  run gcsfuse --implicit-dirs --rename-dir-limit=200000 "$BUCKET" "$MOUNT_DIR"
fi
