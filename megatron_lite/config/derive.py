"""Derived values of a :class:`megatron_lite.config.RunConfig` and the checks each one needs.

:func:`finalize` runs before any process group is created, so a bad launch fails in seconds on
every rank with the same message. It reads top to bottom: parallel layout, model, batch (with its
ramp-up), precision, device checks, run length and LR schedule, optimizer, then the checks that
derive nothing (:mod:`megatron_lite.config.checks`). Batch arithmetic follows the recipe's symbols
(Megatron-LM's ``megatron/training/arguments.py`` does the same checks for
``--global-batch-size``):

    D      = world_size / (TP x CP)                   data-parallel degree (CP ranks share samples)
    mu_tok = micro_batch_size * seq_length            tokens per rank per micro-batch
    GB     = GB_tok / seq_length                      samples per step
    A      = GB / (micro_batch_size * D)              accumulated micro-batches per step
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_lite.config.checks import (check_attention_backend, check_compile_and_kernels, check_intervals,
                                         check_noise_scale, check_optimizer,
                                         check_optimizer_runtime, check_output_paths,
                                         check_profiling, check_sequence_parallel,
                                         check_sections, check_spike_guard,
                                         check_tokenizer_vocab, checks_this_machine,
                                         missing_deepspeed_config,
                                         tokenizer_vocab_size, train_device_type)
from megatron_lite.config.batch_ramp import BatchRamp, make_ramp
from megatron_lite.config.checks import check_context_parallel
from megatron_lite.config.deepspeed_json import reconcile_user_json
from megatron_lite.config.lr_scaling import resolve_peak_lr
from megatron_lite.errors import ConfigError

DEFAULT_PEAK_LR = 3.0e-4       # the recipe's AdamW peak LR when neither --lr nor --lr-scaling
DEFAULT_WARMUP_FRACTION = 0.01  # of --lr-decay-iters when no warmup flag is given


def finalize(cfg, world_size: int | None = None):
    """Compute ``cfg.derived`` and validate the whole tree (call before any process group).

    Args:
        cfg: the :class:`~megatron_lite.config.RunConfig` (modified in place).
        world_size: number of processes in the job (default: ``$WORLD_SIZE`` or 1).

    Returns:
        ``cfg``.

    Raises:
        ConfigError: with the offending flag(s) and the fix.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_sections(cfg)
    if cfg.parallel.deepspeed_config and os.path.isfile(cfg.parallel.deepspeed_config):
        reconcile_user_json(cfg)
    derive_parallel(cfg, world_size)
    derive_model(cfg)
    check_context_parallel(cfg)
    check_sequence_parallel(cfg)
    ramp = derive_batch(cfg)
    derive_precision(cfg)
    if checks_this_machine(cfg):
        check_attention_backend(cfg)
        check_compile_and_kernels(cfg)
    check_tokenizer_vocab(cfg)
    derive_schedule(cfg, ramp)
    derive_optimizer(cfg)
    check_intervals(cfg)
    check_output_paths(cfg)
    # The spike guard and the noise scale need the derived A and the checkpoint flags above.
    check_spike_guard(cfg)
    check_noise_scale(cfg)
    check_profiling(cfg)
    return cfg


# ----------------------------------------------------------------------------- layout and model
def derive_parallel(cfg, world_size: int) -> None:
    """World size and D = world_size / (TP x CP); ZeRO/offload/pipeline combinations.

    Raises:
        ConfigError: TP or TP x CP not dividing the world, PP != 1, offload without its ZeRO stage, a missing
            ``--deepspeed-config`` file.
    """
    par = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1 (got {world_size})")
    tp = par.tensor_model_parallel_size
    if tp < 1:
        raise ConfigError(f"--tensor-model-parallel-size must be >= 1 (got {tp})")
    if world_size % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} must divide the world size "
                          f"{world_size} (nproc_per_node x nnodes); choose TP in "
                          f"{[t for t in range(1, world_size + 1) if world_size % t == 0]}")
    if par.pipeline_model_parallel_size != 1:
        raise ConfigError("--pipeline-model-parallel-size must be 1 (pipeline parallelism is not "
                          "implemented; use --tp and ZeRO instead)")
    if par.offload_params and par.zero_stage != 3:
        raise ConfigError("--offload-params needs --zero-stage 3")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("--offload-optimizer needs --zero-stage 1, 2 or 3")
    if par.deepspeed_config and not os.path.isfile(par.deepspeed_config):
        raise ConfigError(missing_deepspeed_config(par.deepspeed_config))
    cp = par.context_parallel_size
    if cp < 1 or world_size % (tp * cp):
        raise ConfigError(f"--context-parallel-size {cp} x --tensor-model-parallel-size {tp} must divide "
                          f"the world size {world_size} (world = TP x CP x D); choose CP in "
                          f"{[c for c in range(1, world_size // tp + 1) if (world_size // tp) % c == 0]}")
    cfg.derived.world_size = world_size
    cfg.derived.data_parallel_size = world_size // (tp * cp)


def derive_model(cfg) -> None:
    """The vocabulary from ``--tokenizer-model`` when ``--vocab-size`` is not given, the model
    section's own checks against TP (:meth:`ModelConfig.validate`), padded vocab and head_dim.

    Raises:
        ConfigError: the tokenizer cannot be loaded, a bad ``--kv-channels``, or the model's own
            checks (heads divisible by TP, ...).
    """
    m, dc = cfg.model, cfg.data
    m.sequence_parallel = cfg.parallel.sequence_parallel  # the layers read it from the model section
    if m.vocab_size is None and dc.tokenizer_model:
        m.vocab_size = tokenizer_vocab_size(dc)
    if m.kv_channels is not None and m.kv_channels < 1:
        raise ConfigError(f"--kv-channels must be >= 1 (got {m.kv_channels}); omit it for "
                          "hidden_size / num_attention_heads")
    try:
        m.validate(cfg.parallel.tensor_model_parallel_size)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    cfg.derived.padded_vocab_size = int(m.padded_vocab_size() or 0)
    cfg.derived.head_dim = int(m.head_dim or 0)


# ----------------------------------------------------------------------------- batch
def derive_batch(cfg) -> Optional[BatchRamp]:
    """mu_tok, GB (samples and tokens) and A from the training section; the batch ramp-up.

    ``cfg.derived``'s global batch and A stay the final values with a ramp-up; the ramp's sizes
    are re-derived from the training section where needed
    (:func:`megatron_lite.config.batch_ramp.ramp_from_config`).

    Returns:
        The ramp (:class:`BatchRamp`) or None without ``--rampup-batch-size/-tokens``.

    Raises:
        ConfigError: both or a bad global batch flag, GB not a multiple of micro_batch x D, a bad
            ramp.
    """
    tr, d = cfg.training, cfg.derived
    seq, D = int(cfg.model.seq_length), d.data_parallel_size
    if tr.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be >= 1 (got {tr.micro_batch_size})")
    d.micro_batch_tokens = tr.micro_batch_size * seq
    gb = _global_batch_samples(tr, seq, D)
    step = tr.micro_batch_size * D
    if gb <= 0 or gb % step:
        given = (f"--global-batch-tokens {tr.global_batch_tokens}" if tr.global_batch_tokens
                 is not None else f"--global-batch-size {gb}")
        raise ConfigError(
            f"{given}: global batch of {gb} samples ({gb * seq} tokens) is not a multiple of "
            f"micro_batch_size x D = {tr.micro_batch_size} x {D} = {step} samples "
            f"(mu_tok x D = {step * seq} tokens), so A = GB_tok / (mu_tok x D) is not an integer; "
            f"use a global batch of {max(1, round(gb / step)) * step} samples "
            f"({max(1, round(gb / step)) * step * seq} tokens) or change --micro-batch-size/--tp")
    d.global_batch_size = gb
    d.global_batch_tokens = gb * seq
    d.num_micro_batches = gb // step
    try:
        return make_ramp(tr.rampup_batch_size, tr.rampup_batch_tokens, gb, seq, step)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _global_batch_samples(tr, seq: int, D: int) -> int:
    """GB in samples from ``--global-batch-size``, ``--global-batch-tokens`` or micro_batch x D."""
    if tr.global_batch_size is not None and tr.global_batch_tokens is not None:
        raise ConfigError("give either --global-batch-size (samples) or --global-batch-tokens, "
                          "not both")
    if tr.global_batch_size is not None and tr.global_batch_size < 1:
        raise ConfigError(f"--global-batch-size must be >= 1 (got {tr.global_batch_size}): it is "
                          "the number of samples per optimizer step; omit it for "
                          "micro_batch_size x D")
    if tr.global_batch_tokens is not None:
        if tr.global_batch_tokens <= 0 or tr.global_batch_tokens % seq:
            raise ConfigError(f"--global-batch-tokens {tr.global_batch_tokens} must be a positive "
                              f"multiple of --seq-length {seq} (e.g. "
                              f"{max(1, round(tr.global_batch_tokens / seq)) * seq})")
        return tr.global_batch_tokens // seq
    return tr.global_batch_size if tr.global_batch_size is not None else tr.micro_batch_size * D


def derive_precision(cfg) -> None:
    """``derived.precision`` from ``--bf16/--fp16/--fp32``; without one, the recipe's default:
    bf16 where it is fast (GPU), fp32 on CPU.

    Raises:
        ConfigError: more than one precision flag.
    """
    tr = cfg.training
    if tr.bf16 + tr.fp16 + tr.fp32 > 1:
        raise ConfigError("--bf16, --fp16 and --fp32 are exclusive")
    if tr.bf16 or tr.fp16 or tr.fp32:
        cfg.derived.precision = "bf16" if tr.bf16 else "fp16" if tr.fp16 else "fp32"
    else:
        gpu = tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
        cfg.derived.precision = "bf16" if gpu else "fp32"


# ----------------------------------------------------------------------------- run length, LR
def derive_schedule(cfg, ramp: Optional[BatchRamp]) -> None:
    """Run length, LR decay length, warmup and the WSD decay phase (all in steps).

    Raises:
        ConfigError: see :func:`derive_run_length`, :func:`derive_warmup`, :func:`derive_wsd`.
    """
    derive_run_length(cfg, ramp)
    derive_warmup(cfg, ramp)
    derive_wsd(cfg)


def derive_run_length(cfg, ramp: Optional[BatchRamp]) -> None:
    """``train_iters``/``train_tokens`` from exactly one of ``--train-iters``/``--train-tokens``
    (with a ramp-up, tokens are counted over the ramp's growing batches) and ``lr_decay_iters``.

    Raises:
        ConfigError: neither or both given, a length <= 0.
    """
    sch, d, seq = cfg.schedule, cfg.derived, int(cfg.model.seq_length)
    if (sch.train_iters is None) == (sch.train_tokens is None):
        raise ConfigError("give exactly one of --train-iters (steps) or --train-tokens (tokens)")
    if sch.train_tokens is not None:
        if sch.train_tokens <= 0:
            raise ConfigError(f"--train-tokens must be > 0 (got {sch.train_tokens})")
        d.train_iters = -(-sch.train_tokens // d.global_batch_tokens) if ramp is None else \
            ramp.steps_for(-(-sch.train_tokens // seq))
    else:
        if sch.train_iters <= 0:
            raise ConfigError(f"--train-iters must be > 0 (got {sch.train_iters})")
        d.train_iters = sch.train_iters
    d.train_tokens = d.train_iters * d.global_batch_tokens if ramp is None else \
        ramp.consumed_after(d.train_iters) * seq
    d.lr_decay_iters = sch.lr_decay_iters if sch.lr_decay_iters is not None else d.train_iters
    if d.lr_decay_iters <= 0:
        raise ConfigError(f"--lr-decay-iters must be > 0 (got {d.lr_decay_iters})")


def warmup_steps_from(iters: Optional[int], tokens: Optional[int], fraction: Optional[float],
                      global_batch_tokens: int, decay_iters: int) -> int:
    """Warmup length in steps from whichever of the three flags was given (0 if none).

    ``tokens`` -> ceil(tokens / GB_tok); ``fraction`` -> floor(fraction * decay_iters)
    (Megatron-LM's ``--lr-warmup-fraction`` rule).
    """
    if iters is not None:
        return int(iters)
    if tokens is not None:
        return -(-int(tokens) // int(global_batch_tokens))
    if fraction is not None:
        return int(fraction * decay_iters)
    return 0


def derive_warmup(cfg, ramp: Optional[BatchRamp]) -> None:
    """``lr_warmup_iters`` from at most one of the three warmup flags (default 1% of the decay).

    Raises:
        ConfigError: more than one warmup flag, a negative length or fraction outside [0, 1],
            warmup longer than the decay.
    """
    sch, d, seq = cfg.schedule, cfg.derived, int(cfg.model.seq_length)
    given = [n for n, v in (("--lr-warmup-iters", sch.lr_warmup_iters),
                            ("--lr-warmup-tokens", sch.lr_warmup_tokens),
                            ("--lr-warmup-fraction", sch.lr_warmup_fraction)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give at most one of {', '.join(given)}")
    for flag, v in (("--lr-warmup-iters", sch.lr_warmup_iters),
                    ("--lr-warmup-tokens", sch.lr_warmup_tokens)):
        if v is not None and v < 0:
            raise ConfigError(f"{flag} must be >= 0 (got {v}); 0 means no warmup")
    if sch.lr_warmup_fraction is not None and not 0 <= sch.lr_warmup_fraction <= 1:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1] (got {sch.lr_warmup_fraction})")
    d.lr_warmup_iters = warmup_steps_from(
        sch.lr_warmup_iters, sch.lr_warmup_tokens,
        sch.lr_warmup_fraction if given else DEFAULT_WARMUP_FRACTION, d.global_batch_tokens,
        d.lr_decay_iters)
    if ramp is not None and sch.lr_warmup_tokens is not None:
        # During a ramp, warmup tokens means the steps that consume that many tokens.
        d.lr_warmup_iters = ramp.steps_for(-(-sch.lr_warmup_tokens // seq))
    if d.lr_warmup_iters < 0 or d.lr_warmup_iters > d.lr_decay_iters:
        raise ConfigError(f"warmup ({d.lr_warmup_iters} steps) must be within [0, lr_decay_iters "
                          f"= {d.lr_decay_iters}]; shorten the warmup or raise --lr-decay-iters")


def derive_wsd(cfg) -> None:
    """``lr_wsd_decay_iters``: the final decay of ``--lr-decay-style wsd`` (0 for other styles).

    Raises:
        ConfigError: wsd without ``--lr-wsd-decay-iters``, or a decay longer than the time after
            warmup.
    """
    sch, d = cfg.schedule, cfg.derived
    d.lr_wsd_decay_iters = 0
    if sch.lr_decay_style != "wsd":
        return
    if sch.lr_wsd_decay_iters is None:
        raise ConfigError("--lr-decay-style wsd needs --lr-wsd-decay-iters (length of the final "
                          "decay)")
    if not 0 < sch.lr_wsd_decay_iters <= d.lr_decay_iters - d.lr_warmup_iters:
        raise ConfigError(f"--lr-wsd-decay-iters {sch.lr_wsd_decay_iters} must be in "
                          f"(0, lr_decay_iters - warmup = {d.lr_decay_iters - d.lr_warmup_iters}]")
    d.lr_wsd_decay_iters = sch.lr_wsd_decay_iters


# ----------------------------------------------------------------------------- optimizer
def derive_optimizer(cfg) -> None:
    """The peak LR (``--lr``, or scaled from ``--lr-reference`` by ``--lr-scaling``), the optimizer
    against ZeRO/offload (and against this machine where
    :func:`~megatron_lite.config.checks.checks_this_machine`),
    ``--min-lr`` (default 10% of the peak) and the AdamW hyper-parameters.

    Raises:
        ConfigError: a bad LR derivation, an unsupported optimizer combination, LR bounds, clip or
            Adam betas/eps out of range.
    """
    o, d = cfg.optimizer, cfg.derived
    try:
        o.lr = resolve_peak_lr(o.lr, o.lr_scaling, o.lr_reference, d.global_batch_tokens,
                               DEFAULT_PEAK_LR)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_optimizer(cfg)
    if checks_this_machine(cfg):
        # the machine-dependent part (paged_adamw needs CUDA), like the attention check
        check_optimizer_runtime(cfg, train_device_type(cfg.training) != "cuda")
    if o.min_lr is None:
        o.min_lr = 0.1 * o.lr
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"need 0 <= --min-lr ({o.min_lr}) <= --lr ({o.lr}) and --lr > 0")
    if o.clip_grad < 0:
        raise ConfigError(f"--clip-grad must be >= 0 (got {o.clip_grad})")
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1 and o.adam_eps > 0):
        raise ConfigError("need 0 <= --adam-beta1, --adam-beta2 < 1 and --adam-eps > 0")
