"""Build the train/valid/test datasets and the data loader from a :class:`DataConfig`."""

from __future__ import annotations

import functools
import os
import signal
import threading
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_lite.data.blended import (BlendedDataset, load_stage_bounds, load_stages, normalize_weights,
                                        stage_starts, temperature_weights)
from megatron_lite.data.collate import collate_samples
from megatron_lite.data.data_config import (DataConfig, corpus_names, parse_data_path, split_weights,
                                            train_corpus_names)
from megatron_lite.data.mixing import parse_share_bounds
from megatron_lite.errors import ConfigError
from megatron_lite.data.gpt_dataset import GPTDataset, split_document_ranges
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.sampler import MegatronPretrainingRandomSampler, MegatronPretrainingSampler

SPLITS = ("train", "valid", "test")


def _rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _split_sources(cfg: DataConfig) -> List[Tuple[List[str], Optional[List[float]], Optional[int]]]:
    """Per split: (prefixes, weights, split slot) — slot None means the whole corpus."""
    out = []
    explicit = (cfg.train_data_path, cfg.valid_data_path, cfg.test_data_path)
    for k, path in enumerate(explicit):
        if path:
            out.append(parse_data_path(path) + (None,))
        elif cfg.data_path:
            out.append(parse_data_path(cfg.data_path) + (k,))
        else:
            out.append(([], None, None))
    return out


class _SourceFactory:
    """``factory(j, n)`` -> the GPTDataset of source ``j`` holding >= ``n`` samples (picklable for
    DataLoader workers started with "spawn")."""

    def __init__(self, cfg, split, indexed, ranges, seq_length, seed, eod_id):
        self.cfg, self.split, self.indexed, self.ranges = cfg, split, indexed, ranges
        self.seq_length, self.seed, self.eod_id = seq_length, seed, eod_id

    def __call__(self, j: int, n: int) -> GPTDataset:
        cfg = self.cfg
        return GPTDataset(self.indexed[j], self.ranges[j], self.seq_length, n, self.seed, self.eod_id,
                          shuffle=not cfg.no_shuffle, reset_position_ids=cfg.reset_position_ids,
                          reset_attention_mask=cfg.reset_attention_mask, eod_mask_loss=cfg.eod_mask_loss,
                          cache_dir=cfg.data_cache_path, name=self.split, packing=cfg.packing,
                          packing_window=cfg.packing_window, packing_fill=cfg.packing_fill)


def build_split_dataset(cfg: DataConfig, split: str, prefixes: Sequence[str], weights: Optional[Sequence[float]],
                        slot: Optional[int], seq_length: int, num_samples: int, seed: int,
                        eod_id: Optional[int], use_stages: bool = False, _cache: Optional[dict] = None):
    """One split's dataset: a :class:`GPTDataset` for one source, else a :class:`BlendedDataset`.

    Raises:
        ValueError: no source of the split holds a full sample, or weights given together with a
            non-default ``--data-temperature``.
    """
    cache = {} if _cache is None else _cache
    for p in prefixes:
        if p not in cache:
            cache[p] = IndexedDataset(p, cfg.mmap_bin_files)
    indexed = [cache[p] for p in prefixes]
    fractions = split_weights(cfg.split)
    ranges = [split_document_ranges(len(ix), fractions)[slot] if slot is not None else (0, len(ix))
              for ix in indexed]

    make = _SourceFactory(cfg, split, indexed, ranges, seq_length, seed, eod_id)
    stages_on = use_stages and cfg.data_stages
    mixing_on = use_stages and mixing_controls_on(cfg)
    if len(prefixes) == 1 and not (stages_on or mixing_on):
        return make(0, num_samples)
    tokens = np.array([int(ix.sizes[a:b].astype(np.int64).sum()) for ix, (a, b) in zip(indexed, ranges)])
    if stages_on:
        stages = load_stages(cfg.data_stages, prefixes)
    elif weights is not None:
        if cfg.data_temperature != 1.0:
            raise ValueError("--data-path gives explicit weights and --data-temperature is set: use one")
        stages = [(0, normalize_weights(weights))]
    else:
        stages = [(0, temperature_weights(tokens, cfg.data_temperature))]
    usable = tokens >= seq_length + 1  # a source whose split has no full sample cannot be drawn from
    if not usable.all():
        if not usable.any():
            raise ValueError(f"split '{split}': no source in {list(prefixes)} holds seq_length + 1 = "
                             f"{seq_length + 1} tokens (tokens per source: {tokens.tolist()})")
        stages = [(u, normalize_weights(np.where(usable, w, 0.0))) for u, w in stages]
    if not mixing_on:
        return BlendedDataset(None, stages, num_samples, seq_length, factory=make, names=list(prefixes))
    labels = train_corpus_names(cfg)
    bounds = stage_bounds(cfg, labels, len(stages))
    caps = epoch_caps(make, len(prefixes), cfg.data_max_epochs) if cfg.data_max_epochs else None
    check_caps_feasible(cfg, labels, caps, bounds, num_samples, seq_length)
    return BlendedDataset(None, stages, num_samples, seq_length, factory=make, names=list(prefixes),
                          caps=caps, bounds=bounds, online=cfg.mixing_update == "online", labels=labels)


def mixing_controls_on(cfg: DataConfig) -> bool:
    """Any of --data-max-epochs, --data-share-bounds (or stage bounds), --mixing-update online."""
    return bool(cfg.data_max_epochs or cfg.data_share_bounds or cfg.mixing_update == "online" or
                (cfg.data_stages and any(b is not None for b in _stage_bounds_raw(cfg))))


def _stage_bounds_raw(cfg: DataConfig) -> list:
    return load_stage_bounds(cfg.data_stages, train_corpus_names(cfg)) if cfg.data_stages else []


def stage_bounds(cfg: DataConfig, labels: Sequence[str], num_stages: int):
    """Per-stage ``(lo, hi)``: a stage's own ``bounds`` key, else ``--data-share-bounds``; None
    when no stage is bounded.

    Raises:
        ValueError: naming the flag or the stage file (see :func:`parse_share_bounds`).
    """
    flag_bounds = parse_share_bounds(cfg.data_share_bounds, labels)
    per_stage = _stage_bounds_raw(cfg) or [None] * num_stages
    out = [b if b is not None else flag_bounds for b in per_stage]
    return None if all(b is None for b in out) else out


def epoch_caps(make, num_sources: int, epochs: int) -> np.ndarray:
    """Samples in the first ``epochs`` epochs of each source (``--data-max-epochs``): ``epochs x
    samples_per_epoch`` for concat packing; the sum of the first epochs' sample counts for
    best-fit/none packing, whose epochs differ in length (built epoch by epoch)."""
    caps = []
    for j in range(num_sources):
        ds = make(j, 1)
        if getattr(ds, "packing", "concat") == "concat":
            caps.append(int(epochs) * int(ds.samples_per_epoch))
            continue
        while len(ds.epoch_samples) < epochs:
            ds = make(j, len(ds) + 1)
        caps.append(int(sum(ds.epoch_samples[:epochs])))
    return np.asarray(caps, np.int64)


def check_caps_feasible(cfg: DataConfig, labels: Sequence[str], caps: Optional[np.ndarray], bounds,
                        num_samples: int, seq_length: int) -> None:
    """The run can be filled under the caps and bounds.

    Raises:
        ConfigError: a corpus' lower bound needs more samples than ``--data-max-epochs`` gives it,
            or the corpora's capped samples (also capped by their upper bounds) cannot fill the run.
    """
    if caps is None:
        return
    n = len(caps)
    bounds = bounds or [None]
    starts = stage_starts(load_stages(cfg.data_stages, parse_data_path(cfg.train_data_path or cfg.data_path)[0]),
                          seq_length) if cfg.data_stages else [0]
    ends = [min(s, num_samples) for s in starts[1:]] + [num_samples]
    for b, a, e in zip(bounds, starts, ends):
        lo = np.zeros(n) if b is None else b[0]
        for j, name in enumerate(labels):
            if lo[j] * (e - a) > caps[j]:
                raise ConfigError(f"--data-share-bounds {name}: lower bound {lo[j]:g} needs "
                                  f"{int(np.ceil(lo[j] * (e - a)))} of {e - a} samples but "
                                  f"--data-max-epochs {cfg.data_max_epochs} gives it {int(caps[j])}")
    hi = np.max([np.ones(n) if b is None else b[1] for b in bounds], axis=0)
    room = int(np.minimum(caps, np.ceil(hi * num_samples)).sum())
    if room < num_samples:
        raise ConfigError(f"--data-max-epochs {cfg.data_max_epochs}: the corpora give {room} samples "
                          f"within their caps and upper bounds, the run reads {num_samples}; raise "
                          "--data-max-epochs or loosen --data-share-bounds")


def _split_tokens(cfg: DataConfig, prefixes: Sequence[str], slot: Optional[int], cache: dict) -> int:
    """Tokens in one split summed over its sources (reads only the .idx sizes)."""
    fractions = split_weights(cfg.split)
    total = 0
    for p in prefixes:
        if p not in cache:
            cache[p] = IndexedDataset(p, cfg.mmap_bin_files)
        ix = cache[p]
        a, b = split_document_ranges(len(ix), fractions)[slot] if slot is not None else (0, len(ix))
        total += int(ix.sizes[a:b].astype(np.int64).sum())
    return total


def build_train_valid_test_datasets(data_config: DataConfig, seq_length: int, num_samples: Sequence[int],
                                    seed: int, eod_id: Optional[int]):
    """Datasets for the three splits (None where no samples are wanted or no data is given).

    Args:
        data_config: paths, split, packing flags.
        seq_length: tokens per sample (``ModelConfig.seq_length``).
        num_samples: ``(train, valid, test)`` samples wanted; datasets hold at least that many.
        seed: shuffling seed.
        eod_id: the tokenizer's end-of-document id.

    Returns:
        ``(train, valid, test)``; the stage schedule (``--data-stages``) applies to train only,
        valid/test use the ``--data-path`` weights (or temperature). A valid or test split with
        fewer than ``seq_length + 1`` tokens (e.g. ``--split 100,0,0`` with evaluation on) is None,
        with one warning (none for a test split that ``--split`` gives no share).
    """
    cache: dict = {}
    out = []
    for k, (prefixes, weights, slot) in enumerate(_split_sources(data_config)):
        n = int(num_samples[k])
        if n <= 0 or not prefixes:
            out.append(None)
            continue
        if k == 2 and slot is not None and split_weights(data_config.split)[2] == 0:
            out.append(None)  # no test part in --split: nothing asked for, nothing to say
            continue
        if k > 0:
            # Megatron skips evaluation on a split that --split leaves empty (e.g. '100,0,0')
            # instead of failing; a split without one full sample is as good as empty.
            tokens = _split_tokens(data_config, prefixes, slot, cache)
            if tokens < seq_length + 1:
                if _rank() == 0:  # every rank reaches this; one line is enough
                    warnings.warn(f"{SPLITS[k]} split is empty or shorter than one sample "
                                  f"({tokens} tokens < seq_length + 1 = {seq_length + 1}; --split "
                                  f"{data_config.split!r}, --data-path/--{SPLITS[k]}-data-path): "
                                  f"{'validation' if k == 1 else 'test'} evaluation is skipped",
                                  stacklevel=2)
                out.append(None)
                continue
        out.append(build_split_dataset(data_config, SPLITS[k], prefixes, weights, slot, seq_length, n, seed,
                                       eod_id, use_stages=(k == 0), _cache=cache))
    return tuple(out)


def build_corpus_datasets(data_config: DataConfig, seq_length: int, num_samples: int, seed: int,
                          eod_id: Optional[int], split: str = "valid") -> List[Tuple[str, GPTDataset]]:
    """One dataset per corpus of a blended split, for per-corpus evaluation.

    Each is the corpus' own part of ``split`` (its ``--split`` document range, or the whole
    ``--valid-data-path``/``--test-data-path`` prefix) as the single-corpus :class:`GPTDataset`
    that ``--data-path PREFIX`` alone would give, holding ``num_samples`` samples: evaluating
    it on ``--eval-iters`` micro-batches is evaluating that prefix alone.

    Args:
        data_config: paths, split, packing flags, ``data_names`` (labels).
        seq_length, num_samples, seed, eod_id: as :func:`build_train_valid_test_datasets`.
        split: ``"valid"`` or ``"test"`` (``--data-names`` labels the validation prefixes, and a
            test split of the same prefixes).

    Returns:
        ``[(name, dataset), ...]`` in prefix order (names from
        :func:`~megatron_lite.data.data_config.corpus_names`); empty when the split has fewer than
        two corpora (the blend's value is then the corpus' value) or ``num_samples <= 0``. A corpus
        whose part holds fewer than ``seq_length + 1`` tokens is left out, with one warning.
    """
    k = SPLITS.index(split)
    prefixes, _, slot = _split_sources(data_config)[k]
    if len(prefixes) < 2 or num_samples <= 0:
        return []
    valid_prefixes = _split_sources(data_config)[1][0]
    # --data-names labels the validation prefixes; a test split of the same prefixes shares them.
    names = corpus_names(prefixes, data_config.data_names if prefixes == valid_prefixes else None)
    cache: dict = {}
    out = []
    for name, prefix in zip(names, prefixes):
        tokens = _split_tokens(data_config, [prefix], slot, cache)
        if tokens < seq_length + 1:
            if _rank() == 0:
                warnings.warn(f"{split} part of {prefix} holds {tokens} tokens < seq_length + 1 = "
                              f"{seq_length + 1}: no per-corpus {split} loss for '{name}'", stacklevel=2)
            continue
        out.append((name, build_split_dataset(data_config, split, [prefix], None, slot, seq_length,
                                              num_samples, seed, eod_id, _cache=cache)))
    return out


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                      num_workers: int = 0, random_order: bool = False, seed: int = 1234,
                      vocab_size: Optional[int] = None, worker_signals: Sequence[int] = (),
                      worker_init_fn=None):
    """A DataLoader yielding docs/interfaces.md batches of this DP rank's micro-batches.

    Args:
        dataset: from :func:`build_train_valid_test_datasets`.
        consumed_samples: global samples already consumed (resume point).
        micro_batch_size: samples per rank per micro-batch.
        dp_rank, dp_size: data-parallel rank and size.
        num_workers: DataLoader worker processes.
        random_order: use :class:`MegatronPretrainingRandomSampler` (endless, reshuffled per pass).
        seed: seed of the random order, and of the loader's own ``torch.Generator``: the
            DataLoader draws its worker base seed from that generator at every ``iter()``, never
            from the global torch RNG, so iterating (fresh or resumed) leaves the model's dropout
            stream untouched and a resumed run's losses equal the uninterrupted run's bitwise.
        vocab_size: when given, every micro-batch is checked in ``collate`` for a token id
            ``>= vocab_size`` (one max per batch; see :func:`collate_samples`).
        worker_signals: signals the workers must survive because this process handles them
            (the training loop's preemption signals): see :class:`PreemptionSafeWorkerInit`.
            Empty: torch's default (a worker dies of a SIGTERM it did not get from its rank).
        worker_init_fn: the DataLoader's ``worker_init_fn``, run after the signal setup.
    """
    if num_workers > 0 and (worker_signals or worker_init_fn is not None):
        worker_init_fn = PreemptionSafeWorkerInit(worker_signals, worker_init_fn)
    if random_order:
        sampler = MegatronPretrainingRandomSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                                   dp_size, seed=seed)
    else:
        sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    if getattr(dataset, "online", False):
        sampler = ResolvedBatches(sampler, dataset)
    collate = collate_samples if vocab_size is None else \
        functools.partial(collate_samples, vocab_size=int(vocab_size))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0,
                                       prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
                                       worker_init_fn=worker_init_fn,
                                       generator=torch.Generator().manual_seed(int(seed)))


#: Batches a DataLoader with workers keeps requested ahead per worker (torch's default).
PREFETCH_FACTOR = 2


def loader_lookahead_samples(num_workers: int, micro_batch_size: int, dp_size: int) -> int:
    """Global positions a train loader may have handed to its workers beyond the samples consumed
    at a step boundary: ``PREFETCH_FACTOR x num_workers`` micro-batches per DP rank, each
    ``micro_batch_size x dp_size`` global positions (0 without workers: indices are drawn on
    demand). An online weight change takes effect this many positions after the step's consumed
    samples, so no prefetched sample was drawn under other weights than the recorded ones."""
    return PREFETCH_FACTOR * int(num_workers) * int(micro_batch_size) * int(dp_size)


class ResolvedBatches:
    """Batch sampler of an online-mixed :class:`BlendedDataset`: turns each batch of positions into
    ``(position, source, source sample)`` keys in the main process, where the blend's index is
    current (the DataLoader's workers hold copies made when they started)."""

    def __init__(self, sampler, dataset):
        self.sampler, self.dataset = sampler, dataset

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield self.dataset.resolve(batch)


class PreemptionSafeWorkerInit:
    """``worker_init_fn`` that makes a DataLoader worker survive the preemption signals its rank
    handles, then calls the caller's own ``worker_init_fn`` (if any).

    Why: torchrun signals each rank's whole process group (``os.killpg``) and SLURM signals every
    process of the job step, so SIGTERM/SIGUSR1 reach the workers too. torch's worker dies of a
    SIGTERM that its parent did not send (``handler_SIGTERM`` in torch/csrc/DataLoader.cpp), and
    the rank's SIGCHLD handler then raises ``DataLoader worker (pid N) is killed by signal`` in the
    middle of a step, before the rank's own handler could save at the step boundary.

    How: the worker blocks ``signals`` and a daemon thread takes them with ``sigwaitinfo``, which
    tells who sent each one. A SIGTERM from the rank (``multiprocessing``'s ``terminate()``: the
    DataLoader's shutdown fallback and the interpreter-exit cleanup of daemon children) still ends
    the worker at once with status 0, as torch's handler does; every other one is dropped (the rank
    got its own copy and stops the loader at the step boundary). Plain SIG_IGN would also ignore
    the rank's ``terminate()``, and a rank exiting with a live loader would then wait forever in
    ``multiprocessing``'s exit-time ``join()``. Unchanged: SIGINT (Ctrl-C) and SIGKILL; a worker
    whose rank died (any way) exits through torch's watchdog within ``MP_STATUS_CHECK_INTERVAL``
    (5 s).

    Args:
        signals: signal numbers to survive (e.g. ``(SIGTERM, SIGUSR1)``).
        user_fn: optional ``fn(worker_id)`` run afterwards.
    """

    def __init__(self, signals: Sequence[int], user_fn=None):
        self.signals = tuple(int(s) for s in signals)
        self.user_fn = user_fn
        self.rank_pid = os.getpid()   # the process building the loader forks (or spawns) the workers

    def __call__(self, worker_id: int) -> None:
        if self.signals:
            sigs = set(self.signals)
            ppid = os.getppid()
            if ppid != self.rank_pid and not _pid_alive(self.rank_pid):
                # The rank died while this worker was starting. torch's watchdog, created after
                # this function returns, would take the new parent (init) for the rank and keep
                # the worker alive forever (seen under load when a rank is SIGKILLed early).
                os._exit(0)
            # Blocked in this (the worker's only) thread before any other starts: threads created
            # later (the queue feeder, OpenMP) inherit the mask, so only the waiter takes them.
            signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
            parents = {self.rank_pid, ppid}
            watch = self.rank_pid if ppid == self.rank_pid else None
            threading.Thread(target=_take_signals, args=(sigs, parents, watch), daemon=True,
                             name="preemption-signals").start()
        if self.user_fn is not None:
            self.user_fn(worker_id)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_signals(sigs: set, parents: set, watch: int | None) -> None:
    """The worker's signal waiter; also ends the worker when its rank ``watch`` is gone (the same
    5 s rule as torch's watchdog, which cannot see a rank that died before it was created)."""
    while True:
        info = signal.sigtimedwait(sigs, 5.0)
        if info is None:
            if watch is not None and os.getppid() != watch:
                os._exit(0)
            continue
        if info.si_signo == signal.SIGTERM and info.si_pid in parents:
            os._exit(0)   # the rank stops its worker: torch's rule (exit status 0, no cleanup)


def iter_loader(loader, signals: Sequence[int] = ()):
    """``iter(loader)`` with ``signals`` blocked in the calling thread while the loader starts
    its workers: a worker inherits the mask at fork, so a signal arriving before its
    :class:`PreemptionSafeWorkerInit` runs stays pending instead of killing it. This process's own
    handler still gets such a signal (through another thread, or right after the unblock).

    Args:
        loader: a DataLoader from :func:`build_data_loader`.
        signals: the loader's ``worker_signals``.

    Returns:
        The loader's iterator.
    """
    if not signals or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
