"""Config sections owned by the training engine: parallelism, optimizer, LR schedule, the training
loop and checkpoints.

Each section is a dataclass whose fields are declared with :func:`megatron_lite.config_field.arg`;
:mod:`megatron_lite.config` composes them (with the model, data, logging and eval sections) into the
run's config tree and generates argparse/YAML handling from the metadata. Flag names follow
Megatron-LM (``megatron/training/arguments.py``). Cross-field checks and derived values live in
:mod:`megatron_lite.config`, which sees the whole tree.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_lite.config_field import arg

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "wsd")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclasses.dataclass
class ParallelConfig:
    """Parallel layout: tensor parallelism (ours) and DeepSpeed ZeRO over the data-parallel group."""

    tensor_model_parallel_size: int = arg(
        1, "Tensor-parallel degree TP (ranks sharing one model replica); the data-parallel degree "
           "is D = world_size / TP.", flags=["--tensor-model-parallel-size", "--tp"])
    pipeline_model_parallel_size: int = arg(
        1, "Pipeline-parallel degree; only 1 is supported (kept for Megatron-LM script "
           "compatibility).", flags=["--pipeline-model-parallel-size", "--pp"])
    zero_stage: int = arg(
        1, "DeepSpeed ZeRO stage: 0 = plain data parallel, 1 = shard optimizer states, "
           "2 = + gradients, 3 = + parameters (all sharded over the data-parallel group only).",
        choices=[0, 1, 2, 3])
    offload_optimizer: bool = arg(
        False, "ZeRO-Offload: keep optimizer states (and the update) in CPU memory (stage >= 1).")
    offload_params: bool = arg(False, "ZeRO-Infinity: keep parameters in CPU memory (stage 3 only).")
    deepspeed_config: Optional[str] = arg(
        None, "DeepSpeed JSON config (// comments allowed). Fields set to \"auto\" are filled from this "
              "run's config; batch sizes, precision and clipping must agree with it. The optimizer "
              "and scheduler blocks are ignored (the engine owns AdamW and the LR schedule).")
    distributed_timeout_minutes: int = arg(
        10, "Timeout of collective operations (minutes) before the process group reports a hang.")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW hyper-parameters (recipe defaults: beta=(0.9, 0.95), eps=1e-8, wd=0.1, clip 1.0)."""

    optimizer: str = arg("adamw", "Optimizer (decoupled weight decay AdamW, Loshchilov & Hutter "
                                  "2019).", choices=["adamw"])
    lr: float = arg(3.0e-4, "Peak learning rate (reached at the end of warmup).")
    min_lr: Optional[float] = arg(None, "Learning rate at the end of decay (default: 10% of --lr, "
                                        "the recipe's cosine-to-10%).")
    weight_decay: float = arg(0.1, "Decoupled weight decay, applied to matrices only (not to "
                                   "norms/biases).")
    adam_beta1: float = arg(0.9, "Adam beta1 (first-moment decay).")
    adam_beta2: float = arg(0.95, "Adam beta2 (second-moment decay).")
    adam_eps: float = arg(1.0e-8, "Adam epsilon added to the denominator.")
    clip_grad: float = arg(1.0, "Clip gradients to this global L2 norm over all ranks "
                                "(0 disables clipping).")
    no_decay_embeddings: bool = arg(
        False, "Also exclude the input embedding and output layer matrices from weight decay "
               "(default: they are decayed, as in Megatron-LM).")


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate schedule and run length (see :mod:`megatron_lite.training.schedules`)."""

    train_iters: Optional[int] = arg(None, "Total optimizer steps (iterations) to train.")
    train_tokens: Optional[int] = arg(
        None, "Total training tokens T_tokens; train_iters = ceil(T_tokens / GB_tok).")
    lr_warmup_iters: Optional[int] = arg(
        None, "Linear warmup length (steps). Default when no warmup flag is given: 1% of "
              "--lr-decay-iters (the recipe: 1-5% of the run).")
    lr_warmup_tokens: Optional[int] = arg(
        None, "Linear warmup length in tokens; steps = ceil(tokens / GB_tok).")
    lr_warmup_fraction: Optional[float] = arg(
        None, "Linear warmup length as a fraction of --lr-decay-iters (floor).")
    lr_warmup_init: float = arg(0.0, "Learning rate the warmup starts from.")
    lr_decay_style: str = arg("cosine", "Decay after warmup.", choices=list(LR_DECAY_STYLES))
    lr_decay_iters: Optional[int] = arg(
        None, "Step at which decay reaches --min-lr (default: --train-iters).")
    lr_wsd_decay_iters: Optional[int] = arg(
        None, "WSD: length of the final decay phase (steps); the LR stays at --lr from the end of "
              "warmup until lr_decay_iters - lr_wsd_decay_iters.")
    lr_wsd_decay_style: str = arg("linear", "WSD: shape of the final decay.",
                                  choices=list(WSD_DECAY_STYLES))
    override_opt_param_scheduler: bool = arg(
        False, "On resume, take the schedule from this run's flags even if the checkpoint's "
               "schedule differs (otherwise a difference is an error).")


@dataclasses.dataclass
class TrainingConfig:
    """Batch arithmetic, precision, seeds and loop control."""

    micro_batch_size: int = arg(1, "Samples per micro-batch per data-parallel rank (mu_batch).")
    global_batch_size: Optional[int] = arg(
        None, "Samples per optimizer step over all data-parallel ranks (default: "
              "micro_batch_size x D, i.e. no accumulation). Exclusive with --global-batch-tokens.")
    global_batch_tokens: Optional[int] = arg(
        None, "Tokens per optimizer step GB_tok; must be a multiple of --seq-length. "
              "A = GB_tok / (mu_tok x D) micro-batches are accumulated per step.")
    seed: int = arg(1234, "Random seed (python, numpy, torch; model init does not depend on TP).")
    bf16: bool = arg(False, "bfloat16 mixed precision (fp32 master weights). Default on GPU when "
                            "no precision flag is given.")
    fp16: bool = arg(False, "float16 mixed precision with dynamic loss scaling (GPU only).")
    fp32: bool = arg(False, "Plain fp32 training. Default on CPU when no precision flag is given "
                            "(bf16 matmuls are ~30x slower than fp32 on CPU).")
    loss_scale: Optional[float] = arg(None, "fp16: static loss scale (default: dynamic).")
    initial_loss_scale_power: int = arg(16, "fp16: dynamic loss scale starts at 2**this.")
    deterministic: bool = arg(
        False, "Deterministic algorithms (torch.use_deterministic_algorithms, "
               "CUBLAS_WORKSPACE_CONFIG, NCCL_ALGO=Ring); slower on GPU.")
    max_skipped_steps: int = arg(
        10, "Abort after this many consecutive skipped steps (non-finite loss or grad norm).")
    exit_interval: Optional[int] = arg(
        None, "Save a checkpoint (when --save is set) and exit after this step (Megatron-LM's "
              "meaning: when step % exit_interval == 0).")
    exit_signal_handler: bool = arg(
        True, "On SIGTERM/SIGUSR1, save at the next step boundary and exit with status 0.")
    device: str = arg("auto", "Compute device: auto (cuda when available), cuda or cpu.",
                      choices=["auto", "cuda", "cpu"])


@dataclasses.dataclass
class CheckpointConfig:
    """Checkpoint saving and loading (see :mod:`megatron_lite.training.checkpointing`)."""

    save: Optional[str] = arg(None, "Directory to save checkpoints (iter_NNNNNNN folders + latest).")
    load: Optional[str] = arg(
        None, "Directory to resume from (its `latest` checkpoint, or the newest complete one); "
              "no checkpoint there -> warning and a fresh start.")
    save_interval: Optional[int] = arg(None, "Save every this many steps.")
    keep_last: Optional[int] = arg(None, "Keep only the newest K checkpoints (default: all).")
    no_load_optim: bool = arg(False, "Do not load optimizer state (fresh AdamW moments).")
    no_load_rng: bool = arg(False, "Do not load RNG states.")
    finetune: bool = arg(
        False, "Load only the model weights and start at step 0 with fresh optimizer, schedule, "
               "RNG and data position.")
    save_on_exit: bool = arg(True, "Save a final checkpoint at the end of training (needs --save).")
