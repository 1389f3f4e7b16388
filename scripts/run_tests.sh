#!/usr/bin/env bash
# README command 2: install what is needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -ra tests "$@"
