#!/usr/bin/env bash
# Train and evaluate a fuser on a Cloud TPU VM or pod slice, requested through queued resources.
#
#   launch/tpu_vm.sh --project=my-project --bucket=gs://my-bucket/c2c [--config=configs/qwen.py] [--teardown]
#   launch/tpu_vm.sh ... --dry-run      # print every command, in order, and run nothing
#
# Steps (--steps, default create,setup,train,eval; --teardown adds teardown):
#   create    gcloud compute tpus queued-resources create, then wait until the request is ACTIVE
#   setup     copy this repository (or git clone --source=URL) to every worker; on every worker
#             launch/tpu_worker_setup.sh: a Python 3.11 environment (uv) in ~/c2c-venv, pip install -e ".[tpu]"
#             into it, mount the bucket with gcsfuse
#   train     python -m c2c_jax.train (~/c2c-venv's python) on all workers at once (--worker=all, C2C_DISTRIBUTED=1); the
#             workdir is gs://BUCKET/PREFIX/RUN_NAME, seen by every worker through the gcsfuse mount
#   eval      python -m c2c_jax.evaluate on all workers with the trained fuser; worker 0 writes
#             gs://.../RUN_NAME/eval (results.md, summary.json, plots), the others a local scratch copy
#   teardown  delete the queued resource and its VM (also when an earlier step fails)
# Output of the remote steps streams here. Rerunning train with the same RUN_NAME resumes from the
# last checkpoint. --worker=all needs your key in ssh-agent: ssh-add ~/.ssh/google_compute_engine
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters: edit here or pass as flags -------------------------------------------------------
PROJECT=""                          # --project: GCP project id (required)
ZONE="europe-west4-a"               # --zone: a zone that has your accelerator type
ACCELERATOR_TYPE="v6e-16"           # --accelerator-type: v6e-16 = 16 chips on 4 hosts; v6e-8, v5litepod-16, v5p-16, v4-16, ...
RUNTIME_VERSION=""                  # --runtime-version: empty = the recommended one for the TPU generation
TPU_NAME="c2c-${USER:-user}"        # --name: queued resource id = TPU VM name
BUCKET=""                           # --bucket: gs://BUCKET[/PREFIX] holding the runs (required)
CONFIG="configs/qwen.py"            # --config: config file, relative to the repository root
RUN_NAME=""                         # --run-name: empty = the config's name (qwen for configs/qwen.py)
SOURCE="local"                      # --source: "local" (copy this checkout) or a git URL to clone
GIT_REF=""                          # --git-ref: branch or tag to clone with --source=URL
CAPACITY=""                         # --spot or --reserved: the queued resource's capacity tier
STEPS="create,setup,train,eval"     # --steps
TEARDOWN=0                          # --teardown
REMOTE_DIR="c2c-jax"                # the repository copy on each worker, relative to the home directory
MOUNT_ROOT="/tmp/gcs"               # the bucket is mounted at MOUNT_ROOT/BUCKET on each worker
POLL_SECONDS=30
# ---------------------------------------------------------------------------------------------------

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh --project=PROJECT --bucket=gs://BUCKET[/PREFIX] [flags] [--config.a.b=VALUE ...]

Creates a TPU VM or pod slice through queued resources, installs c2c_jax on every worker, trains and then
evaluates a fuser on all workers with the workdir on GCS, streaming the output, and optionally deletes the VM.

Flags (defaults at the top of this script):
  --project=ID              GCP project (required)
  --zone=ZONE               default ${ZONE}
  --accelerator-type=TYPE   default ${ACCELERATOR_TYPE} (multi-host slices need no other change)
  --runtime-version=VER     default: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                            tpu-ubuntu2204-base (v4 and older)
  --name=NAME               queued resource / TPU VM name, default ${TPU_NAME}
  --bucket=gs://B[/PREFIX]  runs go to gs://B/PREFIX/RUN_NAME (required for setup, train, eval)
  --config=PATH             default ${CONFIG}
  --run-name=NAME           default: the config file's name
  --source=local|GIT_URL    local: copy this checkout (tar + tpu-vm scp); else git clone on every worker
  --git-ref=REF             branch or tag for --source=GIT_URL
  --spot | --reserved       capacity tier of the queued resource (default: on-demand)
  --steps=LIST              comma-separated subset of create,setup,train,eval,teardown (default ${STEPS})
  --teardown                delete the queued resource and VM at the end, also if a step fails
  --config.a.b=VALUE        config overrides, passed to both train and evaluate (repeatable)
  --dry-run                 print the commands, one per line, in order; run nothing
  -h, --help                this help
EOF
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --teardown) TEARDOWN=1 ;;
    --spot) CAPACITY="--spot" ;;
    --reserved) CAPACITY="--reserved" ;;
    --project | --project=*) PROJECT=$(flag_value "$arg") ;;
    --zone | --zone=*) ZONE=$(flag_value "$arg") ;;
    --accelerator-type | --accelerator-type=*) ACCELERATOR_TYPE=$(flag_value "$arg") ;;
    --runtime-version | --runtime-version=*) RUNTIME_VERSION=$(flag_value "$arg") ;;
    --name | --name=*) TPU_NAME=$(flag_value "$arg") ;;
    --bucket | --bucket=*) BUCKET=$(flag_value "$arg") ;;
    --config | --config=*) CONFIG=$(flag_value "$arg") ;;
    --run-name | --run-name=*) RUN_NAME=$(flag_value "$arg") ;;
    --source | --source=*) SOURCE=$(flag_value "$arg") ;;
    --git-ref | --git-ref=*) GIT_REF=$(flag_value "$arg") ;;
    --steps | --steps=*) STEPS=$(flag_value "$arg") ;;
    *) take_override "$arg" || unknown_flag "$arg" ;;
  esac
done

# ---- Validation -------------------------------------------------------------------------------------
((TEARDOWN)) && STEPS+=",teardown"
IFS=, read -r -a step_list <<<"$STEPS"
for step in "${step_list[@]}"; do
  case $step in
    create | setup | train | eval | teardown) ;;
    *) die "unknown step '${step}' in --steps; valid: create,setup,train,eval,teardown" ;;
  esac
done
has_step() { [[ ",${STEPS}," == *",$1,"* ]]; }

[[ -n $PROJECT ]] || die "--project=PROJECT is required (or set PROJECT at the top of $0)"
[[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] ||
  die "--accelerator-type '${ACCELERATOR_TYPE}' does not look like v6e-16, v5litepod-16, v5p-8, v4-32, ..."
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for ${ACCELERATOR_TYPE}; pass --runtime-version" ;;
  esac
fi
check_config "$CONFIG"
[[ -n $RUN_NAME ]] || RUN_NAME=$(basename "$CONFIG" .py)
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name '${RUN_NAME}' may hold only letters, digits, '.', '_', '-'"
if has_step setup || has_step train || has_step eval; then
  [[ -n $BUCKET ]] || die "--bucket=gs://BUCKET[/PREFIX] is required: the workdir lives on GCS"
fi
if [[ -n $BUCKET ]]; then
  [[ $BUCKET =~ ^gs://([a-z0-9][a-z0-9._-]*[a-z0-9])(/.*)?$ ]] || die "--bucket must look like gs://BUCKET[/PREFIX], got '${BUCKET}'"
  BUCKET_NAME=${BASH_REMATCH[1]}
  PREFIX=${BASH_REMATCH[2]#/}
  PREFIX=${PREFIX%/}
  GCS_WORKDIR="gs://${BUCKET_NAME}${PREFIX:+/$PREFIX}/${RUN_NAME}"
  MOUNT_DIR="${MOUNT_ROOT}/${BUCKET_NAME}"
  WORKDIR="${MOUNT_DIR}${PREFIX:+/$PREFIX}/${RUN_NAME}"  # = GCS_WORKDIR, as every worker sees it
fi

# ---- Commands ---------------------------------------------------------------------------------------
GCLOUD_TPU=(gcloud compute tpus)
# tpu_worker_setup.sh's environment; the ~ expands on each worker, in its home directory.
# shellcheck disable=SC2088
WORKER_PYTHON="~/${TPU_VENV}/bin/python"
WHERE=("--project=${PROJECT}" "--zone=${ZONE}")
ALL_WORKERS=("--worker=all" "${WHERE[@]}")

remote() {  # remote COMMAND: runs COMMAND on every worker at once, output streamed here
  run "${GCLOUD_TPU[@]}" tpu-vm ssh "$TPU_NAME" "${ALL_WORKERS[@]}" "--command=$1"
}

remote_overrides() {  # the --config.* overrides, quoted for the workers' shell
  local o out=""
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    out+=" $(quote "$o")"
  done
  printf '%s' "$out"
}

create() {
  local capacity=()
  [[ -z $CAPACITY ]] || capacity=("$CAPACITY")
  run "${GCLOUD_TPU[@]}" queued-resources create "$TPU_NAME" "--node-id=${TPU_NAME}" "${WHERE[@]}" \
    "--accelerator-type=${ACCELERATOR_TYPE}" "--runtime-version=${RUNTIME_VERSION}" ${capacity[@]+"${capacity[@]}"}
  local describe=("${GCLOUD_TPU[@]}" queued-resources describe "$TPU_NAME" "${WHERE[@]}" "--format=value(state.state)")
  if ((DRY_RUN)); then
    show "${describe[@]}"  # polled until ACTIVE
    return
  fi
  local state="" last=""
  while true; do
    state=$("${describe[@]}")
    [[ $state == "$last" ]] || echo "queued resource ${TPU_NAME}: ${state}" >&2
    last=$state
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDED | SUSPENDING) echo "error: queued resource ${TPU_NAME} is ${state}" >&2; exit 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

setup() {
  if [[ $SOURCE == local ]]; then
    local tarball="/tmp/c2c-jax-${TPU_NAME}.tar.gz"
    # The checkout without git history, caches and local runs or downloads (the workers fetch their own).
    run tar --exclude=.git --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' --exclude='*.gguf' \
      --exclude=./runs --exclude='./workdir*' --exclude=./.assets --exclude=./.whl --exclude=./.stage \
      -czf "$tarball" -C "$REPO_ROOT" .
    run "${GCLOUD_TPU[@]}" tpu-vm scp "$tarball" "${TPU_NAME}:${REMOTE_DIR}.tar.gz" "${ALL_WORKERS[@]}"
    remote "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf ${REMOTE_DIR}.tar.gz -C ${REMOTE_DIR}"
  else
    local branch=""
    [[ -z $GIT_REF ]] || branch=" --branch $(quote "$GIT_REF")"
    remote "rm -rf ${REMOTE_DIR} && git clone --depth=1${branch} $(quote "$SOURCE") ${REMOTE_DIR}"
  fi
  remote "cd ${REMOTE_DIR} && bash launch/tpu_worker_setup.sh --bucket=${BUCKET_NAME} --mount=${MOUNT_DIR}"
}

train() {
  echo "# workdir: ${GCS_WORKDIR}" >&2
  remote "cd ${REMOTE_DIR} && C2C_DISTRIBUTED=1 ${WORKER_PYTHON} -m c2c_jax.train --config=$(quote "$CONFIG") --workdir=${WORKDIR}$(remote_overrides)"
}

evaluate() {
  # Every worker of a slice must run the same JAX program; only worker 0 writes into the workdir.
  # shellcheck disable=SC2016  # expanded on each worker, not here
  local worker_id='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'
  remote "cd ${REMOTE_DIR} && OUT=${WORKDIR}/eval && if [ \"${worker_id}\" != 0 ]; then OUT=/tmp/c2c-eval; fi && C2C_DISTRIBUTED=1 ${WORKER_PYTHON} -m c2c_jax.evaluate --config=$(quote "$CONFIG") --workdir=${WORKDIR} --config.eval.fuser=${WORKDIR}/final --config.eval.output_dir=\"\$OUT\"$(remote_overrides)"
}

teardown() {
  run "${GCLOUD_TPU[@]}" queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
}

if has_step teardown && ! ((DRY_RUN)); then
  trap teardown EXIT
fi
has_step create && create
has_step setup && setup
has_step train && train
has_step eval && evaluate
if has_step teardown && ((DRY_RUN)); then
  teardown
fi
exit 0
