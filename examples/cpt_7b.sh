#!/usr/bin/env bash
# Continued pretraining of a 7B base on 8 nodes x 8 GPUs (64 x H100 80GB) with replay,
# configs/cpt_7b.yaml (TP 8, ZeRO-3, bf16, peak LR 1e-4, 1 % re-warmup) through cpt_llama.py.
# Run once per node, e.g. under SLURM:
#   PRETRAINED=/cpfs/base/llama-7b-hf TOKENIZER_MODEL=/cpfs/tok/spm.model \
#   DATA_PATH="0.3 /cpfs/tok/base_text_document 0.7 /cpfs/tok/domain_text_document" \
#     srun --nodes 8 --ntasks-per-node 1 bash examples/cpt_7b.sh
# PRETRAINED is the base model (HF folder or our checkpoint folder; weights are read only on the
# first start, a restart resumes runs/cpt_7b/ckpt). Extra flags go to cpt_llama.py and override
# the YAML (e.g. --freeze-embeddings, --extended-vocab-init mean, --train-tokens 2e10).
# Check it anywhere (reads only the base's config): PRETRAINED=DIR bash examples/cpt_7b.sh --dry-run
# Other variables and defaults: examples/common_launch.sh.
set -euo pipefail
CONFIG="configs/cpt_7b.yaml"
RUN_NAME="cpt_7b"
ENTRYPOINT="cpt_llama.py"
if [ -z "${PRETRAINED:-}" ]; then
  echo "$(basename "$0"): set PRETRAINED (the base model: a HuggingFace folder or a megatron_lite checkpoint folder)" >&2
  exit 2
fi
source "$(dirname "$0")/common_launch.sh"
launch_pretrain --pretrained-checkpoint "$PRETRAINED" "$@"
