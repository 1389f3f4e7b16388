#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv, install the requirements and build the
# package with its C++ extensions. Idempotent: a second run installs nothing new.
# Usage: source scripts/setup_env.sh   (activates .venv in the calling shell)
set -e
_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_PY="${PYTHON:-python3}"
if [ ! -x "$_ROOT/.venv/bin/python" ]; then
  echo "[setup] creating virtualenv $_ROOT/.venv"
  "$_PY" -m venv "$_ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$_ROOT/.venv/bin/activate"
_STAMP="$_ROOT/.venv/.megatron_lite_installed"
_HASH="$(cat "$_ROOT/requirements.txt" "$_ROOT/requirements-dev.txt" "$_ROOT/setup.py" "$_ROOT"/csrc/* 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -f "$_STAMP" ] || [ "$(cat "$_STAMP")" != "$_HASH" ]; then
  echo "[setup] installing requirements (first run: a few minutes)"
  python -m pip install -q -r "$_ROOT/requirements-dev.txt"
  echo "[setup] building megatron_lite (C++ extensions)"
  python -m pip install -q --no-build-isolation -e "$_ROOT"
  echo "$_HASH" > "$_STAMP"
fi
set +e
