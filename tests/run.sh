#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them.
#   bash tests/run.sh            # extra arguments go to pytest, e.g. bash tests/run.sh -k gguf
# The parity tests compare against transformers' PyTorch models, so the tests need torch: its CPU
# build (about 190 MB) from PyTorch's CPU index, never the multi-GB CUDA build a plain
# `pip install torch` brings on Linux. Everything else comes from the usual index.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ]; then
  torch="torch==2.13.0+cpu"   # the +cpu build exists only on PyTorch's CPU index
else
  torch="torch==2.13.0"       # macOS and Windows wheels are CPU builds already
fi
echo "tests/run.sh: installing $torch and the test dependencies"
python -m pip install --quiet "$torch" --extra-index-url https://download.pytorch.org/whl/cpu
python -m pip install --quiet -e ".[test,lm_eval]"
if [ "$(uname -s)" = Linux ]; then
  # libtpu, for the TPU compile check (tests/test_aot.py compiles for a v5e slice on this CPU; it skips
  # without libtpu). Only one process can hold libtpu: those tests share one xdist group.
  python -m pip install --quiet "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
fi
echo "tests/run.sh: running the tests"
python -m pytest -q -n 2 --dist loadgroup tests "$@"
