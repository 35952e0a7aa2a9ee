#!/usr/bin/env bash
# tools/pinned_venv.sh REQUIREMENTS [PYTHON_VERSION]: prints the python of a virtual environment with these pins,
# building it first when this machine has none for them (the GPU image's twin: about 4 minutes and 5.7 GB). Kept
# in $RMSPROP_GPU_VENVS (default ~/.cache/rmsprop_gpu) and reused while the pins are unchanged, so CI's fresh
# clones on one machine build it once; venvs for older pins of the same file are removed. PYTHON_VERSION (e.g.
# 3.12) when this machine has it, else python3 (said on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
req=$1
want=${2:-}
name=$(basename "$req" .txt)
name=${name#requirements-}
key=$(cksum < "$req" | cut -d' ' -f1)
root=${RMSPROP_GPU_VENVS:-$HOME/.cache/rmsprop_gpu}
venv="$root/$name-$key"
if [ ! -f "$venv/.complete" ]; then
  py=""
  if [ -n "$want" ]; then
    for c in "python$want" "$HOME"/.pyenv/versions/"$want"*/bin/python"$want" "/usr/bin/python$want"; do
      if command -v "$c" >/dev/null 2>&1 && "$c" -c "import venv" >/dev/null 2>&1; then py=$(command -v "$c"); break; fi
    done
  fi
  if [ -z "$py" ]; then
    py=$(command -v python3)
    [ -z "$want" ] || echo "$name: no Python $want here; using $("$py" --version 2>&1)" >&2
  fi
  mkdir -p "$root"
  find "$root" -maxdepth 1 -name "$name-*" ! -name "$name-$key" -exec rm -rf {} + 2>/dev/null || true
  rm -rf "$venv"
  echo "$name: building $venv with $("$py" --version 2>&1) from $req (minutes; GBs for torch's CUDA wheels)" >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -r "$req" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
