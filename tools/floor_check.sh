#!/usr/bin/env bash
# make floor-check: the oldest versions pyproject.toml declares (requirements-floor.txt) in a venv built once per
# machine (tools/pinned_venv.sh): the import, the optimizer against torch.optim on every CPU-runnable backend
# (torch, Triton's interpreter, the CUDA C through g++), the custom op under torch.compile, and the plan's confirmation.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash tools/pinned_venv.sh requirements-floor.txt)
"$py" -m pip install --quiet --no-deps --no-build-isolation -e .
"$py" -c 'import sys, torch, triton, numpy
print(f"support floor: Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"numpy {numpy.__version__}")'
export TORCHINDUCTOR_COMPILE_THREADS=1
"$py" -m pytest -q -p no:cacheprovider -W ignore::RuntimeWarning -W ignore::DeprecationWarning -W ignore::UserWarning \
  tests/test_optimizer.py tests/test_compile.py tests/test_plan.py
