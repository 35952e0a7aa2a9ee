#!/usr/bin/env bash
# Prints the python of a virtual environment with the GPU machine's versions (requirements-gpu-image.txt), building
# it first when this machine has none for these pins: about 4 minutes and 5.7 GB, kept in
# $RMSPROP_GPU_IMAGE_VENVS (default ~/.cache/rmsprop_gpu) and reused while the pins are unchanged; twins for older
# pins are removed. Python 3.12 as on the GPU image when this machine has it, else python3 (said on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(cat requirements-gpu-image.txt | cksum | cut -d' ' -f1)
root=${RMSPROP_GPU_IMAGE_VENVS:-$HOME/.cache/rmsprop_gpu}
venv="$root/gpu-image-$key"
if [ ! -f "$venv/.complete" ]; then
  py=""
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import venv" >/dev/null 2>&1; then py=$(command -v "$c"); break; fi
  done
  if [ -z "$py" ]; then
    py=$(command -v python3)
    echo "gpu-image twin: no Python 3.12 here (the GPU image's); using $("$py" --version 2>&1)" >&2
  fi
  mkdir -p "$root"
  find "$root" -maxdepth 1 -name 'gpu-image-*' ! -name "gpu-image-$key" -exec rm -rf {} + 2>/dev/null || true
  rm -rf "$venv"
  echo "gpu-image twin: building $venv with $("$py" --version 2>&1) (about 4 minutes, 5.7 GB)" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r requirements-gpu-image.txt >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
