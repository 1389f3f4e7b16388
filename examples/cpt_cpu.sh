#!/usr/bin/env bash
# Continued pretraining on a CPU, end to end (README "Continued pretraining (CPT)"):
#   base   = the quickstart's model (Python standard-library sources), runs/quickstart/ckpt;
#            made first by examples/quickstart.sh when missing
#   domain = English prose on every Python/Debian machine: the Python documentation topics
#            (pydoc_data) + license and copyright texts under /usr/share (5 % of docs held out)
#   -> tools/preprocess_data.py with the base tokenizer
#   -> torchrun --nproc_per_node 2 cpt_llama.py --tp 2: base weights, fresh AdamW, re-warmup,
#      replay blend --data-path 0.3 <stdlib train> 0.7 <domain train>
#   -> tools/cpt_report.py: base vs CPT perplexity on the stdlib and domain held-out sets at the
#      trained context and at 2x with YaRN x2 (table + JSON)
# Usage: bash examples/cpt_cpu.sh [--steps N (100)] [--base DIR] [--base-steps N (150)] [--out DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STEPS=100
BASE_STEPS=150
BASE_STEPS_GIVEN=0
BASE_RUN="$ROOT/runs/quickstart"
OUT="$ROOT/runs/cpt_cpu"
usage_error() {  # one line and exit 2, like the Python entrypoints
  echo "cpt_cpu.sh: error: $1 (usage: bash examples/cpt_cpu.sh [--steps N] [--base DIR] [--base-steps N] [--out DIR])" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --steps|--base|--base-steps|--out)
      # the last word, or one followed by another option, has no value
      if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then usage_error "$1 needs a value"; fi
      case "$1" in
        --steps) STEPS="$2" ;;
        --base) BASE_RUN="$2" ;;
        --base-steps) BASE_STEPS="$2"; BASE_STEPS_GIVEN=1 ;;
        --out) OUT="$2" ;;
      esac
      shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done
for pair in "--steps:$STEPS" "--base-steps:$BASE_STEPS"; do
  case "${pair#*:}" in
    ''|*[!0-9]*|0*) usage_error "${pair%%:*} must be a positive whole number of steps (got '${pair#*:}')" ;;
  esac
done
for pair in "--base:$BASE_RUN" "--out:$OUT"; do
  if [ -e "${pair#*:}" ] && [ ! -d "${pair#*:}" ]; then
    usage_error "${pair%%:*} ${pair#*:} exists and is not a folder; choose another folder"
  fi
done
cd "$ROOT"
source scripts/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
T0=$(date +%s)

echo "== 1/5 base model ($BASE_RUN/ckpt)"
if [ ! -f "$BASE_RUN/ckpt/latest" ]; then
  bash examples/quickstart.sh --out "$BASE_RUN" --steps "$BASE_STEPS"
else
  # An existing base is reused as it is; an explicit --base-steps that disagrees with it would
  # otherwise be ignored without a word.
  prev=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["config"]["derived"]["train_iters"])' \
         "$BASE_RUN/ckpt/$(cat "$BASE_RUN/ckpt/latest")/run_config.json" 2>/dev/null || echo "?")
  if [ "$BASE_STEPS_GIVEN" = 1 ] && [ "$prev" != "$BASE_STEPS" ]; then
    echo "cpt_cpu.sh: --base-steps $BASE_STEPS, but the base $BASE_RUN/ckpt already holds a --steps $prev" \
         "run; drop --base-steps, give --base-steps $prev, another --base DIR, or delete $BASE_RUN" >&2
    exit 2
  fi
  echo "reusing the base model in $BASE_RUN/ckpt (--steps $prev run)"
fi
TOK="$BASE_RUN/tokenizer/spm.model"
mkdir -p "$OUT/corpus" "$OUT/data"

echo "== 2/5 domain corpus (Python docs topics + license/copyright texts)"
python - "$OUT/corpus" <<'PY'
import glob, hashlib, json, os, sys
import pydoc_data.topics

out = sys.argv[1]
docs = [(f"pydoc/{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
paths = sorted(glob.glob("/usr/share/common-licenses/*") + glob.glob("/usr/share/doc/*/copyright"))
for p in paths:
    try:
        with open(p, encoding="utf-8") as f:
            docs.append((p, f.read()))
    except (OSError, UnicodeDecodeError):
        continue
seen, n, size = set(), {"train": 0, "heldout": 0}, {"train": 0, "heldout": 0}
with open(f"{out}/domain_train.jsonl.tmp", "w") as ft, open(f"{out}/domain_heldout.jsonl.tmp", "w") as fh:
    for name, text in docs:
        digest = hashlib.sha1(text.encode()).hexdigest()
        if not text.strip() or digest in seen:   # many packages ship identical copyright files
            continue
        seen.add(digest)
        split = "heldout" if int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100 < 5 else "train"
        (fh if split == "heldout" else ft).write(json.dumps({"text": text, "path": name}) + "\n")
        n[split] += 1
        size[split] += len(text.encode())
for s in ("train", "heldout"):
    os.replace(f"{out}/domain_{s}.jsonl.tmp", f"{out}/domain_{s}.jsonl")
print(f"[domain] train {n['train']} docs {size['train'] / 1e6:.2f} MB, held-out {n['heldout']} docs "
      f"{size['heldout'] / 1e6:.2f} MB")
PY

echo "== 3/5 preprocess the domain corpus with the base tokenizer"
for s in train heldout; do
  python tools/preprocess_data.py --input "$OUT/corpus/domain_$s.jsonl" --json-keys text \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK" \
    --output-prefix "$OUT/data/domain_$s" --workers 1 --append-eod
done

echo "== 4/5 continued pretraining: cpt_llama.py, TP=2, replay 30 % stdlib / 70 % domain"
torchrun --standalone --nproc_per_node 2 cpt_llama.py \
  --pretrained-checkpoint "$BASE_RUN/ckpt" --tp 2 --zero-stage 1 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOK" \
  --data-path 0.3 "$BASE_RUN/data/train_text_document" 0.7 "$OUT/data/domain_train_text_document" \
  --split 98,2,0 --micro-batch-size 8 --global-batch-size 16 --train-iters "$STEPS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
  --eval-interval 50 --eval-iters 4 --log-interval 10 \
  --save "$OUT/ckpt" --save-interval 50 --load "$OUT/ckpt" --seed 1234 2>&1 | tee "$OUT/cpt.log"

echo "== 5/5 report: base vs CPT (tools/cpt_report.py)"
torchrun --standalone --nproc_per_node 2 tools/cpt_report.py --tp 2 \
  --base "$BASE_RUN/ckpt" --cpt "$OUT/ckpt" \
  --base-data "$BASE_RUN/data/heldout_text_document" \
  --domain-data "$OUT/data/domain_heldout_text_document" --max-tokens 30000 \
  --rope-scaling-type yarn --rope-scaling-factor 2 --output "$OUT/report.json" \
  | tee "$OUT/report.md"
echo "cpt_cpu done in $(( $(date +%s) - T0 )) s; outputs in $OUT"
