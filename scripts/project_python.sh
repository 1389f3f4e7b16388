#!/usr/bin/env bash
# Sourced by the launch scripts (examples/common_launch.sh, examples/pretrain_tiny_cpu.sh): make
# `python` and `torchrun` ones that have torch, in a fresh shell too.
#   - a shell whose `python` has torch (an activated .venv, a conda env, `pip install -e .`) is
#     used as it is;
#   - otherwise the checkout's .venv (made by scripts/setup_env.sh) is activated when it has torch;
#   - with neither, one line says how to create it, and project_python returns 2.
# The tools in tools/*.py do the same for themselves (megatron_lite.utils.use_project_venv).
project_python() {
  local root has
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  has='import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'
  if command -v python >/dev/null 2>&1 && python -c "$has" >/dev/null 2>&1; then
    return 0
  fi
  if [ -x "$root/.venv/bin/python" ] && "$root/.venv/bin/python" -c "$has" >/dev/null 2>&1; then
    # shellcheck disable=SC1091
    source "$root/.venv/bin/activate"
    return 0
  fi
  echo "$(basename "$0"): error: no Python with torch found: create the project's environment once" \
       "with \`source scripts/setup_env.sh\` in $root (it builds .venv and activates it; in a later" \
       "shell \`source .venv/bin/activate\`)" >&2
  return 2
}
