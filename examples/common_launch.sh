#!/usr/bin/env bash
# Shared launcher of the examples/pretrain_*.sh scripts (sourced, not run): builds the torchrun
# command for one node of a multi-node job and runs it, or validates the config with --dry-run.
#
# The calling script sets CONFIG (a YAML under configs/), RUN_NAME and optionally ENTRYPOINT
# (default pretrain_llama.py; cpt_7b.sh sets cpt_llama.py), then calls `launch_pretrain "$@"`.
# Environment (a cluster scheduler sets the first four; under SLURM they
# default from SLURM_NNODES, SLURM_NODEID and the first host of SLURM_JOB_NODELIST):
#   NNODES         nodes in the job                     (default 8)
#   NODE_RANK      this node's index, 0..NNODES-1       (default 0)
#   MASTER_ADDR    host of node 0                       (default localhost)
#   MASTER_PORT    rendezvous port                      (default 29500)
#   GPUS_PER_NODE  processes per node                   (default 8)
#   DATA_PATH      Megatron --data-path: PREFIX or "W1 PREFIX1 W2 PREFIX2 ..." (required to train)
#   TOKENIZER_MODEL SentencePiece .model of DATA_PATH    (required to train)
#   RUN_DIR        checkpoints, TensorBoard, metrics    (default runs/$RUN_NAME)
#   SAVE_INTERVAL  steps between checkpoints            (default 1000)
# Arguments after the script name go to the entrypoint and override the YAML, e.g.
#   --train-tokens 2000000000000 --lr 2e-4. With --dry-run nothing is launched: the config is
#   validated for NNODES x GPUS_PER_NODE ranks and the resolved plan printed (no GPU or data needed);
#   ML_PRINT_CMD=1 with --dry-run prints the world size and arguments instead (for tests).

# shellcheck source=../scripts/project_python.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/project_python.sh"

launch_pretrain() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$root"
  project_python || return 2  # a fresh shell: the checkout's .venv, or one line saying how
  local nnodes="${NNODES:-${SLURM_NNODES:-8}}"
  local node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
  local gpus="${GPUS_PER_NODE:-8}"
  local master_addr="${MASTER_ADDR:-}"
  if [ -z "$master_addr" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  fi
  master_addr="${master_addr:-localhost}"
  local master_port="${MASTER_PORT:-29500}"
  local run_dir="${RUN_DIR:-runs/$RUN_NAME}"
  local dry_run=0 a
  for a in "$@"; do [ "$a" = "--dry-run" ] && dry_run=1; done

  local -a args=(--config "$CONFIG")
  if [ -n "${DATA_PATH:-}" ]; then
    local -a data
    read -r -a data <<< "$DATA_PATH"   # a weighted blend is several words
    args+=(--data-path "${data[@]}")
  elif [ "$dry_run" = 0 ]; then
    echo "$(basename "$0"): set DATA_PATH (prefix of the _text_document .bin/.idx from tools/preprocess_data.py)" >&2
    return 2
  fi
  if [ -n "${TOKENIZER_MODEL:-}" ]; then
    args+=(--tokenizer-model "$TOKENIZER_MODEL")
  elif [ "$dry_run" = 0 ]; then
    echo "$(basename "$0"): set TOKENIZER_MODEL (the SentencePiece .model used by preprocess_data.py)" >&2
    return 2
  fi
  if [ "$dry_run" = 0 ]; then
    args+=(--save "$run_dir/ckpt" --load "$run_dir/ckpt" --save-interval "${SAVE_INTERVAL:-1000}"
           --tensorboard-dir "$run_dir/tensorboard")
  fi

  if [ "$dry_run" = 1 ]; then
    # Validate for the full job size without launching anything. ML_PRINT_CMD=1 prints the
    # world size and the entrypoint's arguments (one per line) instead (used by the tests).
    if [ "${ML_PRINT_CMD:-0}" = 1 ]; then
      printf '%s\n' "WORLD_SIZE=$(( nnodes * gpus ))" "${args[@]}" "$@"
      return 0
    fi
    WORLD_SIZE=$(( nnodes * gpus )) RANK=0 python "${ENTRYPOINT:-pretrain_llama.py}" "${args[@]}" "$@"
    return $?
  fi
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
  mkdir -p "$run_dir"
  # Console copy in the node's log through a tee that ignores the preemption signals: a tee
  # killed by SIGTERM/SIGUSR1 would break the pipe of ranks still writing their checkpoint.
  exec > >(trap '' TERM USR1 HUP INT; exec tee -a "$run_dir/train_node${node_rank}.log") 2>&1
  echo "node $node_rank/$nnodes: torchrun x $gpus -> ${master_addr}:$master_port, config $CONFIG, run dir $run_dir"
  # exec: the torchrun agent replaces this shell, so a signal the scheduler sends the task
  # (SLURM --signal, scancel --signal, preemption SIGTERM) reaches the agent, which forwards it
  # to the ranks; they save at the next step boundary and exit 0 (docs/reliability.md).
  exec torchrun --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$gpus" \
    --master_addr "$master_addr" --master_port "$master_port" \
    --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" \
    "${ENTRYPOINT:-pretrain_llama.py}" "${args[@]}" "$@"
}
