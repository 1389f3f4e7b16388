#!/usr/bin/env bash
# One-shot check of megatron_lite on a machine with one NVIDIA GPU, from a clean clone, in under
# 8 minutes (issue 17 item 5). Five steps, each timed:
#   1. environment: a venv (.venv-device) that sees a CUDA build of torch: the machine's own when
#      it has one (pinned version preferred; a different version is used and named), else the
#      pinned version from the PyTorch CUDA index; then the project's requirements without torch,
#      liger-kernel, and flash-attn only if a prebuilt wheel installs (a source build takes far
#      longer than this script's budget, so it is reported as skipped).
#   2. build: the C++/CUDA extensions (python setup.py build_ext --inplace), then a check that
#      the CUDA RoPE kernel is registered (torch.ops.megatron_lite.rope_fwd on a CUDA tensor).
#   3. tests: every `gpu`-marked test (pytest -m gpu).
#   4. measurements: bench/device_bench.py: the 1b preset, seq 4096, bf16, ZeRO-0, TP=1, through
#      pretrain_llama.py: tokens/s, TFLOP/s and MFU for eager, --compile, each attention backend,
#      fused kernels, chunked cross entropy; peak memory vs the planner's estimate.
#   5. summary: one table on stdout and <out>/device_check.json.
#
#   bash bench/device_check.sh                       # on the GPU machine
#   bash bench/device_check.sh --wheels DIR          # offline: install from wheels in DIR
#   bash bench/device_check.sh --cpu-dry-run         # CI: same steps, tiny shapes on CPU, GPU steps
#                                                    # skipped with the reason
#   options: --out DIR (default runs/device_check), --steps N (per variant)
#
# Offline machines (no package index): on a machine with pip access, download what step 1 needs,
#   pip download -d wheels deepspeed==<pin> liger-kernel sentencepiece tokenizers ... (requirements.txt
#   minus torch), carry the folder over and pass --wheels wheels.
# Exit status: 0 when every step that ran passed, 1 otherwise (the summary names the failed step).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0; OUT="runs/device_check"; WHEELS=""; STEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out|--wheels|--steps)
      [ $# -ge 2 ] || { echo "device_check: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in --out) OUT="$2" ;; --wheels) WHEELS="$2" ;; --steps) STEPS="$2" ;; esac
      shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "device_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$STEPS" in ""|*[!0-9]*) [ -z "$STEPS" ] || { echo "device_check: --steps $STEPS: give a whole number of steps" >&2; exit 2; } ;; esac
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T_START=$SECONDS
NAMES=(); STATUS=(); SECS=()
FAILED=0
step() {  # step NAME STATUS START_SECONDS
  NAMES+=("$1"); STATUS+=("$2"); SECS+=($((SECONDS - $3)))
  case "$2" in ok*|skipped*) ;; *) FAILED=1 ;; esac
  echo "[device_check] $1: $2 ($((SECONDS - $3)) s)"
}
PIN="$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt)"

# ---- 1. environment -------------------------------------------------------------------------
t=$SECONDS
if [ "$DRY" = 1 ]; then
  # The CI's own environment (scripts/setup_env.sh) stands in for the GPU venv.
  source scripts/setup_env.sh >/dev/null || { step environment "failed: scripts/setup_env.sh" "$t"; }
  [ ${#NAMES[@]} -eq 0 ] && step environment "ok: project .venv (torch $(python -c 'import torch; print(torch.__version__)'), CPU dry run)" "$t"
else
  PY="${PYTHON:-python3}"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
    SYS_TORCH=0
  else
    SYS_TORCH=1
  fi
  [ -x .venv-device/bin/python ] || "$PY" -m venv --system-site-packages .venv-device
  source .venv-device/bin/activate
  PIP=(python -m pip install -q --disable-pip-version-check)
  [ -n "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
  NOTE=""
  if [ "$SYS_TORCH" = 0 ]; then
    "${PIP[@]}" "torch==$PIN" --index-url https://download.pytorch.org/whl/cu128 \
      || { step environment "failed: no CUDA torch here and torch==$PIN (cu128) did not install" "$t"; }
  fi
  HAVE="$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  case "$HAVE" in "$PIN"*) ;; *) NOTE="; torch $HAVE, not the pinned $PIN (the machine's CUDA build)" ;; esac
  grep -v '^torch==' requirements.txt > "$OUT/requirements-notorch.txt"
  "${PIP[@]}" -r "$OUT/requirements-notorch.txt" pytest \
    || step environment "failed: pip install -r requirements.txt (without torch)" "$t"
  if "${PIP[@]}" liger-kernel >/dev/null 2>&1; then NOTE="$NOTE; liger-kernel installed"; else NOTE="$NOTE; liger-kernel not installable"; fi
  if "${PIP[@]}" --only-binary=:all: flash-attn >/dev/null 2>&1; then NOTE="$NOTE; flash-attn wheel installed"
  else NOTE="$NOTE; flash-attn: no prebuilt wheel (source build skipped: exceeds the time budget)"; fi
  [ ${#NAMES[@]} -eq 0 ] && step environment "ok: .venv-device, torch $HAVE (CUDA $(python -c 'import torch; print(torch.version.cuda)'))$NOTE" "$t"
fi

# ---- 2. build -------------------------------------------------------------------------------
t=$SECONDS
if python setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1; then
  if [ "$DRY" = 1 ]; then
    step build "ok: CPU extensions; CUDA kernel skipped (CPU dry run; scripts/check_cuda_compile.py compile-checks it in the tests)" "$t"
  elif python - <<'EOF' >> "$OUT/build_ext.log" 2>&1
import torch
import megatron_lite._rope_ops  # noqa: F401  registers torch.ops.megatron_lite.*
x = torch.randn(1, 8, 2, 64, device="cuda")
cos = torch.ones(1, 8, 64, device="cuda")
sin = torch.zeros(1, 8, 64, device="cuda")
y = torch.ops.megatron_lite.rope_fwd(x, cos, sin)
assert torch.equal(y, x), "rope_fwd with cos=1, sin=0 must be the identity"
EOF
  then step build "ok: C++ and CUDA extensions; CUDA rope_fwd registered and correct" "$t"
  else step build "failed: CUDA rope kernel not usable (log: $OUT/build_ext.log)" "$t"
  fi
else
  step build "failed: python setup.py build_ext (log: $OUT/build_ext.log)" "$t"
fi

# ---- 3. gpu-marked tests --------------------------------------------------------------------
t=$SECONDS
if [ "$DRY" = 1 ]; then
  # Collect them so that an import error or a renamed fixture still shows up without a GPU.
  # Only the files that hold gpu-marked tests: collecting the whole suite costs a minute.
  mapfile -t GPU_FILES < <(grep -l "mark.gpu" tests/test_*.py)
  if python -m pytest -q -m gpu --collect-only "${GPU_FILES[@]}" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; then
    step gpu-tests "skipped: no GPU (CPU dry run); collected: $(grep -E 'selected|collected' "$OUT/gpu_tests.log" | tail -1)" "$t"
  else
    step gpu-tests "failed: collecting the gpu tests ($OUT/gpu_tests.log)" "$t"
  fi
else
  mapfile -t GPU_FILES < <(grep -l "mark.gpu" tests/test_*.py)
  if python -m pytest -q -m gpu -ra "${GPU_FILES[@]}" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; then
    step gpu-tests "ok: $(tail -1 "$OUT/gpu_tests.log")" "$t"
  else
    step gpu-tests "failed: $(tail -1 "$OUT/gpu_tests.log") (log: $OUT/gpu_tests.log)" "$t"
  fi
fi

# ---- 4. measurements ------------------------------------------------------------------------
t=$SECONDS
BENCH=(python bench/device_bench.py --out "$OUT/bench")
[ "$DRY" = 1 ] && BENCH+=(--cpu-dry-run)
[ -n "$STEPS" ] && BENCH+=(--steps "$STEPS")
if "${BENCH[@]}" > "$OUT/bench.log" 2>&1; then
  step measurements "ok: $OUT/bench/device_bench.json" "$t"
else
  step measurements "failed: bench/device_bench.py (log: $OUT/bench.log)" "$t"
fi

# ---- 5. summary -----------------------------------------------------------------------------
echo
echo "================ device_check summary ($([ "$DRY" = 1 ] && echo "CPU dry run" || python -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)) ================"
for i in "${!NAMES[@]}"; do printf '%-13s %5s s  %s\n' "${NAMES[$i]}" "${SECS[$i]}" "${STATUS[$i]}"; done
TOTAL=$((SECONDS - T_START))
echo "total: $TOTAL s (budget 480 s)"
if [ -f "$OUT/bench/device_bench.json" ]; then
  echo
  python -c "import json,sys; print(json.load(open(sys.argv[1]))['table'])" "$OUT/bench/device_bench.json"
fi
python - "$OUT" "$TOTAL" "$DRY" "${NAMES[@]}" -- "${STATUS[@]}" -- "${SECS[@]}" <<'EOF'
import json, os, sys
out, total, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rest = sys.argv[4:]
a = rest.index("--")
names, rest = rest[:a], rest[a + 1:]
b = rest.index("--")
status, secs = rest[:b], rest[b + 1:]
bench_path = os.path.join(out, "bench", "device_bench.json")
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
doc = {"cpu_dry_run": dry, "total_s": total,
       "steps": [{"name": n, "status": s, "seconds": int(t)} for n, s, t in zip(names, status, secs)],
       "measurements": bench}
tmp = os.path.join(out, ".device_check.json.tmp")
with open(tmp, "w") as fh:
    json.dump(doc, fh, indent=1)
    fh.write("\n")
os.replace(tmp, os.path.join(out, "device_check.json"))
print(f"written: {os.path.join(out, 'device_check.json')}")
EOF
exit $FAILED
