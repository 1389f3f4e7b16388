"""``pretrain(cfg)``: process groups, model, DeepSpeed engine, data, the loop, checkpoints, logging.

Launch with torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` from the environment) or as a single
process (a one-rank group is created). The backend follows the device: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import warnings
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.training.step import TrainState, train_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(cfg) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is used, else cpu."""
    want = cfg.training.device
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_distributed(cfg, device: torch.device) -> None:
    """Create the default process group (NCCL on CUDA, gloo on CPU) and the TP/DP groups."""
    from datetime import timedelta

    from megatron_lite.parallel import (destroy_model_parallel, initialize_model_parallel,
                                        model_parallel_is_initialized)

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python pretrain_llama.py`: a one-process job
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=cfg.parallel.distributed_timeout_minutes))
    if dist.get_world_size() != cfg.derived.world_size:
        raise RuntimeError(f"config was finalized for world size {cfg.derived.world_size} but the "
                           f"job has {dist.get_world_size()} processes")
    if model_parallel_is_initialized():  # pretrain() called again in the same process
        destroy_model_parallel()
    initialize_model_parallel(cfg.parallel.tensor_model_parallel_size)


def set_seeds(cfg, device: torch.device) -> None:
    """Seed python/numpy/torch and the TP RNG tracker; enable deterministic mode if asked."""
    from megatron_lite.parallel import model_parallel_manual_seed

    seed = cfg.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)
    if cfg.training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("NCCL_ALGO", "Ring")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# Preemption signals (--exit-signal-handler): the rank saves at the next step boundary; its
# DataLoader workers are made to survive them (data/builder.py PreemptionSafeWorkerInit).
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _ExitSignal:
    """Records SIGTERM/SIGUSR1; the loop saves and exits at the next step boundary."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            for s in EXIT_SIGNALS:
                signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank(self, device) -> bool:
        t = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def _batches(loader, signals=()) -> Iterator[dict]:
    from megatron_lite.data.builder import iter_loader

    for b in iter_loader(loader, signals):   # workers start with the signals blocked
        yield b


def _worker_signals(cfg) -> tuple:
    """Signals the training loader's workers must survive: those this rank handles."""
    return EXIT_SIGNALS if cfg.training.exit_signal_handler else ()


def _spike_headroom(cfg) -> int:
    """Train samples beyond the run's own that --spike-policy rollback may skip."""
    from megatron_lite.training.callbacks.spike_guard import rollback_headroom_samples

    return rollback_headroom_samples(cfg)


def build_data(cfg, consumed_samples: int, data_state: dict | None = None, holder: dict | None = None):
    """Train/valid loaders (this DP rank) from the data section; (None, None) without data.

    ``holder`` (when given) receives ``train_ds`` and ``test_loader``: the test split's loader
    (``--test-data-path`` or the third ``--split`` part; None when that split is empty), read once
    at the end of training. Every loader draws from its own seeded ``torch.Generator`` (never the
    global RNG, so dropout streams are the same fresh or resumed) and refuses token ids
    ``>= --vocab-size`` (one max per micro-batch in collate).
    """
    from megatron_lite.data import build_data_loader, build_train_valid_test_datasets
    from megatron_lite.data.tokenizer import build_tokenizer
    from megatron_lite.parallel import get_data_parallel_rank, get_data_parallel_world_size

    dc, d = cfg.data, cfg.derived
    eod = None
    if dc.tokenizer_model:
        eod = build_tokenizer(dc.tokenizer_type or "SentencePieceTokenizer",
                              dc.tokenizer_model).eod
    ev = cfg.eval
    # Every evaluation reads the same first eval_iters micro-batches of the validation split, so
    # successive validation losses are comparable.
    valid_samples = (getattr(ev, "eval_iters", 0) * cfg.training.micro_batch_size
                     * d.data_parallel_size) if getattr(ev, "eval_interval", 0) else 0
    # The test split is evaluated once, at the end of training, on eval_iters micro-batches
    # (Megatron's do_test: whenever a test split exists).
    test_samples = getattr(ev, "eval_iters", 0) * cfg.training.micro_batch_size * d.data_parallel_size
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        dc, cfg.model.seq_length, (d.train_tokens // cfg.model.seq_length + _spike_headroom(cfg),
                                   valid_samples, test_samples),
        cfg.training.seed, eod)
    if data_state and train_ds is not None and hasattr(train_ds, "load_state_dict"):
        # Per-source consumed counts from the checkpoint: with a changed stage schedule or
        # weights, positions from here on are re-derived so no source repeats or skips samples.
        train_ds.load_state_dict(data_state)
    if holder is not None:
        holder["train_ds"] = train_ds
    dp_rank, dp = get_data_parallel_rank(), get_data_parallel_world_size()
    mbs, seed, vocab = cfg.training.micro_batch_size, cfg.training.seed, cfg.model.vocab_size
    train = build_data_loader(train_ds, consumed_samples, mbs, dp_rank, dp, num_workers=dc.num_workers,
                              seed=seed, vocab_size=vocab, worker_signals=_worker_signals(cfg)
                              ) if train_ds is not None else None
    valid = build_data_loader(valid_ds, 0, mbs, dp_rank, dp, num_workers=0, random_order=False,
                              seed=seed + 1, vocab_size=vocab) if valid_ds is not None else None
    if holder is not None:
        holder["test_loader"] = build_data_loader(
            test_ds, 0, mbs, dp_rank, dp, num_workers=0, seed=seed + 2,
            vocab_size=vocab) if test_ds is not None else None
    return train, valid


def run_folder(cfg) -> str | None:
    """Where the resolved config and environment go: --save, else the metrics file's or the
    TensorBoard folder (None when none is set)."""
    mf = getattr(cfg.logging, "metrics_file", None)
    return cfg.checkpoint.save or (os.path.dirname(os.path.abspath(mf)) if mf else None) or \
        getattr(cfg.logging, "tensorboard_dir", None)


def _write_run_folder(run_dir: str, cfg) -> None:
    """config.yaml + run_info.json (versions, git, environment) and the DeepSpeed config used."""
    import json

    from megatron_lite.training.deepspeed_engine import build_ds_config
    from megatron_lite.training.run_info import write_run_info

    os.makedirs(run_dir, exist_ok=True)
    write_run_info(run_dir, cfg.to_dict())
    path = os.path.join(run_dir, "deepspeed_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = json.dumps(build_ds_config(cfg), indent=1)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def build_model(cfg, device: torch.device):
    """This rank's LlamaModel; at ZeRO-3 built under ``deepspeed.zero.Init`` so each layer's
    parameters are partitioned over the DP group right after that layer is initialised (a 13B
    model never exists whole on one device). Values equal the unpartitioned build: the layers draw
    their weights inside their own ``__init__`` (megatron_lite/layers/init.py)."""
    from megatron_lite.model.llama import LlamaModel

    if cfg.parallel.zero_stage != 3:
        return LlamaModel(cfg.model, device=device)
    import deepspeed

    from megatron_lite.parallel import get_data_parallel_group
    from megatron_lite.training.deepspeed_engine import build_ds_config

    ds = build_ds_config(cfg)
    # Without an mpu DeepSpeedConfig would check train_batch_size against the whole world; give it
    # only what zero.Init reads (ZeRO/offload settings, parameter dtype).
    init_cfg = {k: ds[k] for k in ("zero_optimization", "bf16", "fp16") if k in ds}
    init_cfg["train_micro_batch_size_per_gpu"] = ds["train_micro_batch_size_per_gpu"]
    with deepspeed.zero.Init(data_parallel_group=get_data_parallel_group(),
                             config_dict_or_path=init_cfg):
        return LlamaModel(cfg.model, device=device)


def pretrain(cfg, data_iterators=None, model_setup=None) -> TrainState:
    """Train according to a finalized RunConfig (collective over all ranks).

    Args:
        cfg: finalized :class:`megatron_lite.config.RunConfig`.
        data_iterators: optional ``(train_iter_factory, valid_loader)`` override where
            ``train_iter_factory(consumed_samples)`` returns an iterator of this rank's
            micro-batches (tests); default: :func:`build_data`.
        model_setup: optional ``fn(model, cfg)`` called on every rank after this rank's model is
            built (ZeRO-3: already partitioned) and before the optimizer and DeepSpeed engine
            exist: load pretrained weights, set ``requires_grad=False`` on frozen parameters
            (continued pretraining, ``cpt_llama.py``). Parameters it freezes get no optimizer state.

    Returns:
        The final :class:`TrainState`.

    Raises:
        RunLockedError: (every rank) another live run holds ``--save``'s lock
            (:mod:`megatron_lite.training.run_lock`); nothing was written.
    """
    from megatron_lite.training.run_lock import RunLock

    lock = RunLock()   # global rank 0 holds it from start-up to here, whatever ends the run
    try:
        return _pretrain(cfg, data_iterators, model_setup, lock)
    finally:
        lock.release()


def _pretrain(cfg, data_iterators, model_setup, lock) -> TrainState:
    """The body of :func:`pretrain`; ``lock`` is taken right after the process group exists."""
    from megatron_lite.config import format_plan
    from megatron_lite.checkpoint import engine_state as checkpointing
    from megatron_lite.training.deepspeed_engine import clip_in_optimizer, init_engine
    from megatron_lite.training.optimizer import build_optimizer
    from megatron_lite.training.schedules import LRScheduler

    from megatron_lite.config.checks import check_runtime

    check_runtime(cfg)
    from megatron_lite.training import step_extras as _spikes

    _spikes.check_extras_config(cfg)  # --spike-* and --noise-scale-* (before any group work)
    dc = cfg.data
    if data_iterators is None and not (dc.data_path or dc.train_data_path):
        from megatron_lite.config import ConfigError

        raise ConfigError("no training data: give --data-path PREFIX (or --train-data-path); "
                          "make PREFIX_text_document.bin/.idx with tools/preprocess_data.py")
    device = resolve_device(cfg)
    if cfg.training.deterministic:  # NCCL reads these when its communicators are created
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("NCCL_ALGO", "Ring")
    if device.type == "cpu":
        from megatron_lite.training.deepspeed_engine import skip_cpu_shm_comm_op

        skip_cpu_shm_comm_op()
    init_distributed(cfg, device)
    rank = dist.get_rank()
    from megatron_lite.training.run_lock import acquire_for_run

    # Before anything is written (checkpoints, run folder, metrics): one run per --save folder.
    acquire_for_run(lock, cfg.checkpoint.save, rank, device)
    if device.type == "cpu" and cfg.derived.precision != "fp32" and rank == 0:
        warnings.warn(f"{cfg.derived.precision} on CPU is ~30x slower than fp32 here")
    if rank == 0:
        print(format_plan(cfg), flush=True)
    set_seeds(cfg, device)
    model = build_model(cfg, device)
    if model_setup is not None:
        model_setup(model, cfg)
    optimizer = build_optimizer(model, cfg, device, clip_in_optimizer(cfg))
    engine = init_engine(model, optimizer, cfg)
    scheduler = LRScheduler.from_config(optimizer, cfg)
    state = TrainState()
    resumed = None
    if cfg.checkpoint.load:
        resumed = checkpointing.load_checkpoint(engine, cfg, state, scheduler)
        if resumed is not None and rank == 0:
            what = ("weights only (--finetune)" if cfg.checkpoint.finetune else
                    f"iteration {state.iteration}, consumed samples {state.consumed_samples}, "
                    f"skipped steps {state.skipped_steps}")
            print(f"[checkpoint] loaded {resumed}: {what}", flush=True)
    guard, noise = _spikes.setup_extras(cfg, optimizer, engine, state.extras,
                                         resumed is not None and not cfg.checkpoint.finetune,
                                         run_folder(cfg))
    if state.iteration >= cfg.derived.train_iters:
        # A requeued job restarting after its final save: nothing left to do (and no data to
        # build: the train split holds exactly train_iters global batches).
        if rank == 0:
            print(f"[megatron_lite] checkpoint is at step {state.iteration} >= --train-iters "
                  f"{cfg.derived.train_iters}: training already finished; raise --train-iters "
                  f"(or --train-tokens) to continue", flush=True)
        return state
    run_dir = run_folder(cfg)
    if rank == 0 and run_dir:
        _write_run_folder(run_dir, cfg)
    data_holder: dict = {}
    if data_iterators is not None:
        train_factory, valid_loader = data_iterators
        train_iter = train_factory(state.consumed_samples)
    else:
        train_loader, valid_loader = build_data(cfg, state.consumed_samples, state.data_state,
                                                data_holder)
        train_iter = _batches(train_loader, _worker_signals(cfg))
    logger = _make_logger(cfg, rank, device, resumed is not None and state.iteration or None)
    stop = _ExitSignal(cfg.training.exit_signal_handler)
    d, A = cfg.derived, cfg.derived.num_micro_batches
    from megatron_lite.config.batch_ramp import ramp_from_config

    ramp, gb = ramp_from_config(cfg), cfg.derived.global_batch_size   # batch-size ramp-up
    engine.train()
    if logger is not None:
        logger.start_interval()
    if getattr(cfg.eval, "eval_at_start", False) and state.iteration == 0:
        _maybe_eval(cfg, engine, valid_loader, state, logger, device)
        engine.train()
    try:
        while state.iteration < d.train_iters:
            timers = logger.timers if logger is not None else None
            if ramp is not None:  # this step's batch (samples) and A from consumed samples
                from megatron_lite.training.deepspeed_engine import set_step_batch

                gb = ramp.batch_at(state.consumed_samples)
                A = set_step_batch(engine, gb)
            scheduler.set_batch(gb)
            if timers:
                timers("data-wait").start()
            micro = [next(train_iter) for _ in range(A)]
            if timers:
                timers("data-wait").stop()
            _fault_test_hooks(state.iteration + 1, rank, micro)
            res = train_step(engine, optimizer, scheduler, micro, state,
                             cfg.training.max_skipped_steps, device, timers=timers,
                             spike_guard=guard, noise_scale=noise)
            state.consumed_samples += gb
            if logger is not None:
                logger.log_step(state.iteration, {
                    "lr": res.lr, "loss": res.loss if not res.skipped else float("nan"),
                    "grad_norm": res.grad_norm, "loss_scale": res.loss_scale,
                    "skipped_steps": state.skipped_steps,
                    "consumed_samples": state.consumed_samples,
                    "consumed_tokens": state.consumed_samples * cfg.model.seq_length,
                    "step_loss": res.loss, "step_skipped": int(res.skipped),
                    "global_batch_size": gb, "step_tokens": gb * cfg.model.seq_length,
                    **_spikes.step_scalars(guard, noise)})
            _spikes.handle_spike(cfg, res, state, engine, scheduler, guard, gb)  # capture/rollback
            _maybe_eval(cfg, engine, valid_loader, state, logger, device)
            last = state.iteration >= d.train_iters
            exit_now = bool(cfg.training.exit_interval) and \
                state.iteration % cfg.training.exit_interval == 0
            signalled = stop.any_rank(device)
            want_save = cfg.checkpoint.save and (
                (cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0)
                or exit_now or signalled or (last and cfg.checkpoint.save_on_exit))
            if want_save:
                train_ds = data_holder.get("train_ds")
                if train_ds is not None and hasattr(train_ds, "state_dict"):
                    state.data_state = train_ds.state_dict(state.consumed_samples)
                state.extras = _spikes.extras_state(guard, noise)
                ctx = logger.exclude_time() if logger is not None else _null()
                with ctx:
                    checkpointing.save_checkpoint(engine, cfg, state, scheduler,
                                                  cfg.checkpoint.save)
            if exit_now or signalled:
                if rank == 0:
                    print(f"[exit] {'signal received' if signalled else '--exit-interval'}: "
                          f"stopping after step {state.iteration}", flush=True)
                break
        if state.iteration >= d.train_iters:
            _test_eval(cfg, engine, data_holder.get("test_loader"), state, logger, device)
    finally:
        if logger is not None:
            logger.close()
    _dump_params_hook(engine, rank)
    return state


def _fault_test_hooks(step: int, rank: int, micro: list) -> None:
    """Test hooks of the fault-injection suite (tests/faults, docs/reliability.md), off unless set:

    * ``MEGATRON_LITE_LOG_SAMPLES=PATH``: append ``{"step", "rank", "sample_ids"}`` (this rank's
      global sample indices of the step, micro-batch order) to ``PATH.rank<R>`` before the step.
    * ``MEGATRON_LITE_INJECT_RAISE="step:rank,..."``: raise RuntimeError on that rank before that
      step (a crashing rank; the others must not hang in a collective).
    """
    log = os.environ.get("MEGATRON_LITE_LOG_SAMPLES")
    if log:
        import json

        ids = [int(i) for b in micro for i in b["sample_ids"].reshape(-1).tolist()]
        with open(f"{log}.rank{rank}", "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "sample_ids": ids}) + "\n")
    for item in filter(None, os.environ.get("MEGATRON_LITE_INJECT_RAISE", "").split(",")):
        s, r = item.split(":")
        if int(s) == step and int(r) == rank:
            raise RuntimeError(f"MEGATRON_LITE_INJECT_RAISE: injected failure on rank {rank} "
                               f"before step {step}")


def _dump_params_hook(engine, rank: int) -> None:
    """Test hook ``MEGATRON_LITE_DUMP_PARAMS=DIR``: each rank saves its module's parameters at
    the end of training to ``DIR/rank_<R>.pt`` (cross-rank divergence checks; ZeRO <= 2, where
    every DP rank holds the full TP shard)."""
    out = os.environ.get("MEGATRON_LITE_DUMP_PARAMS")
    if out:
        os.makedirs(out, exist_ok=True)
        sd = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        torch.save(sd, os.path.join(out, f"rank_{rank}.pt"))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _maybe_eval(cfg, engine, valid_loader, state, logger, device) -> None:
    ev = cfg.eval
    interval = getattr(ev, "eval_interval", 0)
    if not interval or valid_loader is None:
        return
    if state.iteration % interval and state.iteration != cfg.derived.train_iters:
        return
    from megatron_lite.training.evaluation import evaluate

    ctx = logger.exclude_time() if logger is not None else _null()
    with ctx:
        res = evaluate(engine.module, iter(valid_loader), ev.eval_iters, device=device)
        engine.module.train()
    if logger is not None:
        logger.log_eval(state.iteration, res["val_loss"], tokens=res.get("tokens"))
    elif dist.get_rank() == 0:
        print(f"[eval] step {state.iteration}: val_loss {res['val_loss']:.4f} "
              f"val_ppl {res['val_ppl']:.3f}", flush=True)


def _test_eval(cfg, engine, test_loader, state, logger, device) -> None:
    """Evaluate the test split once after the last step (Megatron's ``do_test``): ``--eval-iters``
    micro-batches per DP rank; logged as ``test_loss``/``test_ppl`` (console, TensorBoard
    ``test/``, metrics.jsonl record of type ``test``). Nothing when the test split is empty."""
    if test_loader is None:
        return
    from megatron_lite.training.evaluation import evaluate

    ctx = logger.exclude_time() if logger is not None else _null()
    with ctx:
        res = evaluate(engine.module, iter(test_loader), cfg.eval.eval_iters, device=device)
        engine.module.train()
    if logger is not None:
        logger.log_eval(state.iteration, res, split="test")
    elif dist.get_rank() == 0:
        print(f"[test] after step {state.iteration}: test_loss {res['val_loss']:.4f} "
              f"test_ppl {res['val_ppl']:.3f}", flush=True)


def _make_logger(cfg, rank, device, resume_step):
    try:
        from megatron_lite.model.counting import flops_per_token
        from megatron_lite.training.metrics import TrainingLogger
    except ImportError:
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.derived.precision,
                                                                 torch.float32)
    return TrainingLogger(cfg.logging, rank, cfg.derived.world_size,
                          flops_per_token(cfg.model, cfg.model.seq_length),
                          cfg.derived.global_batch_tokens, device, dtype=dtype,
                          train_iters=cfg.derived.train_iters, run_dir=cfg.checkpoint.save,
                          resume_step=resume_step)
