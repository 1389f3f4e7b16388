"""Derived values and cross-section validation of a :class:`megatron_lite.config.RunConfig`.

Runs before any process group is created, so a bad launch fails in seconds on every rank with the
same message. Batch arithmetic follows the recipe's symbols (Megatron-LM's
``megatron/training/arguments.py`` does the same checks for ``--global-batch-size``):

    D      = world_size / TP                          data-parallel degree
    mu_tok = micro_batch_size * seq_length            tokens per rank per micro-batch
    GB     = GB_tok / seq_length                      samples per step
    A      = GB / (micro_batch_size * D)              accumulated micro-batches per step
"""

from __future__ import annotations

import os

from megatron_lite.errors import ConfigError


def _err(msg: str) -> ConfigError:
    return ConfigError(msg)


def _model_attr(model, *names, default=None):
    for n in names:
        v = getattr(model, n, None)
        if v is not None:
            return v() if callable(v) else v
    return default


def derive_and_check(cfg, world_size: int) -> None:
    """Fill ``cfg.derived`` and raise ConfigError on any inconsistency.

    Args:
        cfg: the RunConfig (modified in place).
        world_size: number of processes in the job.

    Raises:
        ConfigError: naming the flag(s) and the fix.
    """
    from megatron_lite.training.schedules import warmup_steps_from

    from megatron_lite.training.deepspeed_engine import reconcile_user_json

    # Sections validate their own fields in __post_init__; rerun it on the merged values.
    for name in ("model", "data", "logging", "eval"):
        post = getattr(getattr(cfg, name), "__post_init__", None)
        if callable(post):
            try:
                post()
            except ValueError as e:
                raise ConfigError(f"[{name}] {e}") from None
    par, tr, sch, opt, ck = cfg.parallel, cfg.training, cfg.schedule, cfg.optimizer, cfg.checkpoint
    d = cfg.derived
    if par.deepspeed_config and os.path.isfile(par.deepspeed_config):
        try:
            reconcile_user_json(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if world_size < 1:
        raise _err(f"world size must be >= 1 (got {world_size})")
    tp = par.tensor_model_parallel_size
    if tp < 1:
        raise _err(f"--tensor-model-parallel-size must be >= 1 (got {tp})")
    if world_size % tp:
        raise _err(f"--tensor-model-parallel-size {tp} must divide the world size {world_size} "
                   f"(nproc_per_node x nnodes); choose TP in "
                   f"{[t for t in range(1, world_size + 1) if world_size % t == 0]}")
    if par.pipeline_model_parallel_size != 1:
        raise _err("--pipeline-model-parallel-size must be 1 (pipeline parallelism is not "
                   "implemented; use --tp and ZeRO instead)")
    if par.offload_params and par.zero_stage != 3:
        raise _err("--offload-params needs --zero-stage 3")
    if par.offload_optimizer and par.zero_stage == 0:
        raise _err("--offload-optimizer needs --zero-stage 1, 2 or 3")
    if par.deepspeed_config and not os.path.isfile(par.deepspeed_config):
        raise _err(f"--deepspeed-config {par.deepspeed_config}: file not found")
    d.world_size = world_size
    d.data_parallel_size = D = world_size // tp

    if cfg.model.vocab_size is None and getattr(cfg.data, "tokenizer_model", None):
        try:
            from megatron_lite.data.tokenizer import build_tokenizer

            tok = build_tokenizer(cfg.data.tokenizer_type or "SentencePieceTokenizer",
                                  cfg.data.tokenizer_model)
            cfg.model.vocab_size = int(tok.vocab_size)
        except (OSError, ValueError, RuntimeError) as e:
            raise _err(f"--tokenizer-model {cfg.data.tokenizer_model}: cannot load ({e})") from None
    # Model: its own checks (divisibility of heads by TP, ...) in the model section.
    if cfg.model.kv_channels is not None and cfg.model.kv_channels < 1:
        raise _err(f"--kv-channels must be >= 1 (got {cfg.model.kv_channels}); omit it for "
                   "hidden_size / num_attention_heads")
    validate = getattr(cfg.model, "validate", None)
    if callable(validate):
        try:
            validate(tp)
        except ValueError as e:
        
            if isinstance(e, ConfigError):
                raise
            raise _err(str(e)) from None
    seq = int(cfg.model.seq_length)
    d.padded_vocab_size = int(_model_attr(cfg.model, "padded_vocab_size", default=0) or 0)
    d.head_dim = int(_model_attr(cfg.model, "head_dim", "kv_channels", default=0) or 0)

    if tr.micro_batch_size < 1:
        raise _err(f"--micro-batch-size must be >= 1 (got {tr.micro_batch_size})")
    d.micro_batch_tokens = tr.micro_batch_size * seq
    if tr.global_batch_size is not None and tr.global_batch_tokens is not None:
        raise _err("give either --global-batch-size (samples) or --global-batch-tokens, not both")
    if tr.global_batch_size is not None and tr.global_batch_size < 1:
        raise _err(f"--global-batch-size must be >= 1 (got {tr.global_batch_size}): it is the "
                   "number of samples per optimizer step; omit it for micro_batch_size x D")
    if tr.global_batch_tokens is not None:
        if tr.global_batch_tokens <= 0 or tr.global_batch_tokens % seq:
            raise _err(f"--global-batch-tokens {tr.global_batch_tokens} must be a positive "
                       f"multiple of --seq-length {seq} (e.g. "
                       f"{max(1, round(tr.global_batch_tokens / seq)) * seq})")
        gb = tr.global_batch_tokens // seq
    else:
        gb = tr.global_batch_size if tr.global_batch_size is not None else tr.micro_batch_size * D
    if gb <= 0 or gb % (tr.micro_batch_size * D):
        step = tr.micro_batch_size * D
        given = (f"--global-batch-tokens {tr.global_batch_tokens}" if tr.global_batch_tokens
                 is not None else f"--global-batch-size {gb}")
        raise _err(
            f"{given}: global batch of {gb} samples ({gb * seq} tokens) is not a multiple of "
            f"micro_batch_size x D = {tr.micro_batch_size} x {D} = {step} samples "
            f"(mu_tok x D = {step * seq} tokens), so A = GB_tok / (mu_tok x D) is not an integer; "
            f"use a global batch of {max(1, round(gb / step)) * step} samples "
            f"({max(1, round(gb / step)) * step * seq} tokens) or change --micro-batch-size/--tp")
    d.global_batch_size = gb
    d.global_batch_tokens = gb * seq
    d.num_micro_batches = gb // (tr.micro_batch_size * D)
    # Batch-size ramp-up (megatron_lite/config/batch_ramp.py): d.global_batch_size / A stay the
    # final values; the ramp's sizes are re-derived from the training section where needed.
    from megatron_lite.config.batch_ramp import make_ramp

    try:
        ramp = make_ramp(getattr(tr, "rampup_batch_size", None),
                         getattr(tr, "rampup_batch_tokens", None), gb, seq,
                         tr.micro_batch_size * D)
    except ValueError as e:
        raise _err(str(e)) from None
    if tr.bf16 + tr.fp16 + tr.fp32 > 1:
        raise _err("--bf16, --fp16 and --fp32 are exclusive")
    if tr.bf16 or tr.fp16 or tr.fp32:
        d.precision = "bf16" if tr.bf16 else "fp16" if tr.fp16 else "fp32"
    else:  # recipe default bf16 where it is fast (GPU); fp32 on CPU. For THIS machine with
        # --device auto: tools/plan_run.py plans its --gpu target's default instead
        # (target_precision), and the plan line says when it was resolved here.
        import torch

        gpu = tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
        d.precision = "bf16" if gpu else "fp32"

    # Attention kernel vs the device the run trains on (explicit --device always; with --device
    # auto only for --dry-run, so a GPU config can still be planned on a laptop).
    if tr.device != "auto" or getattr(cfg, "dry_run", False):
        check_attention_backend(cfg)
    _check_tokenizer_vocab(cfg)

    # Run length.
    if (sch.train_iters is None) == (sch.train_tokens is None):
        raise _err("give exactly one of --train-iters (steps) or --train-tokens (tokens)")
    if sch.train_tokens is not None:
        if sch.train_tokens <= 0:
            raise _err(f"--train-tokens must be > 0 (got {sch.train_tokens})")
        d.train_iters = -(-sch.train_tokens // d.global_batch_tokens) if ramp is None else \
            ramp.steps_for(-(-sch.train_tokens // seq))
    else:
        if sch.train_iters <= 0:
            raise _err(f"--train-iters must be > 0 (got {sch.train_iters})")
        d.train_iters = sch.train_iters
    d.train_tokens = d.train_iters * d.global_batch_tokens if ramp is None else \
        ramp.consumed_after(d.train_iters) * seq
    d.lr_decay_iters = sch.lr_decay_iters if sch.lr_decay_iters is not None else d.train_iters
    if d.lr_decay_iters <= 0:
        raise _err(f"--lr-decay-iters must be > 0 (got {d.lr_decay_iters})")
    given = [n for n, v in (("--lr-warmup-iters", sch.lr_warmup_iters),
                            ("--lr-warmup-tokens", sch.lr_warmup_tokens),
                            ("--lr-warmup-fraction", sch.lr_warmup_fraction)) if v is not None]
    if len(given) > 1:
        raise _err(f"give at most one of {', '.join(given)}")
    for flag, v in (("--lr-warmup-iters", sch.lr_warmup_iters),
                    ("--lr-warmup-tokens", sch.lr_warmup_tokens)):
        if v is not None and v < 0:
            raise _err(f"{flag} must be >= 0 (got {v}); 0 means no warmup")
    if sch.lr_warmup_fraction is not None and not 0 <= sch.lr_warmup_fraction <= 1:
        raise _err(f"--lr-warmup-fraction must be in [0, 1] (got {sch.lr_warmup_fraction})")
    d.lr_warmup_iters = warmup_steps_from(
        sch.lr_warmup_iters, sch.lr_warmup_tokens,
        sch.lr_warmup_fraction if given else 0.01, d.global_batch_tokens, d.lr_decay_iters)
    if ramp is not None and sch.lr_warmup_tokens is not None:
        # During a ramp, warmup tokens means the steps that consume that many tokens.
        d.lr_warmup_iters = ramp.steps_for(-(-sch.lr_warmup_tokens // seq))
    if d.lr_warmup_iters < 0 or d.lr_warmup_iters > d.lr_decay_iters:
        raise _err(f"warmup ({d.lr_warmup_iters} steps) must be within [0, lr_decay_iters = "
                   f"{d.lr_decay_iters}]; shorten the warmup or raise --lr-decay-iters")
    d.lr_wsd_decay_iters = 0
    if sch.lr_decay_style == "wsd":
        if sch.lr_wsd_decay_iters is None:
            raise _err("--lr-decay-style wsd needs --lr-wsd-decay-iters (length of the final decay)")
        if not 0 < sch.lr_wsd_decay_iters <= d.lr_decay_iters - d.lr_warmup_iters:
            raise _err(f"--lr-wsd-decay-iters {sch.lr_wsd_decay_iters} must be in "
                       f"(0, lr_decay_iters - warmup = {d.lr_decay_iters - d.lr_warmup_iters}]")
        d.lr_wsd_decay_iters = sch.lr_wsd_decay_iters
    from megatron_lite.config.lr_scaling import resolve_peak_lr
    from megatron_lite.training.optimizer import check_optimizer

    try:
        opt.lr = resolve_peak_lr(opt.lr, getattr(opt, "lr_scaling", None),
                                 getattr(opt, "lr_reference", None), d.global_batch_tokens, 3.0e-4)
        check_optimizer(cfg)
        if tr.device != "auto" or getattr(cfg, "dry_run", False):
            from megatron_lite.training.optimizer import check_optimizer_runtime

            # the machine-dependent part (paged_adamw needs CUDA), like the attention check
            check_optimizer_runtime(cfg, _train_device_type(tr) != "cuda")
    except ValueError as e:
        raise _err(str(e)) from None
    if opt.min_lr is None:
        opt.min_lr = 0.1 * opt.lr
    if opt.lr <= 0 or opt.min_lr < 0 or opt.min_lr > opt.lr:
        raise _err(f"need 0 <= --min-lr ({opt.min_lr}) <= --lr ({opt.lr}) and --lr > 0")
    if opt.clip_grad < 0:
        raise _err(f"--clip-grad must be >= 0 (got {opt.clip_grad})")
    if not (0 <= opt.adam_beta1 < 1 and 0 <= opt.adam_beta2 < 1 and opt.adam_eps > 0):
        raise _err("need 0 <= --adam-beta1, --adam-beta2 < 1 and --adam-eps > 0")
    if tr.max_skipped_steps < 1:
        raise _err(f"--max-skipped-steps must be >= 1 (got {tr.max_skipped_steps})")
    if tr.exit_interval is not None and tr.exit_interval < 1:
        raise _err(f"--exit-interval must be >= 1 (got {tr.exit_interval})")

    # Checkpoints.
    if ck.save_interval is not None and ck.save_interval < 1:
        raise _err(f"--save-interval must be >= 1 (got {ck.save_interval})")
    if ck.save_interval is not None and not ck.save:
        raise _err("--save-interval needs --save DIR")
    if ck.keep_last is not None and ck.keep_last < 1:
        raise _err(f"--keep-last must be >= 1 (got {ck.keep_last})")
    log = cfg.logging
    if getattr(log, "log_interval", 1) is not None and getattr(log, "log_interval", 1) < 1:
        raise _err(f"--log-interval must be >= 1 (got {log.log_interval})")
    for name in ("eval_interval", "eval_iters"):
        v = getattr(cfg.eval, name, None)
        if v is not None and v < 0:
            raise _err(f"--{name.replace('_', '-')} must be >= 0 (got {v})")

    check_output_paths(cfg)

    # Spike guard and noise scale (need the derived A and the checkpoint flags above).
    from megatron_lite.training.step_extras import check_extras_config

    try:
        check_extras_config(cfg)
    except ValueError as e:
        raise _err(str(e)) from None


def check_output_paths(cfg) -> None:
    """The run's output paths, checked with the config (so ``--dry-run`` and every rank refuse a
    bad one in seconds, not after the model and the engine are built): ``--save``,
    ``--tensorboard-dir`` and ``--data-cache-path`` as folders, ``--metrics-file`` as a file.

    Raises:
        ConfigError: naming the flag, the path and the fix (:func:`output_path_problem`).
    """
    log, data = cfg.logging, cfg.data
    for flag, path, kind in (("--save", cfg.checkpoint.save, "dir"),
                             ("--tensorboard-dir", getattr(log, "tensorboard_dir", None), "dir"),
                             ("--metrics-file", getattr(log, "metrics_file", None), "file"),
                             ("--data-cache-path", getattr(data, "data_cache_path", None), "cache")):
        if path is not None and not str(path).strip():
            # most often an unset shell variable ("--save $RUN_DIR"): a run that would quietly
            # write no checkpoints (or write into the working folder)
            raise _err(f"{flag} is an empty string (an unset shell variable?); give a path, or "
                       f"leave {flag} out")
        if path:
            check_output_path(flag, path, kind)


def check_output_path(flag: str, path: str, kind: str = "dir") -> None:
    """Raise ConfigError (a ValueError) ``"<flag> <path>: <problem and fix>"`` when ``path``
    cannot be written (:func:`output_path_problem`); the tools use it for their outputs too."""
    problem = output_path_problem(path, kind)
    if problem:
        raise _err(f"{flag} {path}: {problem}")


def output_path_problem(path: str, kind: str = "dir") -> str | None:
    """Why ``path`` cannot be an output of this process, or None when it can.

    Nothing is created: the folders missing on the way to ``path`` are not made, and whether the
    nearest existing folder accepts new entries is asked of the OS (``os.access``). Only for root,
    to whom ``os.access`` says yes everywhere (``/proc`` included), is that confirmed by making
    and at once removing one empty probe folder there.

    Args:
        path: the output path as given.
        kind: ``"dir"`` (an output folder, e.g. ``--save``), ``"file"`` (a file written through
            a temporary file in its folder, e.g. ``--metrics-file``), ``"prefix"`` (files named
            ``<path><suffix>`` in its folder, e.g. ``--output-prefix``) or ``"cache"`` (a folder
            that may be read-only when it exists already: a prebuilt ``--data-cache-path``).

    Returns:
        One clause saying what is wrong and the fix, or None.
    """
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if kind in ("file", "prefix"):
            if kind == "file" and os.path.isdir(full):
                return "is a folder, not a file; give a file path (a new name inside it, say)"
            return _unwritable(os.path.dirname(full))
        if not os.path.isdir(full):
            what = "a broken symlink" if os.path.islink(full) else "a file"
            return f"exists and is {what}, not a folder; remove it or choose another path"
        return None if kind == "cache" else _unwritable(full)
    anc = os.path.dirname(full)
    while not os.path.lexists(anc):  # the nearest existing ancestor ("/" at worst)
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        return (f"{anc} is a file, not a folder, so nothing can be created under it; remove it "
                "or choose another path")
    why = _unwritable(anc)
    return f"cannot be created: {why}" if why else None


def _unwritable(folder: str) -> str | None:
    """None when new entries can be made in ``folder``, else why not (with the fix)."""
    import tempfile

    fix = "choose a folder you can write to, or fix its permissions"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable by this user; {fix}"
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_probe_", dir=folder))
    except OSError as e:
        return f"the folder {folder} does not accept new entries ({e.strerror or e}); {fix}"
    return None


def _train_device_type(tr) -> str:
    import torch

    if tr.device in ("cpu", "cuda"):
        return tr.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_attention_backend(cfg) -> None:
    """``--attention-backend`` against the device and precision the run trains with, so a kernel
    that cannot train there fails at validation instead of at the first forward.

    Raises:
        ConfigError: flash on CPU, flash with fp32 or without an importable flash_attn on CUDA,
            flex on CPU (torch has no FlexAttention backward on CPU), flex on a torch without it.
    """
    from megatron_lite.model.attention import flash_attn_available, flex_attention_available

    backend, tr = cfg.model.attention_backend, cfg.training
    dev = _train_device_type(tr)
    why = ("--device cpu" if tr.device == "cpu" else
           "--device auto and no CUDA device is visible on this machine; pass --device cuda to "
           "validate a GPU config here")
    if dev == "cpu" and backend == "flash":
        raise _err(f"--attention-backend flash needs a CUDA GPU with flash-attn, but this run "
                   f"trains on CPU ({why}); use --attention-backend sdpa (or auto)")
    if dev == "cpu" and backend == "flex":
        raise _err(f"--attention-backend flex cannot train on CPU: torch "
                   f"{__import__('torch').__version__} has no FlexAttention backward there ({why}); "
                   "use --attention-backend sdpa (or auto)")
    if backend == "flex" and not flex_attention_available():
        raise _err("--attention-backend flex needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                   "use --attention-backend sdpa (or auto)")
    if dev == "cuda" and backend == "flash":
        if cfg.derived.precision == "fp32":
            raise _err("--attention-backend flash has no fp32 kernel; train with --bf16 (or --fp16), "
                       "or use --attention-backend sdpa (or auto)")
        import torch

        if torch.cuda.is_available() and not flash_attn_available():
            raise _err("--attention-backend flash: flash_attn does not import here (pip install "
                       "flash-attn); or use --attention-backend sdpa (or auto)")


def _check_tokenizer_vocab(cfg) -> None:
    """An explicit ``--vocab-size`` smaller than the ``--tokenizer-model``'s vocabulary would let
    token ids >= vocab_size reach the embedding (the data loader also checks every micro-batch)."""
    dc, m = cfg.data, cfg.model
    if m.vocab_size is None or not getattr(dc, "tokenizer_model", None):
        return
    try:
        from megatron_lite.data.tokenizer import build_tokenizer

        n = int(build_tokenizer(dc.tokenizer_type or "SentencePieceTokenizer", dc.tokenizer_model).vocab_size)
    except (OSError, ValueError, RuntimeError) as e:
        raise _err(f"--tokenizer-model {dc.tokenizer_model}: cannot load ({e})") from None
    if n > m.vocab_size:
        raise _err(f"--vocab-size {m.vocab_size} is smaller than the vocabulary of --tokenizer-model "
                   f"{dc.tokenizer_model} ({n} ids): its token ids up to {n - 1} would index past the "
                   f"model's embedding; set --vocab-size {n} (or omit it to take the tokenizer's)")


def check_runtime(cfg) -> None:
    """Checks that depend on this machine (not done by finalize, so configs for a GPU cluster can
    be validated and planned on a laptop); called by ``pretrain`` before any process group.

    Raises:
        ConfigError: --device cuda without a GPU, --fp16 on CPU, or an attention backend that
            cannot train on this device (:func:`check_attention_backend`).
    """
    import torch

    tr = cfg.training
    if tr.device == "cuda" and not torch.cuda.is_available():
        raise _err("--device cuda but no CUDA device is visible; use --device cpu")
    on_cpu = tr.device == "cpu" or (tr.device == "auto" and not torch.cuda.is_available())
    if on_cpu and tr.fp16:
        raise _err("--fp16 is not supported on CPU (DeepSpeed has no fp16 CPU path); use fp32 "
                   "(default, fastest on CPU) or --bf16")
    from megatron_lite.training.optimizer import check_optimizer_runtime

    try:
        check_optimizer_runtime(cfg, on_cpu)
    except ValueError as e:
        raise _err(str(e)) from None
    check_attention_backend(cfg)


def _training_dynamics_lines(cfg) -> list[str]:
    """Plan lines for the batch ramp-up, the LR-scaling derivation and the optimizer."""
    from megatron_lite.config.lr_scaling import derivation_line, parse_reference
    from megatron_lite.training.optimizer import describe_optimizer
    from megatron_lite.config.batch_ramp import ramp_from_config

    d, o, out = cfg.derived, cfg.optimizer, []
    ramp = ramp_from_config(cfg)
    if ramp is not None:
        out.append(f"batch ramp-up           : {ramp.start} -> {ramp.final} samples by "
                   f"{ramp.increment} over {ramp.rampup_samples} samples "
                   f"({ramp.steps_for(ramp.rampup_samples)} steps); LR schedule counted in samples")
        segs = ramp.describe(cfg.model.seq_length, cfg.training.micro_batch_size
                             * d.data_parallel_size)
        if len(segs) > 12:   # a long ramp: its first and last stretches
            segs = segs[:5] + [f"  ... ({len(segs) - 10} more)"] + segs[-5:]
        out += segs
    if getattr(o, "lr_scaling", None):
        ref = parse_reference(o.lr_reference)
        line = derivation_line(o.lr_scaling, ref, d.global_batch_tokens)
        out.append(f"peak lr from scaling    : {line}")
    out.append(f"optimizer               : {describe_optimizer(cfg)}")
    return out


def plan_lines(cfg) -> list[str]:
    """Human-readable resolved plan: layout, batch arithmetic, run length, model size, FLOPs."""
    d, tr, m = cfg.derived, cfg.training, cfg.model
    lines = [
        "---------------- resolved plan ----------------",
        f"world size              : {d.world_size}  (TP {cfg.parallel.tensor_model_parallel_size}"
        f" x D {d.data_parallel_size}, PP 1)",
        f"ZeRO stage              : {cfg.parallel.zero_stage}"
        + (" +offload-optimizer" if cfg.parallel.offload_optimizer else "")
        + (" +offload-params" if cfg.parallel.offload_params else ""),
        f"precision               : {d.precision}" + (
            "" if tr.bf16 or tr.fp16 or tr.fp32 else
            "  (default: bf16 on GPU, fp32 on CPU where bf16 is ~30x slower; --bf16/--fp32)"
            + ("" if tr.device != "auto" else
               f"; resolved for this machine, --device auto = {_train_device_type(tr)}")),
        f"seq length L_ctx        : {m.seq_length} tokens",
        f"micro batch             : {tr.micro_batch_size} samples = mu_tok {d.micro_batch_tokens} "
        f"tokens per rank",
        f"grad accumulation A     : {d.num_micro_batches}  (= GB_tok / (mu_tok x D))",
        f"global batch            : {d.global_batch_size} samples = GB_tok {d.global_batch_tokens}"
        f" tokens",
        f"total steps             : {d.train_iters}  ({d.train_tokens} tokens)",
        f"lr schedule             : {cfg.schedule.lr_decay_style}, peak {cfg.optimizer.lr:g}, "
        f"min {cfg.optimizer.min_lr:g}, warmup {d.lr_warmup_iters} steps, decay to step "
        f"{d.lr_decay_iters}",
        f"padded vocab / head_dim : {d.padded_vocab_size} / {d.head_dim}",
    ]
    lines[-1:-1] = _training_dynamics_lines(cfg)
    try:
        from megatron_lite.model.counting import flops_per_token, num_parameters

        non_emb, total = num_parameters(m)
        fpt = flops_per_token(m, m.seq_length)
        lines += [f"N_params                : {total:,} total, {non_emb:,} non-embedding",
                  f"FLOPs per token         : {fpt:.4g} (training, fwd+bwd)",
                  f"FLOPs total             : {fpt * d.train_tokens:.4g}"]
    except ImportError:
        lines.append("N_params / FLOPs        : (megatron_lite.model.counting not available)")
    lines.append("-----------------------------------------------")
    return lines
