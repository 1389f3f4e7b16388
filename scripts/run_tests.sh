#!/usr/bin/env bash
# README command 2: install what is needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Progress visible in a redirected log (`> tests.log 2>&1`) while it runs: pytest's default
# verbosity names each module as its first test starts (with -q the log stays empty during a
# minute of collection and the first slow tests), and prints from tests are not held in a buffer.
export PYTHONUNBUFFERED=1
# --durations: the slowest tests are listed at the end, to keep the suite near 20 minutes on 2 cores.
python -m pytest -ra --durations=25 tests "$@"
