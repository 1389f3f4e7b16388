"""Everything the Trainer needs before its first step: device, process groups, seeds, model,
optimizer, DeepSpeed engine, LR schedule (:func:`build_components`), the data loaders
(:func:`build_data`), the logger and the run folder.

Launch with torchrun (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` from the environment) or as a single
process (a one-rank group is created). The backend follows the device: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import warnings
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import format_plan
from megatron_lite.data import build_data_loader, build_train_valid_test_datasets
from megatron_lite.data.builder import build_corpus_datasets, iter_loader
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.model.counting import flops_per_token
from megatron_lite.model.compile import compile_transformer_blocks, use_fused_kernels
from megatron_lite.model.llama import LlamaModel
from megatron_lite.parallel import (destroy_model_parallel, get_data_parallel_group,
                                    get_data_parallel_rank, get_data_parallel_world_size,
                                    initialize_model_parallel, model_parallel_is_initialized,
                                    model_parallel_manual_seed)
from megatron_lite.parallel.peers import record_peers
from megatron_lite.training.callbacks.signals import worker_signals
from megatron_lite.training.callbacks.spike_guard import rollback_headroom_samples
from megatron_lite.training.deepspeed_engine import (build_ds_config, clip_in_optimizer,
                                                     init_engine, skip_cpu_shm_comm_op)
from megatron_lite.training.metrics import TrainingLogger
from megatron_lite.training.optimizer import build_optimizer
from megatron_lite.training.run_info import write_run_info
from megatron_lite.training.run_lock import RunLock, acquire_for_run
from megatron_lite.training.schedules import LRScheduler
from megatron_lite.utils import atomic_write_text, get_rank


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
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python pretrain_llama.py`: a one-process job
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=cfg.parallel.distributed_timeout_minutes))
        record_peers()   # host and address of every rank, to name a lost peer in one line
    if dist.get_world_size() != cfg.derived.world_size:
        raise RuntimeError(f"config was finalized for world size {cfg.derived.world_size} but the "
                           f"job has {dist.get_world_size()} processes")
    if model_parallel_is_initialized():  # pretrain() called again in the same process
        destroy_model_parallel()
    initialize_model_parallel(cfg.parallel.tensor_model_parallel_size,
                              context_parallel_size=cfg.parallel.context_parallel_size)


def _deterministic_env() -> None:
    # NCCL and cuBLAS read these when their communicators / handles are created.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NCCL_ALGO", "Ring")


def set_seeds(cfg, device: torch.device) -> None:
    """Seed python/numpy/torch and the TP RNG tracker; enable deterministic mode if asked."""
    seed = cfg.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)
    if cfg.training.deterministic:
        _deterministic_env()
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_model(cfg, device: torch.device):
    """This rank's LlamaModel; at ZeRO-3 built under ``deepspeed.zero.Init`` so each layer's
    parameters are partitioned over the DP group right after that layer is initialised (a 13B
    model never exists whole on one device). Values equal the unpartitioned build: the layers draw
    their weights inside their own ``__init__`` (megatron_lite/layers/init.py)."""
    if cfg.parallel.zero_stage != 3:
        return LlamaModel(cfg.model, device=device)
    import deepspeed  # why: heavy, needed only at ZeRO-3 here

    ds = build_ds_config(cfg)
    # Without an mpu DeepSpeedConfig would check train_batch_size against the whole world; give it
    # only what zero.Init reads (ZeRO/offload settings, parameter dtype).
    init_cfg = {k: ds[k] for k in ("zero_optimization", "bf16", "fp16") if k in ds}
    init_cfg["train_micro_batch_size_per_gpu"] = ds["train_micro_batch_size_per_gpu"]
    # ZeRO partitions over D x CP (the ranks holding the same parameters), as the engine does.
    with deepspeed.zero.Init(data_parallel_group=get_data_parallel_group(with_context_parallel=True),
                             config_dict_or_path=init_cfg):
        return LlamaModel(cfg.model, device=device)


@dataclasses.dataclass
class Components:
    """What :func:`build_components` makes, once per run."""

    device: torch.device
    rank: int
    model: Any
    optimizer: Any
    engine: Any
    scheduler: LRScheduler


def build_components(cfg, lock: RunLock,
                     model_setup: Optional[Callable[[Any, Any], None]] = None) -> Components:
    """Device, process groups, the ``--save`` run lock, seeds, model, optimizer, engine, schedule.

    Collective. ``model_setup(model, cfg)`` runs after the model is built (ZeRO-3: partitioned)
    and before the optimizer exists (see :func:`megatron_lite.training.loop.pretrain`).

    Raises:
        RunLockedError: another live run holds ``--save``'s lock (before anything is written).
    """
    device = resolve_device(cfg)
    if cfg.training.deterministic:
        _deterministic_env()
    if device.type == "cpu":
        skip_cpu_shm_comm_op()
    init_distributed(cfg, device)
    rank = dist.get_rank()
    # Before anything is written (checkpoints, run folder, metrics): one run per --save folder.
    acquire_for_run(lock, cfg.checkpoint.save, rank, device)
    if device.type == "cpu" and cfg.derived.precision != "fp32" and rank == 0:
        warnings.warn(f"{cfg.derived.precision} on CPU is ~30x slower than fp32 here")
    if rank == 0:
        print(format_plan(cfg), flush=True)
    set_seeds(cfg, device)
    model = build_model(cfg, device)
    # --fused-kernels and --compile change how the blocks run, not their parameters (names, values
    # and the checkpoint layout stay those of the eager model).
    use_fused_kernels(model, cfg.training.fused_kernels, device.type)
    if cfg.training.compile:
        compile_transformer_blocks(model, cfg.training.compile_backend,
                                   packed_documents=cfg.data.reset_attention_mask)
    if model_setup is not None:
        model_setup(model, cfg)
    optimizer = build_optimizer(model, cfg, device, clip_in_optimizer(cfg))
    engine = init_engine(model, optimizer, cfg)
    scheduler = LRScheduler.from_config(optimizer, cfg)
    return Components(device, rank, model, optimizer, engine, scheduler)


@dataclasses.dataclass
class DataLoaders:
    """This DP rank's loaders (None where the split is empty) and the train dataset (its
    ``state_dict`` is saved with checkpoints)."""

    train: Any = None
    valid: Any = None
    test: Any = None
    train_ds: Any = None
    valid_corpora: list = dataclasses.field(default_factory=list)  # [(name, loader)]: a blend's corpora
    test_corpora: list = dataclasses.field(default_factory=list)   # the same for the test split


def _split_samples(cfg) -> tuple[int, int, int]:
    """Samples of the train, validation and test splits."""
    d, ev, mbs = cfg.derived, cfg.eval, cfg.training.micro_batch_size
    # Every evaluation reads the same first eval_iters micro-batches of the validation split, so
    # successive validation losses are comparable.
    valid = ev.eval_iters * mbs * d.data_parallel_size if ev.eval_interval else 0
    # The test split is evaluated once, at the end of training, on eval_iters micro-batches
    # (Megatron's do_test: whenever a test split exists).
    test = ev.eval_iters * mbs * d.data_parallel_size
    return d.train_tokens // cfg.model.seq_length + rollback_headroom_samples(cfg), valid, test


def build_data(cfg, consumed_samples: int, data_state: dict | None = None) -> DataLoaders:
    """Train/valid/test loaders (this DP rank) from the data section.

    The test split's loader (``--test-data-path`` or the third ``--split`` part; None when that
    split is empty) is read once at the end of training. Every loader draws from its own seeded
    ``torch.Generator`` (never the global RNG, so dropout streams are the same fresh or resumed)
    and refuses token ids ``>= --vocab-size`` (one max per micro-batch in collate).
    """
    dc = cfg.data
    eod = build_tokenizer(dc.tokenizer_type or "SentencePieceTokenizer",
                          dc.tokenizer_model).eod if dc.tokenizer_model else None
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        dc, cfg.model.seq_length, _split_samples(cfg), cfg.training.seed, eod)
    if data_state and train_ds is not None and hasattr(train_ds, "load_state_dict"):
        # Per-source consumed counts from the checkpoint: with a changed stage schedule or
        # weights, positions from here on are re-derived so no source repeats or skips samples.
        train_ds.load_state_dict(data_state)
    if train_ds is not None and hasattr(train_ds, "plan_lines") and get_rank() == 0:
        print("\n".join(train_ds.plan_lines()), flush=True)   # tokens, epochs, share per corpus
    dp_rank, dp = get_data_parallel_rank(), get_data_parallel_world_size()
    mbs, seed, vocab = cfg.training.micro_batch_size, cfg.training.seed, cfg.model.vocab_size
    train = build_data_loader(train_ds, consumed_samples, mbs, dp_rank, dp, num_workers=dc.num_workers,
                              seed=seed, vocab_size=vocab, worker_signals=worker_signals(cfg)
                              ) if train_ds is not None else None
    valid = build_data_loader(valid_ds, 0, mbs, dp_rank, dp, num_workers=0, random_order=False,
                              seed=seed + 1, vocab_size=vocab) if valid_ds is not None else None
    test = build_data_loader(test_ds, 0, mbs, dp_rank, dp, num_workers=0, seed=seed + 2,
                             vocab_size=vocab) if test_ds is not None else None
    # A blended validation (test) split is also evaluated corpus by corpus, each on its own part.
    corpora = {}
    for k, (split, loader) in enumerate((("valid", valid), ("test", test)), 1):
        datasets = build_corpus_datasets(dc, cfg.model.seq_length, _split_samples(cfg)[k], seed, eod,
                                         split) if loader is not None else []
        corpora[split] = [(name, build_data_loader(ds, 0, mbs, dp_rank, dp, num_workers=0, seed=seed + k,
                                                   vocab_size=vocab)) for name, ds in datasets]
    return DataLoaders(train, valid, test, train_ds, corpora["valid"], corpora["test"])


def train_batches(loader, signals=()) -> Iterator[dict]:
    """The train loader's micro-batches (its workers start with ``signals`` blocked)."""
    yield from iter_loader(loader, signals)


def run_folder(cfg) -> str | None:
    """Where the resolved config and environment go: --save, else the metrics file's or the
    TensorBoard folder (None when none is set)."""
    mf = cfg.logging.metrics_file
    return cfg.checkpoint.save or (os.path.dirname(os.path.abspath(mf)) if mf else None) or \
        cfg.logging.tensorboard_dir


def write_run_folder(run_dir: str, cfg) -> None:
    """config.yaml + run_info.json (versions, git, environment) and the DeepSpeed config used."""
    os.makedirs(run_dir, exist_ok=True)
    write_run_info(run_dir, cfg.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = json.dumps(build_ds_config(cfg), indent=1)
    atomic_write_text(os.path.join(run_dir, "deepspeed_config.json"), text, fsync=False)


def make_logger(cfg, rank: int, device: torch.device, resume_step: int | None) -> TrainingLogger:
    """The run's :class:`TrainingLogger` (console line, TensorBoard, metrics.jsonl on rank 0)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.derived.precision,
                                                                 torch.float32)
    return TrainingLogger(cfg.logging, rank, cfg.derived.world_size,
                          flops_per_token(cfg.model, cfg.model.seq_length),
                          cfg.derived.global_batch_tokens, device, dtype=dtype,
                          train_iters=cfg.derived.train_iters, run_dir=cfg.checkpoint.save,
                          resume_step=resume_step)


__all__ = ["Components", "DataLoaders", "build_components", "build_data", "build_model",
           "init_distributed", "make_logger", "resolve_device", "run_folder", "set_seeds",
           "train_batches", "write_run_folder"]
