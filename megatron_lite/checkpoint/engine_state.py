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
        manifest.json               every file above with its size; written last inside the folder

Atomicity: everything is written into ``DIR/.tmp_iter_0000100``; after a barrier rank 0 writes the
manifest, renames the folder to ``iter_0000100`` and only then replaces ``latest``. A kill at any
moment leaves the previous complete checkpoint: ``--load`` only accepts a folder whose manifest
exists and whose files all exist with the recorded sizes, falling back to the newest complete one.
Folder names, the manifest, completeness and pruning live in
:mod:`megatron_lite.checkpoint.layout`; the model/frozen-set checks in
:mod:`megatron_lite.checkpoint.compat`; module weights (ZeRO-3 gather, weights-only loads,
inference loading) in :mod:`megatron_lite.checkpoint.weights`; resuming at another
data-parallel size in :mod:`megatron_lite.checkpoint.zero_reshard`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.checkpoint import zero_reshard
from megatron_lite.checkpoint.compat import check_compatible, check_same_frozen_set
from megatron_lite.checkpoint.layout import (check_coverage, find_checkpoint, library_versions,
                                             list_files, prune, read_saved_config, tag_for,
                                             write_manifest)
from megatron_lite.checkpoint.weights import load_into, module_state, zero3_gathered_state_dict
from megatron_lite.errors import CheckpointSaveError
from megatron_lite.parallel import (get_data_parallel_rank, get_rng_tracker,
                                    get_tensor_model_parallel_rank)
from megatron_lite.utils import atomic_write_text, barrier, fsync_path, get_rank

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


def save_checkpoint(engine, cfg, state, scheduler, save_dir: str,
                    fault_point: FaultPoint | None = None) -> str:
    """Save atomically after ``state.iteration`` steps (collective: every rank calls it).

    Every rank writes into ``DIR/.tmp_<tag>`` and fsyncs what it sees there; after a barrier the
    ranks' listings are gathered and rank 0 checks it sees all of them (shared filesystem), writes
    the manifest (every file with its size), fsyncs, renames the folder to ``<tag>``, fsyncs
    ``DIR`` and only then replaces ``DIR/latest``.

    Args:
        engine: the DeepSpeed engine. cfg: the RunConfig. state: the trainer state (attributes
            ``iteration``, ``consumed_samples``, ``skipped_steps``, ``consecutive_skipped``,
            optional ``data_state``/``extras``). scheduler: has ``state_dict()``.
        save_dir: ``--save``.
        fault_point: test hook ``fault_point(iteration, point)``, called at the points of the save
            in this order: ``"engine"`` (every rank: DeepSpeed's files written, RNG file not
            yet), ``"manifest"`` (rank 0: manifest written, folder not yet renamed), ``"rename"``
            (rank 0: folder renamed, ``latest`` not yet updated).

    Returns:
        The final checkpoint folder.

    Raises:
        CheckpointSaveError: a write failed on this rank (e.g. ``[Errno 28] No space left``,
            ``[Errno 27] File too large``) or rank 0 cannot see another rank's file. The
            temporary folder is removed (best effort) and ``latest`` is untouched; the other
            ranks fail in their next collective and the launcher tears the job down.
    """
    tag = tag_for(state.iteration)
    tmp_tag = f".tmp_{tag}"
    tmp = os.path.join(save_dir, tmp_tag)
    final = os.path.join(save_dir, tag)
    fault = fault_point or _no_fault
    if get_rank() == 0:
        _remove_leftovers(save_dir)
    barrier()
    try:
        _write_this_rank(engine, cfg, tmp, tmp_tag, save_dir, lambda: fault(state.iteration,
                                                                             "engine"))
    except Exception as e:
        _abandon(tmp, tag, e)
    barrier()
    views, seen = _gather_listings(tmp)
    if get_rank() == 0:
        try:
            check_coverage(views, seen, tmp)
            _finalize(cfg, state, scheduler, save_dir, tmp, final, tag, fault)
        except Exception as e:
            _abandon(tmp, tag, e)
    barrier()
    return final


def _no_fault(iteration: int, point: str) -> None:
    """The production ``fault_point``: nothing."""


def _remove_leftovers(save_dir: str) -> None:
    """Rank 0: create ``save_dir`` and remove the ``.tmp_iter_*`` folders of killed or failed
    saves."""
    os.makedirs(save_dir, exist_ok=True)
    for d in os.listdir(save_dir):
        if d.startswith(".tmp_iter_"):
            shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def _write_this_rank(engine, cfg, tmp: str, tmp_tag: str, save_dir: str,
                     after_engine: Callable[[], None]) -> None:
    """This rank's files: DeepSpeed's (+ the ZeRO-3 shard), ``after_engine()``, its RNG file;
    then fsync what it wrote."""
    written = _write_engine_files(engine, cfg, tmp, tmp_tag, save_dir)
    after_engine()
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    rng_file = os.path.join(tmp, "rng", f"rank_{get_rank():05d}.pt")
    torch.save(rng_state(), rng_file)
    # Each rank flushes what it wrote to stable storage (an fsync by a process that did not
    # write the data does not flush the writer's cache on a shared filesystem).
    for p in ([os.path.join(tmp, f) for f in list_files(tmp)] if written is None
              else written + [rng_file]):
        fsync_path(p)


def _gather_listings(tmp: str) -> tuple[list[dict[str, int]], dict[str, int]]:
    """(every rank's listing of ``tmp``, this rank's) after the writes (collective)."""
    seen = list_files(tmp)
    views = [seen]
    if dist.is_initialized() and dist.get_world_size() > 1:
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, seen)
    return views, seen


def _write_engine_files(engine, cfg, tmp: str, tmp_tag: str, save_dir: str) -> list[str] | None:
    """DeepSpeed's files of this rank (+ the ZeRO-3 gathered shard). Returns the paths this rank
    wrote, or None when the engine has no DeepSpeed ``checkpoint_engine`` to observe."""
    ce = getattr(engine, "checkpoint_engine", None)
    written: list[str] | None = None
    if ce is not None and callable(getattr(ce, "save", None)):
        written, orig, shadowed = [], ce.save, "save" in vars(ce)

        def recording_save(*a, **k):  # DeepSpeed calls save(sd, path) or save(state_dict=, path=)
            out = orig(*a, **k)
            written.append(str(k["path"] if "path" in k else a[1]))
            return out

        ce.save = recording_save
    try:
        engine.save_checkpoint(save_dir, tag=tmp_tag, save_latest=False)
    finally:
        if written is not None:
            if shadowed:
                ce.save = orig
            else:
                del ce.save
    if cfg.parallel.zero_stage == 3:
        path = _save_zero3_shard(engine, tmp)
        if path is not None and written is not None:
            written.append(path)
    return written


def _save_zero3_shard(engine, tmp: str) -> str | None:
    """ZeRO-3: gather this TP shard over its DP group (collective) and write ``model_tp_XX.pt``
    on DP rank 0 (returned; None elsewhere).

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
        return None
    assert sd is not None, "ZeRO-3 gather returned no state dict on DP rank 0"
    path = os.path.join(tmp, f"model_tp_{get_tensor_model_parallel_rank():02d}.pt")
    torch.save(sd, path)
    return path


def _write_run_files(cfg, state, scheduler, tmp: str) -> None:
    """Rank 0: ``trainer_state.json`` and ``run_config.json``."""
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
    atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(trainer_state, indent=1))
    atomic_write_text(os.path.join(tmp, "run_config.json"),
                      json.dumps({"config": cfg.to_dict(), "versions": library_versions()},
                                 indent=1, default=str))


def _finalize(cfg, state, scheduler, save_dir: str, tmp: str, final: str, tag: str,
              fault: FaultPoint) -> None:
    """Rank 0: trainer state, config, manifest, fsync, rename, ``latest``, pruning."""
    _write_run_files(cfg, state, scheduler, tmp)
    write_manifest(tmp)
    fsync_path(os.path.join(tmp, "rng"))
    fsync_path(tmp)
    fault(state.iteration, "manifest")
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
    fault(state.iteration, "rename")
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

    Raises:
        ValueError: model mismatch (:func:`check_compatible`), another ZeRO stage, or a
            data-parallel size change :mod:`zero_reshard` cannot reshard (its one-line reason).
    """
    ck = cfg.checkpoint
    path = find_checkpoint(ck.load)
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


__all__ = ["FaultPoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]
