"""Checks of a :class:`megatron_lite.config.RunConfig` that derive nothing: section fields, loop
and checkpoint intervals, output paths, the attention kernel and the optimizer against the device,
the tokenizer's vocabulary, the spike guard's and the noise scale's flags.

:func:`megatron_lite.config.finalize` calls them in a fixed order (so a config with two problems
always reports the same one first); :func:`check_runtime` holds the checks that depend on this
machine and runs when training starts. Every check raises :class:`ConfigError` naming the flag and
the fix.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch
import yaml

from megatron_lite.config.batch_ramp import ramp_from_config
from megatron_lite.data.blended import load_stage_bounds, load_stages
from megatron_lite.data.data_config import corpus_names, parse_data_path, train_corpus_names
from megatron_lite.data.mixing import load_reference_losses, parse_share_bounds
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.config.sections import parse_rank_list
from megatron_lite.errors import ConfigError
from megatron_lite.model.attention import flash_attn_available, flex_attention_available
from megatron_lite.ops.kernels import fused_kernels_unavailable

OPTIMIZERS = ("adamw", "lion", "adafactor", "paged_adamw", "cpu_adam")


# ----------------------------------------------------------------------------- sections, intervals
def check_sections(cfg) -> None:
    """Rerun the ``__post_init__`` field checks of the model, data, logging and eval sections on
    the merged values (defaults < YAML < flags).

    Raises:
        ConfigError: ``"[<section>] <message>"``.
    """
    for name in ("model", "data", "logging", "eval"):
        try:
            getattr(cfg, name).__post_init__()
        except ValueError as e:
            raise ConfigError(f"[{name}] {e}") from None


def check_intervals(cfg) -> None:
    """Loop-control, checkpoint, logging and evaluation intervals.

    Raises:
        ConfigError: a count below its minimum, or ``--save-interval`` without ``--save``.
    """
    tr, ck, log = cfg.training, cfg.checkpoint, cfg.logging
    if tr.max_skipped_steps < 1:
        raise ConfigError(f"--max-skipped-steps must be >= 1 (got {tr.max_skipped_steps})")
    if tr.exit_interval is not None and tr.exit_interval < 1:
        raise ConfigError(f"--exit-interval must be >= 1 (got {tr.exit_interval})")
    if ck.save_interval is not None and ck.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1 (got {ck.save_interval})")
    if ck.save_interval is not None and not ck.save:
        raise ConfigError("--save-interval needs --save DIR")
    if ck.keep_last is not None and ck.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1 (got {ck.keep_last})")
    if log.log_interval is not None and log.log_interval < 1:
        raise ConfigError(f"--log-interval must be >= 1 (got {log.log_interval})")
    for name, v in (("eval_interval", cfg.eval.eval_interval), ("eval_iters", cfg.eval.eval_iters)):
        if v is not None and v < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    stall = cfg.parallel.stall_timeout_seconds
    if stall is not None and not stall >= 0:
        raise ConfigError(f"--stall-timeout-seconds must be >= 0 seconds (0 = off; got {stall})")


# ----------------------------------------------------------------------------- output paths
def check_output_paths(cfg) -> None:
    """The run's output paths, checked with the config (so ``--dry-run`` and every rank refuse a
    bad one in seconds, not after the model and the engine are built): ``--save``,
    ``--tensorboard-dir`` and ``--data-cache-path`` as folders, ``--metrics-file`` as a file.

    Raises:
        ConfigError: naming the flag, the path and the fix (:func:`output_path_problem`).
    """
    for flag, path, kind in (("--save", cfg.checkpoint.save, "dir"),
                             ("--tensorboard-dir", cfg.logging.tensorboard_dir, "dir"),
                             ("--metrics-file", cfg.logging.metrics_file, "file"),
                             ("--data-cache-path", cfg.data.data_cache_path, "cache")):
        if path is not None:
            # "" is most often an unset shell variable ("--save $RUN_DIR"): a run that would
            # quietly write no checkpoints (or write into the working folder)
            check_output_path(flag, path, kind, optional=True)


def check_output_path(flag: str, path: str, kind: str = "dir", optional: bool = False) -> None:
    """Raise ConfigError (a ValueError) ``"<flag> <path>: <problem and fix>"`` when ``path``
    cannot be written (:func:`output_path_problem`) or is an empty string; the tools use it for
    their outputs too (``optional``: the flag may be left out, and the message says so)."""
    if path is not None and not str(path).strip():
        raise ConfigError(empty_path_message(flag, optional))
    problem = output_path_problem(path, kind)
    if problem:
        raise ConfigError(f"{flag} {path}: {problem}")


def empty_path_message(flag: str, optional: bool = True) -> str:
    """The one line for a path flag given as an empty string (most often an unset shell variable:
    ``--save $RUN_DIR``), which would otherwise mean the working folder or "not set"."""
    fix = f"give a path, or leave {flag} out" if optional else "give a path"
    return f"{flag} is an empty string (an unset shell variable?); {fix}"


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
    fix = "choose a folder you can write to, or fix its permissions"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable by this user; {fix}"
    if getattr(os, "geteuid", lambda: -1)() != 0:  # os.geteuid does not exist on Windows
        return None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_probe_", dir=folder))
    except OSError as e:
        return f"the folder {folder} does not accept new entries ({e.strerror or e}); {fix}"
    return None


# ----------------------------------------------------------------------------- device and kernels
def train_device_type(tr) -> str:
    """``"cuda"`` or ``"cpu"``: the device the training section's ``--device`` resolves to here."""
    if tr.device in ("cpu", "cuda"):
        return tr.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def checks_this_machine(cfg) -> bool:
    """Whether :func:`megatron_lite.config.finalize` checks the config against this machine: for
    an explicit ``--device`` always, with ``--device auto`` only for ``--dry-run`` (so a GPU config
    can still be planned on a laptop; :func:`check_runtime` checks it when training starts)."""
    return cfg.training.device != "auto" or cfg.dry_run


def check_attention_backend(cfg) -> None:
    """``--attention-backend`` against the device and precision the run trains with, so a kernel
    that cannot train there fails at validation instead of at the first forward.

    Raises:
        ConfigError: flash on CPU, flash with fp32 or without an importable flash_attn on CUDA,
            flex on CPU (torch has no FlexAttention backward on CPU), flex on a torch without it.
    """
    backend, tr = cfg.model.attention_backend, cfg.training
    dev = train_device_type(tr)
    why = ("--device cpu" if tr.device == "cpu" else
           "--device auto and no CUDA device is visible on this machine; pass --device cuda to "
           "validate a GPU config here")
    if dev == "cpu" and backend == "flash":
        raise ConfigError(f"--attention-backend flash needs a CUDA GPU with flash-attn, but this "
                          f"run trains on CPU ({why}); use --attention-backend sdpa (or auto)")
    if dev == "cpu" and backend == "flex":
        raise ConfigError(f"--attention-backend flex cannot train on CPU: torch "
                          f"{torch.__version__} has no FlexAttention backward there ({why}); "
                          "use --attention-backend sdpa (or auto)")
    if backend == "flex" and not flex_attention_available():
        raise ConfigError("--attention-backend flex needs torch >= 2.5 "
                          "(torch.nn.attention.flex_attention); use --attention-backend sdpa "
                          "(or auto)")
    if dev == "cuda" and backend == "flash":
        if cfg.derived.precision == "fp32":
            raise ConfigError("--attention-backend flash has no fp32 kernel; train with --bf16 "
                              "(or --fp16), or use --attention-backend sdpa (or auto)")
        if torch.cuda.is_available() and not flash_attn_available():
            raise ConfigError("--attention-backend flash: flash_attn does not import here (pip "
                              "install flash-attn); or use --attention-backend sdpa (or auto)")


def check_compile_and_kernels(cfg) -> None:
    """``--fused-kernels`` and ``--compile`` against the device the run trains on.

    Raises:
        ConfigError: liger/apex on CPU or not importable (with the install command); ``--compile``
            with the inductor backend and no C++ compiler (CPU) or no Triton (CUDA) to build its
            kernels.
    """
    tr = cfg.training
    dev = train_device_type(tr)
    reason = fused_kernels_unavailable(tr.fused_kernels, dev)
    if reason is not None:
        raise ConfigError(reason)
    if tr.compile and tr.compile_backend == "inductor":
        if dev == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise ConfigError("--compile (inductor backend) needs a C++ compiler on CPU and none is "
                              "on PATH (install g++), or use --compile-backend aot_eager")
        if dev == "cuda" and importlib.util.find_spec("triton") is None:
            raise ConfigError("--compile (inductor backend) needs Triton on CUDA (pip install "
                              "triton), or use --compile-backend aot_eager")


def check_sequence_parallel(cfg) -> None:
    """``--sequence-parallel`` against the layout (after the model section is resolved).

    Raises:
        ConfigError: TP = 1 (nothing to split over), or a sequence that does not split evenly
            over the TP ranks (s / CP tokens per context-parallel rank, divisible by TP).
    """
    par = cfg.parallel
    if not par.sequence_parallel:
        return
    tp, cp, s = par.tensor_model_parallel_size, par.context_parallel_size, cfg.model.seq_length
    if tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if s % (tp * cp):
        per_rank = "" if cp == 1 else f" x --context-parallel-size {cp}"
        raise ConfigError(f"--sequence-parallel: --seq-length {s} is not divisible by "
                          f"--tensor-model-parallel-size {tp}{per_rank} (each TP rank holds "
                          f"seq-length / {tp * cp} tokens); use a multiple of {tp * cp}")


# Backends whose setting context parallelism honours: ring attention computes every block with
# torch ops (layers/ring_attention.py), so these pick nothing kernel-specific; flash and flex would
# silently not run.
CP_ATTENTION_BACKENDS = ("auto", "sdpa", "eager")


def check_context_parallel(cfg) -> None:
    """``--context-parallel-size`` against the sequence, the attention backend and the features
    that read one rank's gradient of whole samples (after the model section is resolved).

    Raises:
        ConfigError: CP < 1, ``--seq-length`` not divisible by 2 CP (the load-balanced causal
            layout cuts each sample in 2 CP chunks), a backend that cannot run ring attention,
            ``--noise-scale-interval`` (its small-batch gradient is one rank's whole samples).
    """
    cp, s = cfg.parallel.context_parallel_size, cfg.model.seq_length
    if cp < 1:
        raise ConfigError(f"--context-parallel-size must be >= 1 (got {cp})")
    if cp == 1:
        return
    if s % (2 * cp):
        raise ConfigError(f"--context-parallel-size {cp}: --seq-length {s} is not divisible by 2 x CP = "
                          f"{2 * cp} (each sample is cut in 2 CP equal chunks); use a multiple of {2 * cp}")
    backend = cfg.model.attention_backend
    if backend not in CP_ATTENTION_BACKENDS:
        raise ConfigError(f"--attention-backend {backend} cannot run with --context-parallel-size {cp}: "
                          f"ring attention computes its blocks with torch ops; use --attention-backend "
                          f"{', '.join(CP_ATTENTION_BACKENDS)}")
    if cfg.training.noise_scale_interval:
        raise ConfigError(f"--noise-scale-interval is not supported with --context-parallel-size {cp} "
                          "(a rank's micro-batch gradient covers only its chunks of each sample); "
                          "measure the noise scale in a run with CP = 1")


def tokenizer_vocab_size(dc) -> int:
    """Vocabulary size of the data section's ``--tokenizer-model``.

    Raises:
        ConfigError: the tokenizer cannot be loaded.
    """
    if not os.path.exists(dc.tokenizer_model):
        raise ConfigError(missing_tokenizer(dc.tokenizer_model))
    try:
        tok = build_tokenizer(dc.tokenizer_type or "SentencePieceTokenizer", dc.tokenizer_model)
        return int(tok.vocab_size)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--tokenizer-model {dc.tokenizer_model}: cannot load ({e})") from None


def check_tokenizer_vocab(cfg) -> None:
    """An explicit ``--vocab-size`` smaller than the ``--tokenizer-model``'s vocabulary would let
    token ids >= vocab_size reach the embedding (the data loader also checks every micro-batch).

    Raises:
        ConfigError: the tokenizer cannot be loaded, or its vocabulary exceeds ``--vocab-size``.
    """
    dc, m = cfg.data, cfg.model
    if m.vocab_size is None or not dc.tokenizer_model:
        return
    n = tokenizer_vocab_size(dc)
    if n > m.vocab_size:
        raise ConfigError(f"--vocab-size {m.vocab_size} is smaller than the vocabulary of "
                          f"--tokenizer-model {dc.tokenizer_model} ({n} ids): its token ids up to "
                          f"{n - 1} would index past the model's embedding; set --vocab-size {n} "
                          f"(or omit it to take the tokenizer's)")


# ----------------------------------------------------------------------------- optimizer
def check_optimizer(cfg) -> None:
    """Static checks of ``--optimizer`` against ZeRO/offload and its own flags (the support
    matrix is in :mod:`megatron_lite.training.optimizer`).

    Raises:
        ConfigError: an unsupported combination or a bad hyper-parameter; the message names the
            flags and the fix.
    """
    o, par = cfg.optimizer, cfg.parallel
    name = o.optimizer
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name == "cpu_adam" and not (par.offload_optimizer and par.zero_stage >= 1):
        raise ConfigError("--optimizer cpu_adam (DeepSpeedCPUAdam) updates optimizer states held "
                          "in CPU memory: it needs --offload-optimizer with --zero-stage 1, 2 or 3 "
                          f"(got --zero-stage {par.zero_stage}"
                          f"{' with' if par.offload_optimizer else ' without'} offload); use "
                          "--optimizer adamw otherwise")
    if name == "paged_adamw" and par.offload_optimizer:
        raise ConfigError("--optimizer paged_adamw pages its states between GPU and CPU itself "
                          "(bitsandbytes): drop --offload-optimizer, or use --optimizer cpu_adam "
                          "for ZeRO-Offload")
    if name == "lion":
        if not (0 <= o.lion_beta1 <= 1 and 0 <= o.lion_beta2 <= 1):
            raise ConfigError(f"need 0 <= --lion-beta1 ({o.lion_beta1}), --lion-beta2 "
                              f"({o.lion_beta2}) <= 1")
        if o.lion_weight_decay is not None and o.lion_weight_decay < 0:
            raise ConfigError(f"--lion-weight-decay must be >= 0 (got {o.lion_weight_decay})")
    if name == "adafactor":
        if o.adafactor_beta2_decay > 0:
            raise ConfigError(f"--adafactor-beta2-decay must be <= 0 (got "
                              f"{o.adafactor_beta2_decay}; -0.8 is the paper's)")
        if o.adafactor_eps2 < 0 or (o.adafactor_eps1 is not None and o.adafactor_eps1 < 0) \
                or o.adafactor_d <= 0:
            raise ConfigError("need --adafactor-eps1/--adafactor-eps2 >= 0 and --adafactor-d > 0")


def check_optimizer_runtime(cfg, on_cpu: bool) -> None:
    """Checks that depend on this machine: paged AdamW needs CUDA and bitsandbytes, Lion needs
    lion-pytorch.

    Raises:
        ConfigError: naming the missing piece and the fix.
    """
    name = cfg.optimizer.optimizer
    if name == "paged_adamw":
        if on_cpu:
            raise ConfigError("--optimizer paged_adamw (bitsandbytes PagedAdamW) runs on CUDA "
                              "only; on CPU use --optimizer adamw")
        try:
            import bitsandbytes  # noqa: F401  # why: optional dependency, only for paged_adamw
        except ImportError:
            raise ConfigError("--optimizer paged_adamw needs bitsandbytes (pip install "
                              "bitsandbytes; it is not in requirements.txt) or use --optimizer "
                              "adamw") from None
    if name == "lion":
        try:
            import lion_pytorch  # noqa: F401  # why: optional dependency, only for lion
        except ImportError:
            raise ConfigError("--optimizer lion needs the lion-pytorch package (pip install "
                              "lion-pytorch; it is in requirements.txt)") from None


# ----------------------------------------------------------------------------- step companions
def check_spike_guard(cfg) -> None:
    """The loss-spike guard's flags (:mod:`megatron_lite.training.callbacks.spike_guard`).

    Raises:
        ConfigError: naming the flag and the fix.
    """
    t = cfg.training
    if not t.spike_detection:
        return
    if t.spike_window < 2:
        raise ConfigError(f"--spike-window must be >= 2 (a standard deviation needs two values); "
                          f"got {t.spike_window}")
    if not t.spike_threshold > 0:
        raise ConfigError(f"--spike-threshold must be > 0 sigmas; got {t.spike_threshold}")
    if not t.spike_lr_factor > 0 or t.spike_lr_steps < 0:
        raise ConfigError(f"--spike-lr-factor must be > 0 and --spike-lr-steps >= 0; got "
                          f"{t.spike_lr_factor}, {t.spike_lr_steps}")
    if t.spike_capture_samples < 0 or t.spike_max_rollbacks < 0:
        raise ConfigError("--spike-capture-samples and --spike-max-rollbacks must be >= 0")
    if t.spike_policy == "rollback" and not (cfg.checkpoint.save and cfg.checkpoint.save_interval):
        raise ConfigError("--spike-policy rollback reloads the newest checkpoint: give --save DIR "
                          "and --save-interval N (or use --spike-policy skip)")


def check_noise_scale(cfg) -> None:
    """The gradient noise scale's flags (:mod:`megatron_lite.training.callbacks.noise_scale`):
    refuse configurations where the micro-batch gradient cannot be read. Needs ``cfg.derived``.

    Raises:
        ConfigError: naming the flag and the fix.
    """
    n = cfg.training.noise_scale_interval
    if not n:
        return
    if n < 0:
        raise ConfigError(f"--noise-scale-interval must be >= 0 (0 = off); got {n}")
    if not 0.0 <= cfg.training.noise_scale_ema < 1.0:
        raise ConfigError(f"--noise-scale-ema must be in [0, 1); got "
                          f"{cfg.training.noise_scale_ema}")
    hint = ("; measure offline with tools/noise_scale_estimator.py --load CKPT --data-path PREFIX "
            "or turn it off with --noise-scale-interval 0")
    par = cfg.parallel
    if par.zero_stage >= 2 or par.offload_optimizer or par.offload_params:
        raise ConfigError(f"--noise-scale-interval needs --zero-stage 0 or 1 without offload (got "
                          f"stage {par.zero_stage}, offload optimizer={par.offload_optimizer}, "
                          f"params={par.offload_params}): DeepSpeed reduces and partitions each "
                          f"micro-batch's gradient in backward hooks there, so the per-rank "
                          f"micro-batch gradient is never whole" + hint)
    if cfg.derived.num_micro_batches < 2:
        raise ConfigError(f"--noise-scale-interval needs >= 2 micro-batches per rank (A = "
                          f"{cfg.derived.num_micro_batches}): with A = 1 DeepSpeed reduces the "
                          f"only micro-batch's gradient inside its backward; raise "
                          f"--global-batch-size to >= 2 x --micro-batch-size x D" + hint)
    _check_noise_scale_ramp(cfg, hint)
    if not cfg.optimizer.clip_grad > 0:
        raise ConfigError("--noise-scale-interval needs the global grad norm, which is computed "
                          "only with clipping on: give --clip-grad > 0" + hint)


def _check_noise_scale_ramp(cfg, hint: str) -> None:
    """During a batch ramp-up A follows the ramp: its first batch must already give A >= 2."""
    ramp = ramp_from_config(cfg)
    mu_d = cfg.training.micro_batch_size * cfg.derived.data_parallel_size
    if ramp is None or ramp.start // mu_d >= 2:
        return
    flag = "--rampup-batch-tokens" if cfg.training.rampup_batch_tokens else "--rampup-batch-size"
    raise ConfigError(f"--noise-scale-interval with {flag}: the ramp's first batch of "
                      f"{ramp.start} samples gives A = 1 micro-batch per rank (A = B / "
                      f"(micro_batch_size x D) = {ramp.start} / {mu_d}), whose gradient "
                      f"DeepSpeed reduces inside its backward; start the ramp at >= "
                      f"{2 * mu_d} samples (A >= 2)" + hint)


def check_profiling(cfg) -> None:
    """``--profile`` steps and ranks, ``--memory-snapshot`` against the device.

    Raises:
        ConfigError: ``--profile-step-start`` < 1, ``--profile-step-end`` < start, a
            ``--profile-ranks`` entry outside the world, ``--memory-snapshot`` without
            ``--profile`` or on CPU.
    """
    lg = cfg.logging
    if lg.memory_snapshot and not lg.profile:
        raise ConfigError("--memory-snapshot records over the profiled steps: add --profile "
                          "(and --profile-step-start/--profile-step-end)")
    if not lg.profile:
        return
    if lg.profile_step_start < 1:
        raise ConfigError(f"--profile-step-start must be >= 1 (got {lg.profile_step_start})")
    if lg.profile_step_end < lg.profile_step_start:
        raise ConfigError(f"--profile-step-end {lg.profile_step_end} is before "
                          f"--profile-step-start {lg.profile_step_start}; give END >= START")
    try:
        ranks = parse_rank_list(lg.profile_ranks)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    world = cfg.derived.world_size
    if max(ranks) >= world:
        raise ConfigError(f"--profile-ranks {lg.profile_ranks}: rank {max(ranks)} does not exist "
                          f"(world size {world}); give ranks 0..{world - 1}")
    if checks_this_machine(cfg):
        check_memory_snapshot_device(cfg, train_device_type(cfg.training) == "cpu")


def check_memory_snapshot_device(cfg, on_cpu: bool) -> None:
    """Raises ConfigError: ``--memory-snapshot`` on CPU (the CUDA allocator history only)."""
    if cfg.logging.memory_snapshot and on_cpu:
        raise ConfigError("--memory-snapshot records the CUDA caching allocator and needs a GPU "
                          "(this run trains on CPU); drop --memory-snapshot")


# ----------------------------------------------------------------------------- input paths
def check_input_paths(cfg) -> None:
    """Every file the run will read, checked before anything is launched (the entrypoints call it
    right after parsing, for ``--dry-run`` too, before any process group or DeepSpeed import):
    the ``.bin``/``.idx`` pair of each prefix of ``--data-path``, ``--train-data-path``,
    ``--valid-data-path`` and ``--test-data-path``; the ``--data-stages`` file and its stages;
    ``--tokenizer-model``; ``--load``; ``--pretrained-checkpoint``; ``--deepspeed-config``.

    ``--load`` of a folder that does not exist is accepted only when it is the ``--save`` folder
    (a job's first start, resuming from where it will save); any other missing ``--load`` folder
    is almost surely a typo that would quietly train from scratch. An existing folder without a
    complete checkpoint still starts from scratch with a warning, at run time.

    Not part of :func:`megatron_lite.config.finalize`: a config may be parsed, planned or tested
    where its data is not (``tools/plan_run.py`` on a laptop for a cluster's paths).

    Raises:
        ConfigError: one line naming the flag, the path and the fix.
    """
    dc = cfg.data
    check_no_empty_paths(cfg)
    for flag, value in (("--data-path", dc.data_path), ("--train-data-path", dc.train_data_path),
                        ("--valid-data-path", dc.valid_data_path),
                        ("--test-data-path", dc.test_data_path)):
        try:
            prefixes = parse_data_path(value)[0]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for prefix in prefixes:
            problem = data_prefix_problem(prefix)
            if problem:
                raise ConfigError(f"{flag} {prefix}: {problem}")
    if dc.data_stages:
        check_data_stages(dc)
    check_data_mixing(cfg)
    if dc.tokenizer_model and not os.path.exists(dc.tokenizer_model):
        raise ConfigError(missing_tokenizer(dc.tokenizer_model))
    check_load_path(cfg.checkpoint.load, cfg.checkpoint.save)
    base = cfg.cpt.pretrained_checkpoint
    if base and not os.path.isdir(base):
        raise ConfigError(f"--pretrained-checkpoint {base}: "
                          f"{'is a file' if os.path.exists(base) else 'folder not found'}; give "
                          "the base model's folder (HF: config.json + weights; or a megatron_lite "
                          "checkpoint folder)")
    ds = cfg.parallel.deepspeed_config
    if ds and not os.path.isfile(ds):
        raise ConfigError(missing_deepspeed_config(ds))


def check_no_empty_paths(cfg) -> None:
    """An input path given as an empty string (an unset shell variable) is refused instead of
    meaning "not set": ``--load ""`` would otherwise train from scratch next to a later
    checkpoint, ``--tokenizer-model ""`` would leave the vocabulary unknown.

    Raises:
        ConfigError: :func:`empty_path_message` for the first such flag.
    """
    dc, ck = cfg.data, cfg.checkpoint
    single = (("--tokenizer-model", dc.tokenizer_model), ("--load", ck.load),
              ("--data-stages", dc.data_stages), ("--deepspeed-config", cfg.parallel.deepspeed_config),
              ("--pretrained-checkpoint", cfg.cpt.pretrained_checkpoint))
    lists = (("--data-path", dc.data_path), ("--train-data-path", dc.train_data_path),
             ("--valid-data-path", dc.valid_data_path), ("--test-data-path", dc.test_data_path))
    for flag, value in single:
        if value is not None and not str(value).strip():
            raise ConfigError(empty_path_message(flag))
    for flag, values in lists:
        if values is not None and any(not str(v).strip() for v in values):
            raise ConfigError(empty_path_message(flag))


def missing_tokenizer(path: str) -> str:
    """The one-line error for a ``--tokenizer-model`` that does not exist."""
    return (f"--tokenizer-model {path}: not found; give the tokenizer the data was preprocessed "
            "with (train one with tools/train_tokenizer.py)")


def missing_deepspeed_config(path: str) -> str:
    """The one-line error for a ``--deepspeed-config`` that is not a file."""
    what = "is a folder" if os.path.isdir(path) else "file not found"
    return (f"--deepspeed-config {path}: {what}; give a DeepSpeed JSON (e.g. "
            "configs/deepspeed_zero1.json), or leave --deepspeed-config out (the flags build one)")


def data_prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` is not a readable dataset (``PREFIX.bin`` + ``PREFIX.idx``), with the fix;
    None when both files are there (their contents are checked when the data is opened)."""
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if not missing:
        return None
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and not data_prefix_problem(stem):
        return f"give the prefix without {ext}: {stem}"
    if len(missing) == 1:
        return (f"{prefix}{missing[0]} is missing beside {prefix}"
                f"{'.idx' if missing[0] == '.bin' else '.bin'}; rerun tools/preprocess_data.py "
                "for this corpus (both files come from one run)")
    if os.path.isdir(prefix):
        return ("is a folder; give the prefix of the .bin/.idx pair inside it (e.g. "
                f"{os.path.join(prefix, 'corpus_text_document')})")
    return (f"{prefix}.bin/.idx not found; make them with tools/preprocess_data.py "
            "(--output-prefix P writes P_text_document.bin/.idx; give that prefix, without "
            ".bin/.idx)")


def check_data_stages(dc) -> None:
    """``--data-stages``: the file exists and its stages fit the train blend's prefixes.

    Raises:
        ConfigError: naming the file and the stage (:func:`megatron_lite.data.blended.load_stages`).
    """
    if not os.path.isfile(dc.data_stages):
        raise ConfigError(f"--data-stages {dc.data_stages}: file not found; give a YAML list of "
                          "{until_tokens, weights} stages, or leave --data-stages out")
    prefixes = parse_data_path(dc.train_data_path or dc.data_path)[0]
    try:
        load_stages(dc.data_stages, prefixes)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--data-stages {' '.join(str(e).split())}") from None


def check_data_mixing(cfg) -> None:
    """Mixing controls of the train blend (issue 18): ``--data-share-bounds`` (and the stages'
    ``bounds``) name train corpora and are feasible; online mixing has per-corpus validation on an
    interval it can use and a readable ``--mixing-reference``. Feasibility against
    ``--data-max-epochs`` needs the corpora's sizes and is checked when the data is built
    (:func:`megatron_lite.data.builder.check_caps_feasible`).

    Raises:
        ConfigError: one line naming the flag.
    """
    dc, ev = cfg.data, cfg.eval
    names = train_corpus_names(dc)
    try:
        parse_share_bounds(dc.data_share_bounds, names)
        if dc.data_stages and os.path.isfile(dc.data_stages):
            load_stage_bounds(dc.data_stages, names)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dc.mixing_update != "online":
        return
    if len(names) < 2:
        raise ConfigError("--mixing-update online needs a blend of at least two train corpora (--data-path)")
    if not ev.eval_interval:
        raise ConfigError("--mixing-update online reads the per-corpus validation losses: set --eval-interval")
    valid = parse_data_path(dc.valid_data_path or dc.data_path)[0]
    valid_names = corpus_names(valid, dc.data_names) if len(valid) > 1 else []
    missing = [n for n in names if n not in valid_names]
    if missing:
        raise ConfigError(f"--mixing-update online: train corpora {missing} have no per-corpus validation "
                          f"loss (validation corpora: {valid_names}); validate on the same corpora "
                          "(--data-path, or --valid-data-path with --data-names naming them)")
    k = dc.mixing_update_interval
    if k is not None and k % ev.eval_interval:
        raise ConfigError(f"--mixing-update-interval {k} must be a multiple of --eval-interval "
                          f"{ev.eval_interval} (the update reads that step's validation losses)")
    if dc.mixing_reference:
        try:
            load_reference_losses(dc.mixing_reference, names)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--mixing-reference {dc.mixing_reference}: {' '.join(str(e).split())}"
                              if not str(e).startswith("--mixing-reference") else str(e)) from None


def check_load_path(load: str | None, save: str | None) -> None:
    """``--load``: an existing folder, or the ``--save`` folder before the first save.

    Raises:
        ConfigError: ``--load`` is a file, or a missing folder other than ``--save``.
    """
    if not load:
        return
    if os.path.exists(load) and not os.path.isdir(load):
        raise ConfigError(f"--load {load}: is a file; give the checkpoint folder (the --save "
                          "folder of the run to resume, or one iter_* folder in it)")
    if not os.path.exists(load):
        if save and os.path.abspath(load) == os.path.abspath(save):
            return  # a job's first start: it resumes from where it is about to save
        raise ConfigError(f"--load {load}: folder not found, and it is not the --save folder "
                          "(which may be missing before the first save); fix the path, or leave "
                          "--load out to start from scratch")


# ----------------------------------------------------------------------------- at launch
def check_runtime(cfg) -> None:
    """Checks that depend on this machine (not done by finalize, so configs for a GPU cluster can
    be validated and planned on a laptop); called by ``pretrain`` before any process group.

    Raises:
        ConfigError: --device cuda without a GPU, --fp16 on CPU, an optimizer that cannot run here
            (:func:`check_optimizer_runtime`), an attention backend that cannot train on this
            device (:func:`check_attention_backend`), fused kernels or a compile backend that
            cannot run here (:func:`check_compile_and_kernels`).
    """
    tr = cfg.training
    if tr.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device cpu")
    on_cpu = tr.device == "cpu" or (tr.device == "auto" and not torch.cuda.is_available())
    if on_cpu and tr.fp16:
        raise ConfigError("--fp16 is not supported on CPU (DeepSpeed has no fp16 CPU path); use "
                          "fp32 (default, fastest on CPU) or --bf16")
    check_optimizer_runtime(cfg, on_cpu)
    check_attention_backend(cfg)
    check_compile_and_kernels(cfg)
    check_memory_snapshot_device(cfg, on_cpu)
