#!/usr/bin/env bash
# Pretrain the recipe's 7B at 4k context from scratch on 8 nodes x 8 GPUs (64 x H100 80GB),
# configs/pretrain_7b_4k.yaml (chapter 11 values; TP 8, ZeRO-3, bf16). Run once per node, e.g. under SLURM:
#   DATA_PATH=/cpfs/tok/corpus_text_document TOKENIZER_MODEL=/cpfs/tok/spm.model \
#     srun --nodes 8 --ntasks-per-node 1 bash examples/pretrain_7b_4k.sh
# or set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) yourself on each node. Extra flags go to
# pretrain_llama.py and override the YAML. Check it anywhere: bash examples/pretrain_7b_4k.sh --dry-run
# Variables and defaults: examples/common_launch.sh.
set -euo pipefail
CONFIG="configs/pretrain_7b_4k.yaml"
RUN_NAME="pretrain_7b_4k"
source "$(dirname "$0")/common_launch.sh"
launch_pretrain "$@"
