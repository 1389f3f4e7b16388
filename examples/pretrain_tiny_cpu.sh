#!/usr/bin/env bash
# CPU variant: the tiny preset on 2 processes (gloo, fp32, TP 2, ZeRO-1), for a laptop or CI.
#   DATA_PATH=runs/quickstart/data/train_text_document TOKENIZER_MODEL=runs/quickstart/tokenizer/spm.model \
#     VOCAB_SIZE=4096 bash examples/pretrain_tiny_cpu.sh [--train-iters 50]
# (examples/quickstart.sh makes that data.) Same flow as the cluster scripts: torchrun
# --standalone --nproc_per_node ${NPROC:-2} pretrain_llama.py; extra flags override the defaults
# below. Check without data: bash examples/pretrain_tiny_cpu.sh --dry-run
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/project_python.sh
project_python || exit 2  # a fresh shell: the checkout's .venv, or one line saying how
NPROC="${NPROC:-2}"
RUN_DIR="${RUN_DIR:-runs/pretrain_tiny_cpu}"
DRY_RUN=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY_RUN=1; done
ARGS=(--device cpu --tp 2 --zero-stage 1 --model-size tiny --vocab-size "${VOCAB_SIZE:-4096}"
      --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --train-iters 100
      --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --lr-decay-style cosine
      --log-interval 10 --eval-interval 50 --eval-iters 4 --seed 1234)
if [ "$DRY_RUN" = 1 ]; then
  if [ "${ML_PRINT_CMD:-0}" = 1 ]; then  # tests: print world size and arguments, one per line
    printf '%s\n' "WORLD_SIZE=$NPROC" "${ARGS[@]}" "$@"
    exit 0
  fi
  WORLD_SIZE="$NPROC" RANK=0 python pretrain_llama.py "${ARGS[@]}" "$@"
  exit $?
fi
: "${DATA_PATH:?set DATA_PATH (e.g. runs/quickstart/data/train_text_document)}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL (e.g. runs/quickstart/tokenizer/spm.model)}"
read -r -a DATA <<< "$DATA_PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$RUN_DIR"
torchrun --standalone --nproc_per_node "$NPROC" pretrain_llama.py "${ARGS[@]}" \
  --data-path "${DATA[@]}" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
  --save "$RUN_DIR/ckpt" --load "$RUN_DIR/ckpt" --save-interval 50 --tensorboard-dir "$RUN_DIR/tensorboard" "$@"
