"""The run config's sections above the model and data layers: parallelism, optimizer, LR schedule,
the training loop, checkpoints, logging, evaluation and continued pretraining (CPT).

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
              "and scheduler blocks are ignored (--optimizer and the LR schedule flags decide).")
    distributed_timeout_minutes: int = arg(
        10, "Timeout of collective operations (minutes) before the process group reports a hang.")
    # Hang watchdog (issue 20): megatron_lite/training/callbacks/stall_watchdog.py.
    stall_timeout_seconds: Optional[float] = arg(
        None, "Stall watchdog: a rank with no finished step for this many seconds writes its "
              "Python stacks and last collective to <save>/hang/rank_<r>.txt, rank 0 prints "
              "which rank was stuck where, and every rank exits 1. Default: max(600, 10 x the "
              "longest step so far, save and eval included); 0 = off.")
    # Context parallelism (issue 16): each sample's sequence split over CP ranks, ring attention
    # (megatron_lite/layers/ring_attention.py); world = TP x CP x D.
    context_parallel_size: int = arg(
        1, "Context-parallel degree CP: every sample's sequence is cut in 2 CP chunks and CP rank i "
           "keeps chunks i and 2CP-1-i (load-balanced causal layout); attention is ring attention "
           "over the CP group. world_size = TP x CP x D; gradients are averaged and ZeRO partitions "
           "over the D x CP ranks. Needs --seq-length divisible by 2 CP.",
        flags=["--context-parallel-size"])
    # Sequence parallelism (issue 16): megatron_lite/parallel/mappings.py, layers/linear.py.
    sequence_parallel: bool = arg(
        False, "Sequence parallelism (Megatron-LM's flag; Korthikanti et al. 2022): norms, residual "
               "adds and dropout work on s/TP tokens per TP rank (the linear layers all-gather / "
               "reduce-scatter along the sequence instead of all-reducing), cutting the activations "
               "TP replicates. Needs --tensor-model-parallel-size > 1 and --seq-length divisible "
               "by TP. Same losses and checkpoints as without it.")


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer choice and hyper-parameters (recipe's AdamW: beta=(0.9, 0.95), eps=1e-8, wd=0.1,
    clip 1.0), peak-LR scaling, Lion and Adafactor settings."""

    optimizer: str = arg(
        "adamw", "Optimizer (megatron_lite/training/optimizer.py): adamw (Loshchilov & Hutter "
                 "2019; torch's fused kernel, CUDA and CPU), lion (Chen et al. 2023, "
                 "lion-pytorch; use a 3-10x smaller --lr and a 3-10x larger "
                 "--lion-weight-decay than AdamW), adafactor "
                 "(torch.optim.Adafactor; --lr is its relative step size, 1e-2 typical), "
                 "paged_adamw (bitsandbytes PagedAdamW, CUDA only), cpu_adam (DeepSpeedCPUAdam, "
                 "needs --offload-optimizer).",
        choices=["adamw", "lion", "adafactor", "paged_adamw", "cpu_adam"])
    lr: Optional[float] = arg(
        None, "Peak learning rate (reached at the end of warmup). Default 3e-4, or derived by "
              "--lr-scaling/--lr-reference (an explicit --lr must then equal the derived value).")
    lr_scaling: Optional[str] = arg(
        None, "Derive the peak LR from --lr-reference for this run's GB_tok: linear "
              "(lr_ref x GB_tok/GB_ref, Goyal et al. 2017) or sqrt (lr_ref x sqrt(GB_tok/GB_ref), "
              "Krizhevsky 2014, Malladi et al. 2022). With a batch ramp-up GB_tok is the final "
              "batch.", choices=["linear", "sqrt"])
    lr_reference: Optional[str] = arg(
        None, "Reference point LR@GB_TOK for --lr-scaling: a peak LR known to work at GB_TOK "
              "tokens per step, e.g. 3e-4@4194304.")
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
    lion_beta1: float = arg(0.9, "Lion beta1: interpolation between momentum and gradient for "
                                 "the sign update (Chen et al. 2023, default 0.9).")
    lion_beta2: float = arg(0.99, "Lion beta2: momentum decay (Chen et al. 2023, default 0.99).")
    lion_weight_decay: Optional[float] = arg(
        None, "Lion decoupled weight decay (default: --weight-decay). The paper keeps lr x wd "
              "about AdamW's, i.e. a 3-10x larger value with the 3-10x smaller LR.")
    adafactor_beta2_decay: float = arg(
        -0.8, "Adafactor: second-moment decay exponent, beta2_t = 1 - t^this (Shazeer & Stern "
              "2018, section 7.1; torch default -0.8).")
    adafactor_eps1: Optional[float] = arg(
        None, "Adafactor: epsilon added to the squared gradient (default: torch's, the dtype's "
              "smallest normal).")
    adafactor_eps2: float = arg(
        1.0e-3, "Adafactor: lower bound of the parameter RMS that scales the relative step.")
    adafactor_d: float = arg(1.0, "Adafactor: update clipping threshold d (Shazeer & Stern 2018, "
                                  "section 5).")


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
               "schedule differs (otherwise a difference is an error). Megatron-LM spells it "
               "--override-opt_param-scheduler; --override-scheduler is the CPT-style alias.",
        flags=["--override-opt-param-scheduler", "--override-opt_param-scheduler",
               "--override-scheduler"])


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
    rampup_batch_size: Optional[list[int]] = arg(
        None, "Batch-size ramp-up START INCREMENT RAMPUP_SAMPLES (Megatron-LM's meaning): the "
              "global batch starts at START samples and grows by INCREMENT every "
              "RAMPUP_SAMPLES / ((GB - START) / INCREMENT) consumed samples until it is GB; A "
              "follows the batch and the LR schedule is counted in samples "
              "(megatron_lite/config/batch_ramp.py).", nargs=3)
    rampup_batch_tokens: Optional[list[int]] = arg(
        None, "Batch-size ramp-up in tokens START_TOK INCREMENT_TOK RAMPUP_TOKENS (each a "
              "multiple of --seq-length); same as --rampup-batch-size in samples.", nargs=3)
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
    # Loss-spike guard (megatron_lite/training/callbacks/spike_guard.py) and gradient noise scale
    # (megatron_lite/training/callbacks/noise_scale.py).
    spike_detection: bool = arg(
        False, "Loss-spike guard: flag a step whose loss or pre-clip grad norm exceeds the rolling "
               "mean of the last --spike-window accepted steps by more than --spike-threshold "
               "sample standard deviations; act per --spike-policy and write "
               "<save or run dir>/spikes/step_<n>.jsonl with the batch's sample ids.")
    spike_window: int = arg(
        128, "Spike guard: rolling window length (accepted steps); no step is flagged before the "
             "window is full (warm-up).")
    spike_threshold: float = arg(
        6.0, "Spike guard: threshold in sigmas above the window mean (one-sided).")
    spike_policy: str = arg(
        "skip", "Spike guard: skip = do not apply the update (as for a NaN loss); rollback = "
                "reload the last checkpoint in --save and continue after the spike's batch (the "
                "samples read since that checkpoint, spike batch included, are never read again).",
        choices=["skip", "rollback"])
    spike_lr_factor: float = arg(
        1.0, "Spike guard, rollback: multiply the LR by this factor for --spike-lr-steps steps "
             "after each rollback.")
    spike_lr_steps: int = arg(0, "Spike guard, rollback: steps the --spike-lr-factor applies.")
    spike_max_rollbacks: int = arg(
        3, "Spike guard, rollback: at most this many rollbacks per run (the train split is built "
           "with room for the skipped samples); later spikes are skipped instead.")
    spike_capture_samples: int = arg(
        4, "Spike guard: decoded text of this many highest-loss samples goes into the capture "
           "file (all samples' ids and losses are always written).")
    noise_scale_interval: int = arg(
        0, "Gradient noise scale B_simple (McCandlish et al. 2018, app. A.1) every this many "
           "steps from the micro-batch and global-batch gradient norms (0 = off, no extra work). "
           "Needs ZeRO stage 0 or 1 and >= 2 micro-batches per rank.")
    noise_scale_ema: float = arg(
        0.95, "Gradient noise scale: EMA decay applied to |G|^2 and tr(Sigma) before the ratio "
              "(per measurement).")
    # Speed (issue 17): torch.compile per block (megatron_lite/model/compile.py) and the library
    # that runs RMSNorm/SwiGLU/RoPE (megatron_lite/ops/kernels.py).
    compile: bool = arg(
        False, "torch.compile each transformer block (torchtitan's per-block scheme): one compile "
               "at the first step, no recompilation for new packed-document layouts; attention "
               "with packed documents and the TP collectives run eagerly between graphs.")
    compile_backend: str = arg(
        "inductor", "torch.compile backend with --compile: inductor (generated C++/Triton "
                    "kernels), aot_eager (traced, no code generation) or eager (dynamo only).",
        choices=["inductor", "aot_eager", "eager"])
    fused_kernels: str = arg(
        "torch", "Implementation of RMSNorm, SwiGLU and RoPE: torch (ours; the only one on CPU), "
                 "liger (Liger-Kernel's Triton kernels, CUDA; pip install liger-kernel) or apex "
                 "(NVIDIA apex's fused RMSNorm, CUDA; SwiGLU and RoPE stay torch).",
        choices=["torch", "liger", "apex"])


@dataclasses.dataclass
class CheckpointConfig:
    """Checkpoint saving and loading (see :mod:`megatron_lite.checkpoint.engine_state`)."""

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
    # Verified checkpoints and asynchronous saves (checkpoint/verify.py, checkpoint/async_save.py).
    no_verify_checkpoint: bool = arg(
        False, "Do not compare the checkpoint's files with the checksums in its manifest at --load "
               "(sizes are still checked); saves record checksums either way.")
    no_checkpoint_fallback: bool = arg(
        False, "When the newest checkpoint in --load is damaged or incomplete, stop with an error "
               "naming the file instead of resuming from the previous valid one.")
    async_save: bool = arg(
        False, "Copy the state to host memory at the step boundary and write the checkpoint in a "
               "background thread while training continues (needs host memory for one more copy "
               "of this rank's checkpoint files); a save waits for the previous one, the end of "
               "training and an exit signal wait for the pending write.")


@dataclasses.dataclass
class LoggingConfig:
    """Logging settings (section ``logging`` of the run config)."""

    log_interval: int = arg(100, "print one log line, and write TensorBoard scalars and a "
                            "metrics.jsonl record, every this many steps (1 = every step)")
    tensorboard_dir: str | None = arg(None, "write TensorBoard event files to this folder "
                                      "(rank 0); off when unset")
    metrics_file: str | None = arg(None, "JSON-lines metrics file, one object per logged step "
                                   "or evaluation (default: <save or run dir>/metrics.jsonl)")
    peak_tflops: float | None = arg(None, "peak dense TFLOP/s of one device at the training "
                                    "precision, for MFU (default: table of known GPUs; on CPU "
                                    "a measured matmul peak, printed at start)")
    timing_log_level: int = arg(1, "step-time detail in the log line: 0 = time per step only, "
                                "1 = plus data wait / forward+backward / optimizer, 2 = plus "
                                "every other timer the loop recorded", choices=[0, 1, 2])
    # Profiling (training/callbacks/profiler.py).
    profile: bool = arg(False, "run torch.profiler over steps --profile-step-start.."
                        "--profile-step-end and write a Chrome/Perfetto trace per rank "
                        "(RUN/profile/trace_rank<r>.json) and the TensorBoard profiler format "
                        "(RUN/profile/tensorboard/)")
    profile_step_start: int = arg(10, "first profiled step (1-based, counted like the log line)")
    profile_step_end: int = arg(12, "last profiled step (inclusive)")
    profile_ranks: str = arg("0", "comma-separated global ranks that profile, e.g. 0,1")
    memory_snapshot: bool = arg(False, "CUDA only: record the allocator history over the "
                                "profiled steps and write RUN/profile/memory_snapshot_rank<r>."
                                "pickle (open it at https://pytorch.org/memory_viz)")

    def __post_init__(self):
        if self.log_interval is None or int(self.log_interval) < 1:
            raise ValueError(f"--log-interval must be >= 1 (got {self.log_interval})")
        if self.peak_tflops is not None and not float(self.peak_tflops) > 0:
            raise ValueError(f"--peak-tflops must be > 0 (got {self.peak_tflops}); "
                             "omit it to use the device table")


@dataclasses.dataclass
class EvalConfig:
    """When and how much to evaluate on the validation split during training."""

    eval_interval: int = arg(1000, "evaluate on the validation split every this many steps "
                             "(also after the last step); 0 disables periodic evaluation")
    eval_iters: int = arg(100, "micro-batches per data-parallel rank in one evaluation; the "
                          "loss is the token mean over all of them and all DP ranks. The test "
                          "split (--test-data-path or the third --split part) is evaluated once "
                          "on this many micro-batches after the last step (logged as "
                          "test_loss/test_ppl); a split that is empty is skipped with a warning")

    eval_at_start: bool = arg(False, "also evaluate once before the first training step of a fresh "
                              "(not resumed) run, so the untrained validation loss is on record")

    def __post_init__(self):
        if self.eval_interval is None or int(self.eval_interval) < 0:
            raise ValueError(f"--eval-interval must be >= 0 (got {self.eval_interval})")
        if self.eval_iters is None or int(self.eval_iters) < 1:
            raise ValueError(f"--eval-iters must be >= 1 (got {self.eval_iters}); to turn "
                             "evaluation off use --eval-interval 0")


VOCAB_INIT_CHOICES = ("piece-mean", "mean")


@dataclasses.dataclass
class CPTConfig:
    """Continued pretraining: base checkpoint, freezing and vocabulary extension (cpt_llama.py)."""

    pretrained_checkpoint: Optional[str] = arg(
        None, "Base model to continue from: a megatron_lite --save folder / checkpoint folder or "
              "a HuggingFace LlamaForCausalLM folder (config.json + safetensors), detected. "
              "Loads weights only and only on a fresh start; model flags not given are taken "
              "from its config, a contradicting one is an error.")
    pretrained_checkpoint_format: str = arg(
        "auto", "Format of --pretrained-checkpoint (auto: HF when DIR has config.json, else ours).",
        choices=["auto", "megatron_lite", "hf"])
    pretrained_tokenizer_model: Optional[str] = arg(
        None, "Tokenizer the base model was trained with (needed to initialise new rows of an "
              "extended --tokenizer-model with --extended-vocab-init piece-mean; default: the "
              "base checkpoint's --tokenizer-model, or tokenizer.model in the HF folder).")
    extended_vocab_init: str = arg(
        "piece-mean", "Rows for ids >= the base vocab size: piece-mean = mean of the base "
                      "rows of the base tokenizer's encoding of the new piece's text (embedding "
                      "and output layer alike); mean = mean of all base rows.",
        choices=list(VOCAB_INIT_CHOICES))
    freeze_embeddings: bool = arg(
        False, "Do not train the input embedding (with --tie-word-embeddings also the LM head).")
    freeze_layers: Optional[str] = arg(
        None, "Do not train these transformer blocks: 0-based inclusive ranges, e.g. '0-3' or "
              "'0-3,10-11'.")
    load_optimizer_state: bool = arg(
        False, "On a fresh start also load the base checkpoint's AdamW moments (megatron_lite "
               "base only, with the same TP, ZeRO stage, data-parallel size and vocabulary, no "
               "freezing; needs --load). Iteration, LR schedule, data position and RNG still "
               "start fresh.")
    # Filled by cpt.resolve_config (saved with checkpoints, never a flag).
    base_vocab_size: Optional[int] = arg(None, "vocabulary size of the base checkpoint", cli=False)
    base_format: Optional[str] = arg(None, "detected format of the base checkpoint", cli=False)


def parse_rank_list(spec: str, flag: str = "--profile-ranks") -> list[int]:
    """``"0,1"`` -> ``[0, 1]``.

    Raises:
        ValueError: an entry that is not a non-negative integer (message names ``flag``).
    """
    try:
        ranks = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        ranks = [-1]
    if not ranks or min(ranks) < 0:
        raise ValueError(f"{flag} must be comma-separated ranks >= 0, e.g. 0,1 (got {spec!r})")
    return sorted(set(ranks))


def parse_layer_ranges(spec: str | None, num_layers: int) -> list[int]:
    """Block indices named by ``--freeze-layers`` (sorted, unique).

    Args:
        spec: ``"a-b"``, ``"a"`` or a comma-separated list of those (0-based, inclusive).
        num_layers: L; every index must be in ``[0, L)``.

    Raises:
        ValueError: malformed spec, a reversed range or an index outside ``[0, L)``.
    """
    if not spec:
        return []
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"--freeze-layers {spec!r}: {part!r} is not 'a-b' or 'a' "
                             "(0-based block indices)") from None
        if a > b or a < 0 or b >= num_layers:
            raise ValueError(f"--freeze-layers {spec!r}: range {part!r} must satisfy "
                             f"0 <= a <= b < num_layers = {num_layers}")
        out.update(range(a, b + 1))
    return sorted(out)
