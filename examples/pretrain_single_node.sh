#!/usr/bin/env bash
# One node, all its GPUs (torchrun --nnodes 1 at localhost): any recipe config on one 8-GPU server, e.g.
#   DATA_PATH=... TOKENIZER_MODEL=... bash examples/pretrain_single_node.sh configs/pretrain_7b_4k.yaml
# The config's GB_tok is kept, so with D = GPUs / TP = 1 the step accumulates A = GB_tok / mu_tok
# micro-batches (7B 4k: 4,194,304 / 16,384 = 256) and takes 8x longer than on 8 nodes.
# Arguments: [CONFIG.yaml] then flags for pretrain_llama.py (override the YAML). GPUS_PER_NODE
# (default 8), RUN_DIR, SAVE_INTERVAL as in examples/common_launch.sh. Check: ... --dry-run
set -euo pipefail
CONFIG="configs/pretrain_7b_4k.yaml"
if [ $# -gt 0 ] && [[ "$1" == *.yaml ]]; then CONFIG="$1"; shift; fi
RUN_NAME="single_node_$(basename "$CONFIG" .yaml)"
NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost
export NNODES NODE_RANK MASTER_ADDR
source "$(dirname "$0")/common_launch.sh"
launch_pretrain "$@"
