"""Checkpoints: atomic save, resume that reproduces the uninterrupted run, inference loading.

Layout of ``--save DIR``::

    DIR/latest                      "iter_0000100" (written last, atomically)
    DIR/iter_0000100/
        mp_rank_XX_model_states.pt  DeepSpeed: TP shard XX of the model (+ optimizer at ZeRO-0)
        *zero_pp_rank_*optim_states.pt  DeepSpeed: ZeRO optimizer partitions (stage >= 1)
        model_tp_XX.pt              ZeRO-3 only: the gathered TP shard XX (for inference/tools)
        rng/rank_NNNNN.pt           python/numpy/torch/cuda/TP-tracker RNG states of each rank
        trainer_state.json          iteration, consumed samples, skipped counters, LR schedule
        run_config.json             the resolved RunConfig (to_dict), versions
        manifest.json               every file above with its size and checksum; written last

Atomicity: everything is written into ``DIR/.tmp_iter_0000100``; after a barrier rank 0 writes the
manifest, renames the folder to ``iter_0000100`` and only then replaces ``latest``. A kill at any
moment leaves the previous complete checkpoint: ``--load`` only accepts a folder whose manifest
exists and whose files all exist with the recorded sizes and checksums, falling back to the newest
valid one (:mod:`megatron_lite.checkpoint.verify`). With ``--async-save`` the files are written by
a background thread from a host copy (:mod:`megatron_lite.checkpoint.async_save`) and the same
commit (manifest, rename, ``latest``) happens at a later step boundary (:func:`start_save`,
:func:`commit_save`).
Folder names, the manifest, completeness and pruning live in
:mod:`megatron_lite.checkpoint.layout`; the model/frozen-set checks in
:mod:`megatron_lite.checkpoint.compat`; module weights (ZeRO-3 gather, weights-only loads,
inference loading) in :mod:`megatron_lite.checkpoint.weights`; resuming at another
data-parallel size in :mod:`megatron_lite.checkpoint.zero_reshard`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.checkpoint import zero_reshard
from megatron_lite.checkpoint.async_save import BackgroundWrite, stage, staged_bytes
from megatron_lite.checkpoint.compat import check_compatible, check_same_frozen_set
from megatron_lite.checkpoint.layout import (check_coverage, find_checkpoint, library_versions,
                                             list_files, prune, read_saved_config, tag_for,
                                             write_manifest)
from megatron_lite.checkpoint.verify import ALGORITHM as CHECKSUM_ALGORITHM
from megatron_lite.checkpoint.verify import choose_checkpoint, file_checksum
from megatron_lite.checkpoint.weights import load_into, module_state, zero3_gathered_state_dict
from megatron_lite.errors import CheckpointSaveError
from megatron_lite.parallel import (get_data_parallel_rank, get_rng_tracker,
                                    get_tensor_model_parallel_rank)
from megatron_lite.utils import atomic_write_text, barrier, fsync_path, get_rank, print_rank_0

# ``fault_point(iteration, point)``: called inside a save (tests kill the process there).
FaultPoint = Callable[[int, str], None]


def rng_state() -> dict:
    """RNG states of this process (python, numpy, torch CPU, CUDA, TP tracker)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_rng_tracker().set_states(state["tracker"])


@dataclasses.dataclass
class PendingSave:
    """A save whose files are written, or being written by a background thread, and not yet
    committed (manifest, rename, ``latest``): what :func:`commit_save` needs.

    ``run_files`` (rank 0): ``{name: text}`` of ``trainer_state.json`` and ``run_config.json``,
    taken at the step boundary. ``sums``: checksums of the files this rank wrote.
    ``background``: the thread of an asynchronous save. ``blocked_s``: seconds the step boundary
    spent in :func:`start_save`."""

    iteration: int
    tag: str
    tmp: str
    final: str
    save_dir: str
    run_files: dict | None
    sums: dict | None = None
    background: BackgroundWrite | None = None
    blocked_s: float = 0.0

    def done(self) -> bool:
        """Whether this rank's files are all written (always, for a synchronous save)."""
        return self.background is None or self.background.done()


def save_checkpoint(engine, cfg, state, scheduler, save_dir: str,
                    fault_point: FaultPoint | None = None) -> str:
    """Save atomically after ``state.iteration`` steps (collective: every rank calls it).

    Every rank writes into ``DIR/.tmp_<tag>``, fsyncs what it wrote and checksums it; after a
    barrier the ranks' listings and checksums are gathered and rank 0 checks it sees all of them
    (shared filesystem), writes the manifest (every file with its size and checksum), fsyncs,
    renames the folder to ``<tag>``, fsyncs ``DIR`` and only then replaces ``DIR/latest``.
    This is :func:`start_save` followed by :func:`commit_save`.

    Args:
        engine: the DeepSpeed engine. cfg: the RunConfig. state: the trainer state (attributes
            ``iteration``, ``consumed_samples``, ``skipped_steps``, ``consecutive_skipped``,
            optional ``data_state``/``extras``). scheduler: has ``state_dict()``.
        save_dir: ``--save``.
        fault_point: test hook ``fault_point(iteration, point)``, called at the points of the save
            in this order: ``"engine"`` (every rank: DeepSpeed's files written, RNG file not
            yet), ``"manifest"`` (rank 0: manifest written, folder not yet renamed), ``"rename"``
            (rank 0: folder renamed, ``latest`` not yet updated); an asynchronous save also calls
            ``"async_write"`` in its thread after the first file.

    Returns:
        The final checkpoint folder.

    Raises:
        CheckpointSaveError: a write failed on this rank (e.g. ``[Errno 28] No space left``,
            ``[Errno 27] File too large``) or rank 0 cannot see another rank's file. The
            temporary folder is removed (best effort) and ``latest`` is untouched; the other
            ranks fail in their next collective and the launcher tears the job down.
    """
    pending = start_save(engine, cfg, state, scheduler, save_dir, fault_point)
    return commit_save(pending, cfg, fault_point)


def start_save(engine, cfg, state, scheduler, save_dir: str,
               fault_point: FaultPoint | None = None, background: bool = False) -> PendingSave:
    """First half of a save (collective): this rank's files into ``DIR/.tmp_<tag>``.

    Synchronous: written, fsynced and checksummed before it returns. ``background``
    (``--async-save``): DeepSpeed's state dicts and the RNG states are copied to host memory
    (:func:`megatron_lite.checkpoint.async_save.stage`) and a thread writes, fsyncs and checksums
    them while training goes on. Either way :func:`commit_save` completes the save.

    Raises:
        CheckpointSaveError: as :func:`save_checkpoint` (a write of the synchronous part failed).
    """
    start = time.perf_counter()
    tag = tag_for(state.iteration)
    tmp = os.path.join(save_dir, f".tmp_{tag}")
    fault = fault_point or _no_fault
    if get_rank() == 0:
        _remove_leftovers(save_dir)
    barrier()
    pending = PendingSave(state.iteration, tag, tmp, os.path.join(save_dir, tag), save_dir,
                          _run_files(cfg, state, scheduler) if get_rank() == 0 else None)
    after_engine = lambda: fault(state.iteration, "engine")  # noqa: E731
    try:
        if background:
            pending.background = _start_background(
                engine, cfg, tmp, save_dir, after_engine,
                lambda: fault(state.iteration, "async_write"))
        else:
            written = _write_this_rank(engine, cfg, tmp, save_dir, after_engine)
            pending.sums = _checksums(tmp, written)
    except Exception as e:
        _abandon(tmp, tag, e)
    pending.blocked_s = time.perf_counter() - start
    return pending


def commit_save(pending: PendingSave, cfg, fault_point: FaultPoint | None = None) -> str:
    """Second half of a save (collective): wait for this rank's writes, then gather the listings
    and checksums; rank 0 checks coverage, writes the run files and the manifest, renames the
    folder and replaces ``latest``. Returns the final folder.

    Raises:
        CheckpointSaveError: as :func:`save_checkpoint` (also: the background write failed).
    """
    fault = fault_point or _no_fault
    try:
        if pending.background is not None:
            pending.sums = pending.background.result()
    except Exception as e:
        _abandon(pending.tmp, pending.tag, e)
    barrier()
    views, seen, sums = _gather_listings(pending.tmp, pending.sums or {})
    if get_rank() == 0:
        try:
            check_coverage(views, seen, pending.tmp)
            _finalize(cfg, pending, sums, fault)
        except Exception as e:
            _abandon(pending.tmp, pending.tag, e)
    barrier()
    return pending.final


def _no_fault(iteration: int, point: str) -> None:
    """The production ``fault_point``: nothing."""


def _remove_leftovers(save_dir: str) -> None:
    """Rank 0: create ``save_dir`` and remove the ``.tmp_iter_*`` folders of killed or failed
    saves."""
    os.makedirs(save_dir, exist_ok=True)
    for d in os.listdir(save_dir):
        if d.startswith(".tmp_iter_"):
            shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def _rng_file(tmp: str) -> str:
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    return os.path.join(tmp, "rng", f"rank_{get_rank():05d}.pt")


def _write_this_rank(engine, cfg, tmp: str, save_dir: str,
                     after_engine: Callable[[], None]) -> list[str] | None:
    """This rank's files: DeepSpeed's (+ the ZeRO-3 shard), ``after_engine()``, its RNG file;
    then fsync what it wrote. Returns the paths it wrote (None: not observable, see
    :func:`_write_engine_files`)."""
    written = _write_engine_files(engine, cfg, tmp, save_dir)
    after_engine()
    rng_file = _rng_file(tmp)
    torch.save(rng_state(), rng_file)
    # Each rank flushes what it wrote to stable storage (an fsync by a process that did not
    # write the data does not flush the writer's cache on a shared filesystem).
    for p in ([os.path.join(tmp, f) for f in list_files(tmp)] if written is None
              else written + [rng_file]):
        fsync_path(p)
    return None if written is None else written + [rng_file]


def _checksums(tmp: str, paths: list[str] | None) -> dict[str, str]:
    """``{path relative to tmp: checksum}`` of the files this rank wrote (read back while they
    are in the page cache; rank 0 checksums the rest in :func:`_finalize`)."""
    return {os.path.relpath(p, tmp): file_checksum(p) for p in paths or []}


def _start_background(engine, cfg, tmp: str, save_dir: str, after_engine: Callable[[], None],
                      after_first: Callable[[], None]) -> BackgroundWrite | None:
    """Stage this rank's state at the step boundary and start the thread that writes it.

    DeepSpeed's ``checkpoint_engine.save`` calls are recorded with a host copy of their state
    dict (the collectives of ``engine.save_checkpoint`` run here, on the main thread); the ZeRO-3
    gather (a collective) also runs here and its result, already a host copy, is queued. An engine
    without an observable ``checkpoint_engine`` is written synchronously (nothing to defer)."""
    memo: dict = {}
    writes: list[Callable[[], str | None]] = []

    def record(orig, sd, path):
        staged = stage(sd, memo)
        writes.append(lambda: (orig(staged, path), path)[1])

    def save_zero3(sd, path):
        writes.append(lambda: (torch.save(sd, path), path)[1])

    if not _observe_saves(engine, cfg, tmp, save_dir, record, save_zero3):
        written = _write_this_rank(engine, cfg, tmp, save_dir, after_engine)
        return BackgroundWrite([], lambda _: _checksums(tmp, written), lambda: None, 0)
    rng, rng_file = stage(rng_state(), memo), _rng_file(tmp)
    writes += [lambda: after_engine(), lambda: (torch.save(rng, rng_file), rng_file)[1]]

    def finish(paths: list[str]) -> dict[str, str]:
        for p in paths:
            fsync_path(p)
        return _checksums(tmp, paths)

    return BackgroundWrite(writes, finish, after_first, staged_bytes(memo))


def _gather_listings(tmp: str, sums: dict[str, str]
                     ) -> tuple[list[dict[str, int]], dict[str, int], dict[str, str]]:
    """(every rank's listing of ``tmp``, this rank's, every rank's checksums merged) after the
    writes (collective)."""
    seen = list_files(tmp)
    views = [(seen, sums)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, (seen, sums))
    merged: dict[str, str] = {}
    for _, s in views:
        merged.update(s)
    return [v for v, _ in views], seen, merged


def _write_engine_files(engine, cfg, tmp: str, save_dir: str) -> list[str] | None:
    """DeepSpeed's files of this rank (+ the ZeRO-3 gathered shard). Returns the paths this rank
    wrote, or None when the engine has no DeepSpeed ``checkpoint_engine`` to observe."""
    written: list[str] = []

    def record(orig, sd, path):
        orig(sd, path)
        written.append(path)

    def save_zero3(sd, path):
        torch.save(sd, path)
        written.append(path)

    return written if _observe_saves(engine, cfg, tmp, save_dir, record, save_zero3) else None


def _observe_saves(engine, cfg, tmp: str, save_dir: str, record, save_zero3) -> bool:
    """Run ``engine.save_checkpoint`` into ``tmp`` with DeepSpeed's ``checkpoint_engine.save``
    routed through ``record(orig_save, state_dict, path)``, then (ZeRO-3) the gathered TP shard
    through ``save_zero3(state_dict, path)``. Returns False when the engine has no
    ``checkpoint_engine`` to observe (its files were written directly)."""
    ce = getattr(engine, "checkpoint_engine", None)
    observable = ce is not None and callable(getattr(ce, "save", None))
    if observable:
        orig, shadowed = ce.save, "save" in vars(ce)

        def recording_save(*a, **k):  # DeepSpeed calls save(sd, path) or save(state_dict=, path=)
            record(orig, k["state_dict"] if "state_dict" in k else a[0],
                   str(k["path"] if "path" in k else a[1]))

        ce.save = recording_save
    try:
        engine.save_checkpoint(save_dir, tag=os.path.basename(tmp), save_latest=False)
    finally:
        if observable:
            if shadowed:
                ce.save = orig
            else:
                del ce.save
    if cfg.parallel.zero_stage == 3:
        _save_zero3_shard(engine, tmp, save_zero3 if observable else torch.save)
    return observable


def _save_zero3_shard(engine, tmp: str, save: Callable[[dict, str], None]) -> None:
    """ZeRO-3: gather this TP shard over its DP group (collective) and ``save`` it as
    ``model_tp_XX.pt`` on DP rank 0.

    DeepSpeed's module file holds no weights at stage 3, and
    ``engine._zero3_consolidated_16bit_state_dict()`` would return the dict on global rank 0
    only, i.e. None on the DP-rank-0 of every other TP group."""
    # As DeepSpeed's own consolidation does: partition everything first, and afterwards
    # re-gather the persistent (small, never-partitioned) parameters the exit of each
    # GatheredParameters context partitioned.
    opt = getattr(engine, "optimizer", None)
    if hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()
    # One writer per TP rank: DP rank 0 of the D x CP group ZeRO-3 partitions over.
    writer = get_data_parallel_rank(with_context_parallel=True) == 0
    sd = zero3_gathered_state_dict(engine.module, keep=writer)
    if hasattr(opt, "checkpoint_event_epilogue"):
        opt.checkpoint_event_epilogue()
    if not writer:
        return
    assert sd is not None, "ZeRO-3 gather returned no state dict on DP rank 0"
    save(sd, os.path.join(tmp, f"model_tp_{get_tensor_model_parallel_rank():02d}.pt"))


def _run_files(cfg, state, scheduler) -> dict[str, str]:
    """Rank 0: the text of ``trainer_state.json`` and ``run_config.json`` at this step."""
    trainer_state = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                     "skipped_steps": state.skipped_steps,
                     "consecutive_skipped": state.consecutive_skipped,
                     "data_state": getattr(state, "data_state", None),
                     "extras": getattr(state, "extras", None),
                     "scheduler": scheduler.state_dict(),
                     "world_size": cfg.derived.world_size,
                     "data_parallel_size": cfg.derived.data_parallel_size,
                     "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
                     "context_parallel_size": cfg.parallel.context_parallel_size,
                     "zero_stage": cfg.parallel.zero_stage}
    return {"trainer_state.json": json.dumps(trainer_state, indent=1),
            "run_config.json": json.dumps({"config": cfg.to_dict(),
                                           "versions": library_versions()},
                                          indent=1, default=str)}


def _finalize(cfg, pending: PendingSave, sums: dict[str, str], fault: FaultPoint) -> None:
    """Rank 0: run files, manifest (sizes and checksums), fsync, rename, ``latest``, pruning."""
    tmp, final, tag, save_dir = pending.tmp, pending.final, pending.tag, pending.save_dir
    for name, text in pending.run_files.items():
        atomic_write_text(os.path.join(tmp, name), text)
    sums = dict(sums)
    for rel in list_files(tmp):   # files no rank reported: the run files, DeepSpeed's scripts
        if rel not in sums:
            sums[rel] = file_checksum(os.path.join(tmp, rel))
    write_manifest(tmp, sums, CHECKSUM_ALGORITHM)
    fsync_path(os.path.join(tmp, "rng"))
    fsync_path(tmp)
    fault(pending.iteration, "manifest")
    # Re-saving the same step (e.g. after a resume): move the old complete folder aside, put the
    # new one in place and name it in `latest` before deleting the old one, so a kill in between
    # leaves a complete iter_ folder (the old one is in .old_<tag> only for the instant between
    # the two renames).
    old = os.path.join(save_dir, f".old_{tag}")
    shutil.rmtree(old, ignore_errors=True)
    replaced = os.path.exists(final)
    if replaced:
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(save_dir)  # the rename is durable before `latest` can name it
    fault(pending.iteration, "rename")
    atomic_write_text(os.path.join(save_dir, "latest"), tag + "\n")
    fsync_path(save_dir)
    if replaced:
        shutil.rmtree(old, ignore_errors=True)
    prune(save_dir, cfg.checkpoint.keep_last)


def _abandon(tmp: str, tag: str, err: Exception):
    """Remove this save's temporary folder (frees the space a full disk needs) and raise."""
    shutil.rmtree(tmp, ignore_errors=True)
    save_dir = os.path.dirname(tmp)
    latest = os.path.join(save_dir, "latest")
    prev = open(latest).read().strip() if os.path.isfile(latest) else "none"
    raise CheckpointSaveError(
        f"saving {tag} to {save_dir} failed on rank {get_rank()}: {type(err).__name__}: {err}. "
        f"Nothing was marked complete ('latest' still names {prev}); training stops. Free disk "
        f"space (or lower --keep-last) and restart with --load {save_dir}") from err


def load_checkpoint(engine, cfg, state, scheduler) -> str | None:
    """Resume from ``cfg.checkpoint.load`` (collective). Returns the folder used, or None.

    Restores the model, optimizer (unless --no-load-optim), LR schedule, counters, consumed
    samples and RNG (unless --no-load-rng). ``--finetune`` loads the model only.

    The folder is :func:`megatron_lite.checkpoint.verify.choose_checkpoint`'s: ``latest``'s if
    its files match the manifest's sizes and checksums (``--no-verify-checkpoint``: sizes
    only), else the newest valid one before it (one line says which was skipped and why;
    ``--no-checkpoint-fallback``: an error instead).

    Raises:
        CheckpointLoadError: the checkpoints in ``--load`` are all damaged or incomplete, or the
            newest is and ``--no-checkpoint-fallback`` is set (one line naming the file).
        ValueError: model mismatch (:func:`check_compatible`), another ZeRO stage, or a
            data-parallel size change :mod:`zero_reshard` cannot reshard (its one-line reason).
    """
    ck = cfg.checkpoint
    path = choose_checkpoint(ck.load, verify=not ck.no_verify_checkpoint,
                             fallback=not ck.no_checkpoint_fallback, say=print_rank_0)
    if path is None:
        if get_rank() == 0:
            warnings.warn(f"--load {ck.load}: no complete checkpoint found; starting from scratch")
        return None
    check_compatible(read_saved_config(path), cfg, where=path)
    with open(os.path.join(path, "trainer_state.json")) as f:
        ts = json.load(f)
    load_optim = not (ck.no_load_optim or ck.finetune)
    reshard = _check_optimizer_state(cfg, path, ts, load_optim)
    _load_weights_and_optimizer(engine, cfg, path, ts, load_optim, reshard)
    if ck.finetune:
        return path
    _restore_counters(state, scheduler, ts, cfg)
    _restore_rng(path, ts, cfg)
    return path


def _check_optimizer_state(cfg, path: str, ts: dict, load_optim: bool) -> bool:
    """Refuse optimizer state this run cannot load; returns whether it must be resharded.

    DeepSpeed 0.19 loads ZeRO >= 1 optimizer partitions only at the D they were saved with:
    another D goes through zero_reshard (full per-parameter state, re-partitioned)."""
    reshard = load_optim and ts["zero_stage"] >= 1 and ts["data_parallel_size"] != \
        cfg.derived.data_parallel_size
    cp_then, cp_now = ts.get("context_parallel_size", 1), cfg.parallel.context_parallel_size
    if load_optim and ts["zero_stage"] >= 1 and (cp_then != cp_now or (reshard and cp_now > 1)):
        # ZeRO partitions over D x CP; zero_reshard re-partitions over D only.
        raise ValueError(f"{path}: saved with D={ts['data_parallel_size']}, CP={cp_then} at ZeRO-"
                         f"{ts['zero_stage']}; its optimizer partitions load only at the same D and "
                         f"--context-parallel-size (now D={cfg.derived.data_parallel_size}, CP={cp_now}); "
                         f"resume with those or with --no-load-optim")
    if reshard:
        zero_reshard.check_supported(path, ts, cfg)
    if load_optim and ts["zero_stage"] != cfg.parallel.zero_stage:
        raise ValueError(f"{path}: saved with ZeRO-{ts['zero_stage']}, resuming with "
                         f"--zero-stage {cfg.parallel.zero_stage}; use the same stage or "
                         f"--no-load-optim")
    if load_optim:
        check_same_frozen_set(read_saved_config(path), cfg, path)
    return reshard


def _load_weights_and_optimizer(engine, cfg, path: str, ts: dict, load_optim: bool,
                                reshard: bool) -> None:
    """The model (and, with ``load_optim``, the optimizer state) of ``path`` into ``engine``."""
    parent, tag = os.path.split(os.path.abspath(path))
    stage_changed = ts["zero_stage"] != cfg.parallel.zero_stage
    if not load_optim and (cfg.parallel.zero_stage == 3 or stage_changed):
        # Weights only, by hand: DeepSpeed's module-only load at stage 3 rebuilds the weights
        # from ZeRO-3 optimizer partitions (wrong weights when resuming a ZeRO-3 run with
        # --no-load-optim; none in a checkpoint saved at another stage or written by
        # tools/convert_checkpoint.py), and across stages it asserts on the file list. Copy this
        # TP rank's full shard (model_tp_XX.pt or the DeepSpeed module file) into the parameters.
        load_into(engine.module, module_state(path, get_tensor_model_parallel_rank()))
        opt = getattr(engine, "optimizer", None)
        if opt is not None and hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()  # the fp32 master partitions were copied at engine init
    elif reshard:
        zero_reshard.load_resharded(engine, cfg, path, ts)
    else:
        engine.load_checkpoint(parent, tag=tag, load_optimizer_states=load_optim,
                               load_lr_scheduler_states=False, load_module_only=not load_optim)


def _restore_counters(state, scheduler, ts: dict, cfg) -> None:
    """Iteration, consumed samples, skip counters, data position, extras and LR schedule."""
    state.iteration = ts["iteration"]
    state.consumed_samples = ts["consumed_samples"]
    state.skipped_steps = ts["skipped_steps"]
    state.consecutive_skipped = ts["consecutive_skipped"]
    state.data_state = ts.get("data_state")
    state.extras = ts.get("extras")
    scheduler.load_state_dict(ts["scheduler"], override=cfg.schedule.override_opt_param_scheduler)


def _restore_rng(path: str, ts: dict, cfg) -> None:
    """This rank's RNG states, unless --no-load-rng or the world size changed (warned)."""
    rng_file = os.path.join(path, "rng", f"rank_{get_rank():05d}.pt")
    if not cfg.checkpoint.no_load_rng:
        if ts["world_size"] == cfg.derived.world_size and os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif get_rank() == 0:
            warnings.warn("world size changed since the checkpoint: RNG states not restored "
                          "(dropout masks differ from the uninterrupted run)")


__all__ = ["FaultPoint", "PendingSave", "commit_save", "load_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state", "start_save"]
