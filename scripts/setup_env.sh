#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv, install the requirements and build the
# package with its C++ extensions. Idempotent: a second run installs nothing new (a stamp keyed on
# requirements, setup.py and csrc/ decides).
# Usage: source scripts/setup_env.sh   (activates .venv in the calling shell; returns non-zero on failure)
# It leaves the caller's shell options (set -e etc.) as they were.
_ml_setup() {
  local root py stamp hash
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  py="${PYTHON:-python3}"
  if [ ! -x "$root/.venv/bin/python" ]; then
    echo "[setup] creating virtualenv $root/.venv"
    "$py" -m venv "$root/.venv" || return 1
  fi
  # shellcheck disable=SC1091
  source "$root/.venv/bin/activate" || return 1
  stamp="$root/.venv/.megatron_lite_installed"
  hash="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" "$root/setup.py" "$root"/csrc/* 2>/dev/null \
          | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ]; then
    echo "[setup] installing requirements (first run: a few minutes)"
    # pip's "Location ... is ignored" lines are noise from this machine's extra local indexes
    ( set -o pipefail; python -m pip install -q -r "$root/requirements-dev.txt" 2>&1 \
        | sed '/is ignored: it is neither a file/d' ) || { echo "[setup] pip install failed" >&2; return 1; }
    # Build the C++ extensions in place and put the checkout on the venv's path (a .pth file): an
    # editable pip install would build in an isolated environment without torch/pybind11.
    echo "[setup] building megatron_lite C++ extensions in place (python setup.py build_ext --inplace)"
    ( cd "$root" && python setup.py -q build_ext --inplace >"$root/.venv/build_ext.log" 2>&1 ) \
        || { tail -30 "$root/.venv/build_ext.log" >&2; echo "[setup] building the extensions failed" \
             "(log: $root/.venv/build_ext.log)" >&2; return 1; }
    python -c "import site; print(site.getsitepackages()[0])" | xargs -I{} sh -c "echo '$root' > {}/megatron_lite.pth"
    echo "$hash" > "$stamp"
  fi
}
_ml_setup
