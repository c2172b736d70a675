#!/usr/bin/env bash
# Train and evaluate a fuser on TPUs in a GKE cluster with xpk (pip install xpk; it needs gcloud, kubectl).
#
#   launch/tpu_xpk.sh --project=my-project --cluster=my-cluster --bucket=gs://my-bucket/c2c [--create-cluster]
#   launch/tpu_xpk.sh ... --dry-run      # print every command, in order, and run nothing
#
# xpk packs this directory (--script-dir) into the base image and runs one workload on every host of the
# slice(s): pip install -e ".[tpu]", then train, then evaluate, all with C2C_DISTRIBUTED=1 (JAX finds its
# peers from GKE's TPU environment). The bucket is attached to the cluster as Cloud Storage FUSE storage
# (`xpk storage attach --type=gcsfuse`, done by --create-cluster or --attach-bucket) and mounted in the
# workload, so the workdir gs://BUCKET/PREFIX/RUN_NAME is an ordinary directory for c2c_jax.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters: edit here or pass as flags -------------------------------------------------------
PROJECT=""                          # --project: GCP project id (required)
ZONE="europe-west4-a"               # --zone
CLUSTER=""                          # --cluster: GKE cluster name (required)
TPU_TYPE="v6e-16"                   # --tpu-type: v6e-16, v5litepod-16, v5p-16, ...
NUM_SLICES=1                        # --num-slices: >1 = multislice (data parallel across slices)
BUCKET=""                           # --bucket: gs://BUCKET[/PREFIX] holding the runs (required)
STORAGE=""                          # --storage: xpk storage name for the bucket (default: c2c-BUCKET)
CONFIG="configs/qwen.py"            # --config
RUN_NAME=""                         # --run-name: empty = the config's name
WORKLOAD=""                         # --workload: empty = c2c-RUN_NAME (lowercase, digits, '-')
BASE_IMAGE="python:3.11"            # --base-docker-image
CREATE_CLUSTER=0                    # --create-cluster: xpk cluster create (+ attach the bucket) first
ATTACH_BUCKET=0                     # --attach-bucket: only attach the bucket to an existing cluster
WAIT=1                              # --no-wait: submit and return
TEARDOWN=0                          # --teardown: delete the workload after it finished
DELETE_CLUSTER=0                    # --delete-cluster: delete the cluster at the end
MOUNT_DIR="/gcs"                    # where the bucket is mounted inside the workload
# ---------------------------------------------------------------------------------------------------

usage() {
  cat <<EOF
Usage: launch/tpu_xpk.sh --project=PROJECT --cluster=CLUSTER --bucket=gs://BUCKET[/PREFIX] [flags] [--config.a.b=VALUE ...]

Runs c2c_jax training then evaluation as one xpk workload on a GKE TPU cluster, the workdir on GCS.

Flags (defaults at the top of this script):
  --project=ID              GCP project (required)
  --zone=ZONE               default ${ZONE}
  --cluster=NAME            GKE cluster (required)
  --tpu-type=TYPE           default ${TPU_TYPE}
  --num-slices=N            default ${NUM_SLICES}
  --bucket=gs://B[/PREFIX]  runs go to gs://B/PREFIX/RUN_NAME (required)
  --storage=NAME            xpk storage name of the bucket (default c2c-B)
  --config=PATH             default ${CONFIG}
  --run-name=NAME           default: the config file's name
  --workload=NAME           default c2c-RUN_NAME
  --base-docker-image=IMG   default ${BASE_IMAGE}
  --create-cluster          create the cluster (xpk cluster create) and attach the bucket first
  --attach-bucket           attach the bucket to an existing cluster first (once per cluster)
  --no-wait                 do not wait for the workload to finish
  --teardown                delete the workload once it finished
  --delete-cluster          delete the cluster at the end
  --config.a.b=VALUE        config overrides, passed to both train and evaluate (repeatable)
  --dry-run                 print the commands, one per line, in order; run nothing
  -h, --help                this help
EOF
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --create-cluster) CREATE_CLUSTER=1 ;;
    --attach-bucket) ATTACH_BUCKET=1 ;;
    --no-wait) WAIT=0 ;;
    --teardown) TEARDOWN=1 ;;
    --delete-cluster) DELETE_CLUSTER=1 ;;
    --project | --project=*) PROJECT=$(flag_value "$arg") ;;
    --zone | --zone=*) ZONE=$(flag_value "$arg") ;;
    --cluster | --cluster=*) CLUSTER=$(flag_value "$arg") ;;
    --tpu-type | --tpu-type=*) TPU_TYPE=$(flag_value "$arg") ;;
    --num-slices | --num-slices=*) NUM_SLICES=$(flag_value "$arg") ;;
    --bucket | --bucket=*) BUCKET=$(flag_value "$arg") ;;
    --storage | --storage=*) STORAGE=$(flag_value "$arg") ;;
    --config | --config=*) CONFIG=$(flag_value "$arg") ;;
    --run-name | --run-name=*) RUN_NAME=$(flag_value "$arg") ;;
    --workload | --workload=*) WORKLOAD=$(flag_value "$arg") ;;
    --base-docker-image | --base-docker-image=*) BASE_IMAGE=$(flag_value "$arg") ;;
    *) take_override "$arg" || unknown_flag "$arg" ;;
  esac
done

# ---- Validation -------------------------------------------------------------------------------------
[[ -n $PROJECT ]] || die "--project=PROJECT is required (or set PROJECT at the top of $0)"
[[ -n $CLUSTER ]] || die "--cluster=CLUSTER is required"
[[ -n $BUCKET ]] || die "--bucket=gs://BUCKET[/PREFIX] is required: the workdir lives on GCS"
[[ $BUCKET =~ ^gs://([a-z0-9][a-z0-9._-]*[a-z0-9])(/.*)?$ ]] || die "--bucket must look like gs://BUCKET[/PREFIX], got '${BUCKET}'"
BUCKET_NAME=${BASH_REMATCH[1]}
PREFIX=${BASH_REMATCH[2]#/}
PREFIX=${PREFIX%/}
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '${NUM_SLICES}'"
[[ $TPU_TYPE =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] || die "--tpu-type '${TPU_TYPE}' does not look like v6e-16, v5litepod-16, ..."
check_config "$CONFIG"
[[ -n $RUN_NAME ]] || RUN_NAME=$(basename "$CONFIG" .py)
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name '${RUN_NAME}' may hold only letters, digits, '.', '_', '-'"
[[ -n $STORAGE ]] || STORAGE="c2c-${BUCKET_NAME//[._]/-}"
[[ -n $WORKLOAD ]] || WORKLOAD=$(printf 'c2c-%s' "$RUN_NAME" | tr 'A-Z._' 'a-z--')
[[ $WORKLOAD =~ ^[a-z]([a-z0-9-]*[a-z0-9])?$ ]] || die "--workload '${WORKLOAD}' must be lowercase letters, digits and '-'"
GCS_WORKDIR="gs://${BUCKET_NAME}${PREFIX:+/$PREFIX}/${RUN_NAME}"
WORKDIR="${MOUNT_DIR}${PREFIX:+/$PREFIX}/${RUN_NAME}"  # = GCS_WORKDIR inside the workload

# ---- Commands ---------------------------------------------------------------------------------------
WHERE=("--project=${PROJECT}" "--zone=${ZONE}" "--cluster=${CLUSTER}")

overrides() {
  local o out=""
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    out+=" $(quote "$o")"
  done
  printf '%s' "$out"
}

if ((CREATE_CLUSTER)); then
  run xpk cluster create "${WHERE[@]}" "--tpu-type=${TPU_TYPE}" "--num-slices=${NUM_SLICES}"
fi
if ((CREATE_CLUSTER || ATTACH_BUCKET)); then
  run xpk storage attach "$STORAGE" --type=gcsfuse "${WHERE[@]}" "--bucket=${BUCKET_NAME}" \
    "--mount-point=${MOUNT_DIR}" --readonly=false --auto-mount=false --size=1 \
    --mount-options=implicit-dirs,rename-dir-limit=200000
fi

# One command for every host: TPU_WORKER_ID (set by GKE) picks the host that writes the evaluation.
config=$(quote "$CONFIG")
workload_command="python3 -m pip install -e '.[tpu]'"
workload_command+=" && C2C_DISTRIBUTED=1 python3 -m c2c_jax.train --config=${config} --workdir=${WORKDIR}$(overrides)"
workload_command+=" && OUT=${WORKDIR}/eval && if [ \"\${TPU_WORKER_ID:-0}\" != 0 ]; then OUT=/tmp/c2c-eval; fi"
workload_command+=" && C2C_DISTRIBUTED=1 python3 -m c2c_jax.evaluate --config=${config} --workdir=${WORKDIR}"
workload_command+=" --config.eval.fuser=${WORKDIR}/final --config.eval.output_dir=\"\$OUT\"$(overrides)"

echo "# workdir: ${GCS_WORKDIR}" >&2
run xpk workload create "${WHERE[@]}" "--workload=${WORKLOAD}" "--tpu-type=${TPU_TYPE}" "--num-slices=${NUM_SLICES}" \
  "--base-docker-image=${BASE_IMAGE}" "--script-dir=${REPO_ROOT}" "--storage=${STORAGE}" "--command=${workload_command}"
if ((WAIT)); then
  # Blocks until the workload ends; its exit status says whether it succeeded (0), failed (125) or timed out.
  # xpk workload create printed a Cloud Logging link to worker 0's output.
  run xpk workload list "${WHERE[@]}" "--wait-for-job-completion=${WORKLOAD}"
fi
if ((TEARDOWN)); then
  run xpk workload delete "${WHERE[@]}" "--workload=${WORKLOAD}"
fi
if ((DELETE_CLUSTER)); then
  run xpk cluster delete "${WHERE[@]}"
fi
