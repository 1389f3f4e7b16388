#!/usr/bin/env bash
# README command 1: the main job on real text, on a CPU, from a fresh clone.
#   corpus (the Python standard library's sources) -> SentencePiece tokenizer -> .bin/.idx
#   -> torchrun --nproc_per_node 2 pretrain_llama.py --tp 2 --zero-stage 1 (gloo, fp32)
#   -> validation perplexity (first vs last) -> tools/eval_ppl.py on held-out files -> a generated sample
#   -> figures of the run in OUT/plots (tools/plot_run.py) and the run doctor's findings (tools/diagnose_run.py)
# Usage: bash examples/quickstart.sh [--steps N] [--out DIR] [--corpus FILE.jsonl]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STEPS=150
OUT="$ROOT/runs/quickstart"
CORPUS=""
usage_error() {  # one line and exit 2, like the Python entrypoints
  echo "quickstart.sh: error: $1 (usage: bash examples/quickstart.sh [--steps N] [--out DIR] [--corpus FILE.jsonl])" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --steps|--out|--corpus)
      # "--steps" as the last word, or followed by another option, has no value
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then usage_error "$1 needs a value"; fi
      case "$1" in --steps) STEPS="$2" ;; --out) OUT="$2" ;; --corpus) CORPUS="$2" ;; esac
      shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done
case "$STEPS" in
  ''|*[!0-9]*|0*) usage_error "--steps must be a positive whole number of steps (got '$STEPS')" ;;
esac
# Checked before anything is created, so a typo leaves no empty --out folder behind.
if [ -n "$CORPUS" ] && { [ ! -f "$CORPUS" ] || [ ! -r "$CORPUS" ]; }; then
  usage_error "--corpus $CORPUS: no such readable file (give a JSON-lines file with a \"text\" field)"
fi
# Relative paths mean the folder the user typed them in (the script works from the checkout).
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
if [ -n "$CORPUS" ]; then case "$CORPUS" in /*) ;; *) CORPUS="$PWD/$CORPUS" ;; esac; fi
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then
  usage_error "--out $OUT exists and is not a folder; choose another --out DIR"
fi
cd "$ROOT"
# A rerun resumes $OUT/ckpt (--load); a different --steps would change that run's LR schedule.
if [ -f "$OUT/ckpt/latest" ]; then
  prev=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["config"]["derived"]["train_iters"])' \
         "$OUT/ckpt/$(cat "$OUT/ckpt/latest")/run_config.json" 2>/dev/null || echo "")
  if [ -n "$prev" ] && [ "$prev" != "$STEPS" ]; then
    echo "quickstart.sh: $OUT/ckpt holds a --steps $prev run (a rerun resumes it); give --steps $prev," \
         "another --out DIR, or delete $OUT" >&2
    exit 2
  fi
fi
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$OUT"
T0=$(date +%s)

echo "== 1/6 corpus"
if [ -z "$CORPUS" ]; then
  python examples/make_stdlib_corpus.py --out-dir "$OUT/corpus" --max-mb 8
  CORPUS="$OUT/corpus/stdlib_train.jsonl"
  HELDOUT="$OUT/corpus/stdlib_heldout.jsonl"
else
  HELDOUT="$CORPUS"
fi

echo "== 2/6 tokenizer (SentencePiece BPE, byte fallback, lossless)"
# A rerun keeps the tokenizer the data and checkpoint in $OUT were made with (training it again
# would give the same bytes: train_tokenizer.py is deterministic, but takes a while).
if [ -f "$OUT/tokenizer/spm.model" ]; then
  echo "reusing $OUT/tokenizer/spm.model (delete $OUT/tokenizer to train it again)"
else
  python tools/train_tokenizer.py --input "$CORPUS" --json-keys text --model-prefix "$OUT/tokenizer/spm" \
    --vocab-size 4096 --model-type bpe --input-sentence-size 200000 --num-threads 2
fi

echo "== 3/6 preprocess -> Megatron .bin/.idx"
python tools/preprocess_data.py --input "$CORPUS" --json-keys text --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$OUT/tokenizer/spm.model" --output-prefix "$OUT/data/train" --workers 2 --append-eod
python tools/preprocess_data.py --input "$HELDOUT" --json-keys text --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$OUT/tokenizer/spm.model" --output-prefix "$OUT/data/heldout" --workers 1 --append-eod

echo "== 4/6 pretrain: torchrun --nproc_per_node 2, TP=2, ZeRO-1, fp32 on CPU"
torchrun --standalone --nproc_per_node 2 pretrain_llama.py \
  --tp 2 --zero-stage 1 \
  --model-size tiny --hidden-size 256 --num-layers 4 --num-attention-heads 8 --num-query-groups 4 \
  --ffn-hidden-size 704 --seq-length 256 --max-position-embeddings 256 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer/spm.model" \
  --data-path "$OUT/data/train_text_document" --split 98,2,0 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$STEPS" \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
  --eval-interval 50 --eval-iters 8 --eval-at-start --log-interval 10 \
  --save "$OUT/ckpt" --save-interval 100 --load "$OUT/ckpt" \
  --tensorboard-dir "$OUT/tensorboard" --seed 1234 2>&1 | tee "$OUT/train.log"

echo "== 5/6 perplexity on held-out files (tools/eval_ppl.py, TP=2)"
torchrun --standalone --nproc_per_node 2 tools/eval_ppl.py --load "$OUT/ckpt" --tp 2 \
  --data-path "$OUT/data/heldout_text_document" --seq-length 256 --stride 128 --max-tokens 60000 --json \
  | tee "$OUT/eval_heldout.json"

echo "== 6/6 sample (tools/generate.py, greedy, TP=2)"
torchrun --standalone --nproc_per_node 2 tools/generate.py --load "$OUT/ckpt" --tp 2 \
  --prompt "def main(" --max-new-tokens 60 --greedy

python - "$OUT/ckpt/metrics.jsonl" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "val_ppl" in r]
if len(evals) < 2:
    sys.exit("quickstart: fewer than two validation records in " + sys.argv[1])
first, last = evals[0], evals[-1]
print(f"validation perplexity: first {first['val_ppl']:.2f} (step {first['step']}) -> "
      f"last {last['val_ppl']:.2f} (step {last['step']})")
if not last["val_ppl"] < first["val_ppl"]:
    sys.exit("quickstart: validation perplexity did not fall")
PY
echo "== reading the run: figures (tools/plot_run.py) and the run doctor (tools/diagnose_run.py)"
python tools/plot_run.py "$OUT/ckpt" --out "$OUT/plots"
# The doctor exits 1 (warnings) or 2 (critical findings): advice to read, not a failed quickstart.
python tools/diagnose_run.py "$OUT/ckpt" | tee "$OUT/diagnosis.txt" || true
echo "quickstart done in $(( $(date +%s) - T0 )) s; outputs in $OUT"
echo "curves: tensorboard --logdir $OUT/tensorboard   (metrics: $OUT/ckpt/metrics.jsonl, figures: $OUT/plots)"
