#!/usr/bin/env bash
# Train and evaluate a fuser on several GPU hosts: run this script once on every host (one process per
# host, each seeing all of its local GPUs). The processes join through jax.distributed.initialize
# (c2c_jax.sharding.maybe_initialize_distributed), told where the coordinator is by
#   flags     --coordinator=HOST:PORT --num-processes=N --process-id=I   (I = 0 on the coordinator's host)
#   or env    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
#   or SLURM  inside `srun` (see launch/gpu_slurm.sbatch): JAX reads SLURM_* itself.
# The workdir must be one directory shared by all hosts (NFS, Lustre, a gcsfuse mount, ...): every process
# takes part in writing each checkpoint. After training, process 0 alone runs the evaluation.
#
#   host 0: launch/gpu_multinode.sh --coordinator=10.0.0.1:1234 --num-processes=2 --process-id=0 --workdir=/shared/runs/qwen
#   host 1: launch/gpu_multinode.sh --coordinator=10.0.0.1:1234 --num-processes=2 --process-id=1 --workdir=/shared/runs/qwen
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters: edit here or pass as flags -------------------------------------------------------
CONFIG="configs/qwen.py"                         # --config, relative to the repository root
WORKDIR=""                                       # --workdir: on a filesystem shared by all hosts (required)
COORDINATOR="${JAX_COORDINATOR_ADDRESS:-}"       # --coordinator: HOST:PORT of process 0
NUM_PROCESSES="${JAX_NUM_PROCESSES:-}"           # --num-processes: = number of hosts
PROCESS_ID="${JAX_PROCESS_ID:-}"                 # --process-id: 0 .. N-1
EVAL=1                                           # --no-eval: train only
PYTHON="python3"                                 # --python
# ---------------------------------------------------------------------------------------------------

usage() {
  cat <<EOF
Usage: launch/gpu_multinode.sh --workdir=SHARED_DIR [--coordinator=HOST:PORT --num-processes=N --process-id=I]
                               [flags] [--config.a.b=VALUE ...]

Run once per host. Without --coordinator (and without JAX_COORDINATOR_ADDRESS), the script must run as a
task of a SLURM job step (srun), one task per node.

Flags (defaults at the top of this script):
  --config=PATH          default ${CONFIG}
  --workdir=DIR          shared by all hosts (required); rerunning with the same DIR resumes training
  --coordinator=H:P      address of process 0 (default \$JAX_COORDINATOR_ADDRESS)
  --num-processes=N      number of processes = hosts (default \$JAX_NUM_PROCESSES)
  --process-id=I         this host's process, 0..N-1 (default \$JAX_PROCESS_ID)
  --no-eval              train only (otherwise process 0 evaluates DIR/final after training)
  --python=PYTHON        default ${PYTHON}
  --config.a.b=VALUE     config overrides, passed to both train and evaluate (repeatable)
  --dry-run              print this host's commands, one per line, in order; run nothing
  -h, --help             this help
EOF
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --no-eval) EVAL=0 ;;
    --config | --config=*) CONFIG=$(flag_value "$arg") ;;
    --workdir | --workdir=*) WORKDIR=$(flag_value "$arg") ;;
    --coordinator | --coordinator=*) COORDINATOR=$(flag_value "$arg") ;;
    --num-processes | --num-processes=*) NUM_PROCESSES=$(flag_value "$arg") ;;
    --process-id | --process-id=*) PROCESS_ID=$(flag_value "$arg") ;;
    --python | --python=*) PYTHON=$(flag_value "$arg") ;;
    *) take_override "$arg" || unknown_flag "$arg" ;;
  esac
done

check_config "$CONFIG"
[[ -n $WORKDIR ]] || die "--workdir=DIR is required: a directory that every host shares"
ENV=(env "XLA_FLAGS=$(gpu_xla_flags)")
if [[ -n $COORDINATOR ]]; then
  [[ $COORDINATOR =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '${COORDINATOR}'"
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num-processes=N (a positive integer) is required with --coordinator"
  if ! [[ $PROCESS_ID =~ ^[0-9]+$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
    die "--process-id=I with 0 <= I < ${NUM_PROCESSES} is required with --coordinator, got '${PROCESS_ID}'"
  fi
  ENV+=("JAX_COORDINATOR_ADDRESS=${COORDINATOR}" "JAX_NUM_PROCESSES=${NUM_PROCESSES}" "JAX_PROCESS_ID=${PROCESS_ID}")
elif [[ -n ${SLURM_PROCID:-} && ${SLURM_NTASKS:-1} -gt 1 ]]; then
  PROCESS_ID=$SLURM_PROCID  # JAX takes the coordinator (first node of the step), count and id from SLURM_*
else
  die "no coordinator: pass --coordinator=HOST:PORT --num-processes=N --process-id=I, set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under srun with one task per node (launch/gpu_slurm.sbatch)"
fi

run cd "$REPO_ROOT"
run "${ENV[@]}" "$PYTHON" -m c2c_jax.train "--config=${CONFIG}" "--workdir=${WORKDIR}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
if ((EVAL)) && [[ $PROCESS_ID == 0 ]]; then
  # A single process: nothing in its environment may make it wait for peers that have exited. It keeps your
  # own XLA_FLAGS, not the training flags; the evaluate CLI adds its inference flags.
  run env -u JAX_COORDINATOR_ADDRESS -u JAX_NUM_PROCESSES -u JAX_PROCESS_ID -u SLURM_NTASKS -u C2C_DISTRIBUTED \
    "$PYTHON" -m c2c_jax.evaluate "--config=${CONFIG}" "--workdir=${WORKDIR}" \
    "--config.eval.fuser=${WORKDIR}/final" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
fi
