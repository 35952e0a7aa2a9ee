#!/usr/bin/env bash
# make gpu-image-check: the GPU machine's versions twinned on the CPU (tools/pinned_venv.sh builds the venv once
# per machine), running what the GPU check runs (its CPU rehearsal) and the kernel tests under those versions.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash tools/pinned_venv.sh requirements-gpu-image.txt 3.12)
"$py" -m pip install --quiet --no-deps --no-build-isolation -e .
"$py" -c 'import sys, torch, triton, numpy, cupy
print(f"gpu-image twin: Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"numpy {numpy.__version__}, cupy {cupy.__version__}")'
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export TORCHINDUCTOR_COMPILE_THREADS=1  # torch 2.11's inductor compile-worker pool can hang at exit
"$py" -m perf.gpu_check --dry-run --out "$out"
"$py" -m pytest -q -p no:cacheprovider -W ignore::RuntimeWarning -W ignore::DeprecationWarning \
  tests/test_kernels.py tests/test_rounding.py tests/test_state_bits.py tests/test_plan.py tests/test_torch_semantics.py tests/test_launches.py
