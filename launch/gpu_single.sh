#!/usr/bin/env bash
# Train and evaluate a fuser on one host with one or more GPUs: one process sees every local GPU and the
# mesh spans them all (config.mesh: data=-1, i.e. data parallel over all GPUs; add --config.mesh.fsdp=N
# to also split parameters).
#
#   launch/gpu_single.sh --config=configs/qwen.py --workdir=runs/qwen [--config.a.b=VALUE ...]
#   launch/gpu_single.sh ... --dry-run      # print every command, in order, and run nothing
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters: edit here or pass as flags -------------------------------------------------------
CONFIG="configs/qwen.py"   # --config, relative to the repository root
WORKDIR=""                 # --workdir: empty = runs/<config name>; relative paths are under the repository root
GPUS=""                    # --gpus: e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES); empty = all
INSTALL=0                  # --install: pip install -e ".[gpu]" first
EVAL=1                     # --no-eval: train only
PYTHON="python3"           # --python
# ---------------------------------------------------------------------------------------------------

usage() {
  cat <<EOF
Usage: launch/gpu_single.sh [--config=PATH] [--workdir=DIR] [flags] [--config.a.b=VALUE ...]

One process on this host, all its GPUs (or --gpus): python -m c2c_jax.train, then python -m c2c_jax.evaluate
on the trained fuser (DIR/final), with the XLA flags of MaxText's single-host GPU guide.

Flags (defaults at the top of this script):
  --config=PATH        default ${CONFIG}
  --workdir=DIR        default runs/<config name>; rerunning with the same DIR resumes training
  --gpus=LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all GPUs)
  --install            pip install -e ".[gpu]" first (jax with CUDA 13)
  --no-eval            train only
  --python=PYTHON      default ${PYTHON}
  --config.a.b=VALUE   config overrides, passed to both train and evaluate (repeatable)
  --dry-run            print the commands, one per line, in order; run nothing
  -h, --help           this help
EOF
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --no-eval) EVAL=0 ;;
    --config | --config=*) CONFIG=$(flag_value "$arg") ;;
    --workdir | --workdir=*) WORKDIR=$(flag_value "$arg") ;;
    --gpus | --gpus=*) GPUS=$(flag_value "$arg") ;;
    --python | --python=*) PYTHON=$(flag_value "$arg") ;;
    *) take_override "$arg" || unknown_flag "$arg" ;;
  esac
done

check_config "$CONFIG"
[[ -n $WORKDIR ]] || WORKDIR="runs/$(basename "$CONFIG" .py)"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a comma-separated list of GPU indices, got '${GPUS}'"

# Training gets the GPU training flags; evaluation keeps your own XLA_FLAGS and the evaluate CLI adds its
# inference flags (Triton GEMMs off costs a 512-token first token ~2.5 ms on an H200, docs/performance.md).
EVAL_ENV=(env)
[[ -z $GPUS ]] || EVAL_ENV+=("CUDA_VISIBLE_DEVICES=${GPUS}")
ENV=("${EVAL_ENV[@]}" "XLA_FLAGS=$(gpu_xla_flags)")

run cd "$REPO_ROOT"
if ((INSTALL)); then
  run "$PYTHON" -m pip install -e ".[gpu]"
fi
run "${ENV[@]}" "$PYTHON" -m c2c_jax.train "--config=${CONFIG}" "--workdir=${WORKDIR}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
if ((EVAL)); then
  run "${EVAL_ENV[@]}" "$PYTHON" -m c2c_jax.evaluate "--config=${CONFIG}" "--workdir=${WORKDIR}" \
    "--config.eval.fuser=${WORKDIR}/final" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
fi
