# Helpers shared by the launch scripts (sourced, not run).
#
# Every command a script would run goes through `run`: with --dry-run it is printed, one per line, quoted
# so that the line can be pasted into a shell; otherwise it is echoed to stderr ("+ ...") and executed.
# shellcheck shell=bash

DRY_RUN=0
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Flags of the form --config.a.b=value, passed unchanged to both `c2c_jax.train` and `c2c_jax.evaluate`.
OVERRIDES=()
# On a TPU worker: the Python >= 3.11 environment tpu_worker_setup.sh creates (relative to the home
# directory), whose interpreter every later step runs. jax >= 0.10 and libtpu have no wheels for the
# Python 3.10 of stock TPU images such as tpu-ubuntu2204-base.
# shellcheck disable=SC2034  # used by the TPU scripts that source this file
TPU_VENV="c2c-venv"
# shellcheck disable=SC2034
TPU_PYTHON_VERSION="3.11"

die() {  # a usage error: message on stderr, exit status 2
  echo "error: $*" >&2
  echo "Run with --help for the flags." >&2
  exit 2
}

quote() {  # one word, single-quoted only if the shell would otherwise split or expand it
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--?[A-Za-z0-9_.-]+=)(.+)$ ]]; then  # --flag='value': same word, easier to read
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

show() {  # the command as one pasteable line
  local line="" word
  for word in "$@"; do
    line+="$(quote "$word") "
  done
  printf '%s\n' "${line% }"
}

run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

flag_value() {  # flag_value --name=value -> value; dies on a bare --name or an empty value
  local arg=$1
  [[ $arg == *=* ]] || die "${arg} needs a value: ${arg}=VALUE"
  [[ -n ${arg#*=} ]] || die "${arg%%=*} needs a non-empty value"
  printf '%s' "${arg#*=}"
}

take_override() {  # records --config.* flags; returns 1 for anything else
  case $1 in
    --config.*=*) OVERRIDES+=("$1") ;;
    --config.*) die "$1 needs a value: $1=VALUE" ;;
    *) return 1 ;;
  esac
}

unknown_flag() {
  die "unknown flag or argument: $1"
}

check_config() {  # the config file must exist (relative paths are relative to the repository root)
  local config=$1
  [[ -f $config || -f $REPO_ROOT/$config ]] || die "config file not found: ${config}"
}

# XLA flags for GPU training (evaluation runs without them), from MaxText's single-host GPU guide and its A3 configs
# (docs/run_maxtext/run_maxtext_single_host_gpu.md, src/maxtext/configs/gpu/a3/llama_2_7b/1vm.sh): the
# latency-hiding scheduler overlaps the gradient all-reduce (and FSDP all-gathers) with compute; the
# combine thresholds batch small collectives. Only flags known to the jaxlib pinned in setup.py (an unknown
# flag aborts XLA at start-up; tests/test_launch.py checks them). Any XLA_FLAGS already set are kept after them.
GPU_XLA_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_enable_triton_gemm=false
  --xla_gpu_enable_highest_priority_async_stream=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
)

gpu_xla_flags() {
  local flags="${GPU_XLA_FLAGS[*]}"
  printf '%s' "${flags}${XLA_FLAGS:+ $XLA_FLAGS}"
}
