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
Folder names, the manifest, completeness, fsync and pruning live in
:mod:`megatron_lite.checkpoint.layout` (re-exported here).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.checkpoint.layout import (  # noqa: F401 - re-exported (tools, tests)
    ITER_RE, MANIFEST, check_coverage, find_checkpoint, is_complete, iter_of, library_versions,
    list_checkpoints, list_files, prune, read_saved_config, tag_for, write_manifest)
from megatron_lite.errors import CheckpointSaveError
from megatron_lite.utils import atomic_write_text, barrier, fsync_path, get_rank

# Model fields that may change between save and resume without changing the weights' meaning.
_MODEL_FIELDS_ALLOWED_TO_CHANGE = {
    "seq_length", "max_position_embeddings", "attention_backend", "no_fused_rope",
    "recompute_granularity", "recompute_num_layers", "hidden_dropout", "attention_dropout",
    "params_dtype", "model_size", "rope_scaling_type", "rope_scaling_factor",
    "rope_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_attention_factor", "yarn_mscale", "yarn_mscale_all_dim", "yarn_truncate", "llama3_low_freq_factor", "llama3_high_freq_factor",
}


def rng_state() -> dict:
    """RNG states of this process (python, numpy, torch CPU, CUDA, TP tracker)."""
    from megatron_lite.parallel import get_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output."""
    from megatron_lite.parallel import get_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_rng_tracker().set_states(state["tracker"])


def _fault_hook(iteration: int, point: str) -> None:
    """Test hook: ``MEGATRON_LITE_INJECT_SAVE_KILL="iteration:rank:point,..."`` SIGKILLs this rank at
    ``point`` of the save after ``iteration`` steps. Points, in save order: ``engine`` (DeepSpeed's
    files written, RNG file not yet), ``manifest`` (rank 0: manifest written, folder not yet
    renamed), ``rename`` (rank 0: folder renamed, ``latest`` not yet updated)."""
    spec = os.environ.get("MEGATRON_LITE_INJECT_SAVE_KILL", "")
    for item in filter(None, spec.split(",")):
        it, rank, where = item.split(":")
        if int(it) == iteration and int(rank) == get_rank() and where == point:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(engine, cfg, state, scheduler, save_dir: str) -> str:
    """Save atomically after ``state.iteration`` steps (collective: every rank calls it).

    Every rank writes into ``DIR/.tmp_<tag>`` and fsyncs what it sees there; after a barrier the
    ranks' listings are gathered and rank 0 checks it sees all of them (shared filesystem), writes
    the manifest (every file with its size), fsyncs, renames the folder to ``<tag>``, fsyncs
    ``DIR`` and only then replaces ``DIR/latest``.

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
    if get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        for d in os.listdir(save_dir):  # leftovers of killed or failed saves
            if d.startswith(".tmp_iter_"):
                shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)
    barrier()
    try:
        written = _write_rank_files(engine, cfg, tmp, tmp_tag, save_dir)
        _fault_hook(state.iteration, "engine")
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        rng_file = os.path.join(tmp, "rng", f"rank_{get_rank():05d}.pt")
        torch.save(rng_state(), rng_file)
        # Each rank flushes what it wrote to stable storage (an fsync by a process that did not
        # write the data does not flush the writer's cache on a shared filesystem).
        for p in ([os.path.join(tmp, f) for f in list_files(tmp)] if written is None
                  else written + [rng_file]):
            fsync_path(p)
    except Exception as e:
        _abandon(tmp, tag, e)
    barrier()
    seen = list_files(tmp)
    views = [seen]
    if dist.is_initialized() and dist.get_world_size() > 1:
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, seen)
    if get_rank() == 0:
        try:
            check_coverage(views, seen, tmp)
            _finalize(cfg, state, scheduler, save_dir, tmp, final, tag)
        except Exception as e:
            _abandon(tmp, tag, e)
    barrier()
    return final


def _write_rank_files(engine, cfg, tmp: str, tmp_tag: str, save_dir: str) -> list[str] | None:
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
        # DeepSpeed's module file holds no weights at stage 3; gather this TP shard over its DP
        # group. (engine._zero3_consolidated_16bit_state_dict() would return the dict on global
        # rank 0 only, i.e. None on the DP-rank-0 of every other TP group.)
        from megatron_lite.parallel import get_data_parallel_rank, get_tensor_model_parallel_rank

        # As DeepSpeed's own consolidation does: partition everything first, and afterwards
        # re-gather the persistent (small, never-partitioned) parameters the exit of each
        # GatheredParameters context partitioned.
        opt = getattr(engine, "optimizer", None)
        if hasattr(opt, "checkpoint_event_prologue"):
            opt.checkpoint_event_prologue()
        sd = _zero3_gathered_state_dict(engine.module, keep=get_data_parallel_rank() == 0)
        if hasattr(opt, "checkpoint_event_epilogue"):
            opt.checkpoint_event_epilogue()
        if get_data_parallel_rank() == 0:
            assert sd is not None, "ZeRO-3 gather returned no state dict on DP rank 0"
            path = os.path.join(tmp, f"model_tp_{get_tensor_model_parallel_rank():02d}.pt")
            torch.save(sd, path)
            if written is not None:
                written.append(path)
    return written


def _finalize(cfg, state, scheduler, save_dir: str, tmp: str, final: str, tag: str) -> None:
    """Rank 0: trainer state, config, manifest, fsync, rename, ``latest``, pruning."""
    trainer_state = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                     "skipped_steps": state.skipped_steps,
                     "consecutive_skipped": state.consecutive_skipped,
                     "data_state": getattr(state, "data_state", None),
                     "extras": getattr(state, "extras", None),
                     "scheduler": scheduler.state_dict(),
                     "world_size": cfg.derived.world_size,
                     "data_parallel_size": cfg.derived.data_parallel_size,
                     "tensor_model_parallel_size": cfg.parallel.tensor_model_parallel_size,
                     "zero_stage": cfg.parallel.zero_stage}
    atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(trainer_state, indent=1))
    atomic_write_text(os.path.join(tmp, "run_config.json"),
                       json.dumps({"config": cfg.to_dict(), "versions": library_versions()},
                                  indent=1, default=str))
    write_manifest(tmp)
    fsync_path(os.path.join(tmp, "rng"))
    fsync_path(tmp)
    _fault_hook(state.iteration, "manifest")
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
    _fault_hook(state.iteration, "rename")
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


def _zero3_gathered_state_dict(module: torch.nn.Module, keep: bool) -> dict | None:
    """This TP shard's full (unpartitioned over DP) state dict of a ZeRO-3 ``module``.

    Collective over the DP group the parameters are partitioned on: every rank must call it. Gathers
    one submodule's own parameters at a time (peak memory: the largest layer, not the shard) and
    copies them to CPU in their training dtype (what DeepSpeed's consolidated state dict holds).
    Returns the dict (``state_dict()`` keys, shared parameters kept shared) where ``keep``, else
    None.
    """
    import deepspeed

    sd: dict | None = {} if keep else None
    seen: dict[int, str] = {}  # id(param) -> first key (tied parameters stay one tensor)

    def visit(m: torch.nn.Module, prefix: str) -> None:
        params = [p for p in m._parameters.values() if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if sd is not None:
                for name, p in m._parameters.items():
                    if p is None:
                        continue
                    if id(p) in seen:
                        sd[prefix + name] = sd[seen[id(p)]]
                    else:
                        sd[prefix + name] = p.detach().to("cpu", copy=True)
                        seen[id(p)] = prefix + name
                for name, b in m._buffers.items():
                    if b is not None and name not in m._non_persistent_buffers_set:
                        sd[prefix + name] = b.detach().to("cpu", copy=True)
        for name, child in m._modules.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(module, "")
    return sd


def _shape(model: dict, padded_vocab) -> str:
    return (f"hidden {model.get('hidden_size')}, layers {model.get('num_layers')}, heads "
            f"{model.get('num_attention_heads')}, groups {model.get('num_query_groups')}, ffn "
            f"{model.get('ffn_hidden_size')}, padded vocab {padded_vocab}")


def check_compatible(saved: dict, cfg, where: str = "checkpoint") -> None:
    """Raise if resuming ``saved`` (a checkpoint's config dict) under ``cfg`` would silently change
    the model.

    Raises:
        ValueError: one line: each differing model flag with both values, the TP degree or the
            padded vocab, both shapes, and where the checkpoint's values are.
    """
    diffs = []
    now = cfg.to_dict()
    for k, v in saved.get("model", {}).items():
        if k not in _MODEL_FIELDS_ALLOWED_TO_CHANGE and now["model"].get(k) != v:
            diffs.append(f"--{k.replace('_', '-')}: checkpoint {v!r}, this run "
                         f"{now['model'].get(k)!r}")
    tp_old = saved.get("parallel", {}).get("tensor_model_parallel_size")
    if tp_old != cfg.parallel.tensor_model_parallel_size:
        diffs.append(f"--tensor-model-parallel-size: checkpoint {tp_old}, this run "
                     f"{cfg.parallel.tensor_model_parallel_size} (reshard with "
                     f"tools/convert_checkpoint.py)")
    pv = saved.get("derived", {}).get("padded_vocab_size")
    if pv != cfg.derived.padded_vocab_size:
        diffs.append(f"padded vocab (--vocab-size/--make-vocab-size-divisible-by): checkpoint "
                     f"{pv}, this run {cfg.derived.padded_vocab_size}")
    if diffs:
        raise ValueError(
            f"{where} does not match this run's model: " + "; ".join(diffs)
            + f" (checkpoint shape: {_shape(saved.get('model', {}), pv)}; this run: "
            f"{_shape(now['model'], cfg.derived.padded_vocab_size)}). Resume with the "
            f"checkpoint's values (in {where}/run_config.json) or --load another folder")


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
    # DeepSpeed 0.19 loads ZeRO >= 1 optimizer partitions only at the D they were saved with:
    # another D goes through zero_reshard (full per-parameter state, re-partitioned).
    reshard = load_optim and ts["zero_stage"] >= 1 and ts["data_parallel_size"] != \
        cfg.derived.data_parallel_size
    if reshard:
        from megatron_lite.checkpoint import zero_reshard

        zero_reshard.check_supported(path, ts, cfg)
    if load_optim and ts["zero_stage"] != cfg.parallel.zero_stage:
        raise ValueError(f"{path}: saved with ZeRO-{ts['zero_stage']}, resuming with "
                         f"--zero-stage {cfg.parallel.zero_stage}; use the same stage or "
                         f"--no-load-optim")
    if load_optim:
        _check_same_frozen_set(read_saved_config(path), cfg, path)
    parent, tag = os.path.split(os.path.abspath(path))
    stage_changed = ts["zero_stage"] != cfg.parallel.zero_stage
    if not load_optim and (cfg.parallel.zero_stage == 3 or stage_changed):
        # Weights only, by hand: DeepSpeed's module-only load at stage 3 rebuilds the weights
        # from ZeRO-3 optimizer partitions (wrong weights when resuming a ZeRO-3 run with
        # --no-load-optim; none in a checkpoint saved at another stage or written by
        # tools/convert_checkpoint.py), and across stages it asserts on the file list. Copy this
        # TP rank's full shard (model_tp_XX.pt or the DeepSpeed module file) into the parameters.
        from megatron_lite.parallel import get_tensor_model_parallel_rank
        from megatron_lite.cpt.weights import load_into

        load_into(engine.module, _module_state(path, get_tensor_model_parallel_rank()))
        opt = getattr(engine, "optimizer", None)
        if opt is not None and hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()  # the fp32 master partitions were copied at engine init
    elif reshard:
        zero_reshard.load_resharded(engine, cfg, path, ts)
    else:
        engine.load_checkpoint(parent, tag=tag, load_optimizer_states=load_optim,
                               load_lr_scheduler_states=False, load_module_only=not load_optim)
    if ck.finetune:
        return path
    dump = os.environ.get("MEGATRON_LITE_DUMP_OPTIM_STATE")   # test hook (docs/interfaces.md)
    if dump and load_optim and cfg.parallel.zero_stage >= 1:
        from megatron_lite.checkpoint.zero_reshard import dump_full_state

        dump_full_state(engine, dump, tag)
    state.iteration = ts["iteration"]
    state.consumed_samples = ts["consumed_samples"]
    state.skipped_steps = ts["skipped_steps"]
    state.consecutive_skipped = ts["consecutive_skipped"]
    state.data_state = ts.get("data_state")
    state.extras = ts.get("extras")
    scheduler.load_state_dict(ts["scheduler"], override=cfg.schedule.override_opt_param_scheduler)
    rng_file = os.path.join(path, "rng", f"rank_{get_rank():05d}.pt")
    if not ck.no_load_rng:
        if ts["world_size"] == cfg.derived.world_size and os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif get_rank() == 0:
            warnings.warn("world size changed since the checkpoint: RNG states not restored "
                          "(dropout masks differ from the uninterrupted run)")
    return path


def _check_same_frozen_set(saved: dict, cfg, path: str) -> None:
    """The optimizer state covers the trainable parameters only: a resume that freezes other
    layers (CPT's --freeze-layers/--freeze-embeddings) cannot load it.

    Raises:
        ValueError: one line naming both settings and the ways out.
    """
    old, now = saved.get("cpt") or {}, getattr(cfg, "cpt", None)
    pairs = [("--freeze-layers", old.get("freeze_layers"), getattr(now, "freeze_layers", None)),
             ("--freeze-embeddings", bool(old.get("freeze_embeddings")),
              bool(getattr(now, "freeze_embeddings", False)))]
    diffs = [f"{flag}: checkpoint {a!r}, this run {b!r}" for flag, a, b in pairs if a != b]
    if diffs:
        raise ValueError(f"{path}: the frozen parameters differ from the checkpoint's ("
                         + "; ".join(diffs) + "), so its optimizer state does not fit; resume "
                         "with the checkpoint's settings or pass --no-load-optim")


def _module_state(path: str, tp_rank: int) -> dict:
    z3 = os.path.join(path, f"model_tp_{tp_rank:02d}.pt")
    if os.path.isfile(z3):
        return torch.load(z3, map_location="cpu", weights_only=False)
    f = os.path.join(path, f"mp_rank_{tp_rank:02d}_model_states.pt")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: no weights for TP rank {tp_rank} ({os.path.basename(f)})")
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


def load_model_for_inference(load_dir: str, tp_rank: int = 0, tp_size: int = 1):
    """Build the model of a checkpoint and load its weights for TP rank ``tp_rank`` of ``tp_size``.

    Args:
        load_dir: a ``--save`` folder (its latest complete checkpoint) or a checkpoint folder.
        tp_rank, tp_size: the TP shard to load, at any TP degree the model allows (a different
            degree than the saved one is resharded in memory; every rank reads all saved shards).
            When ``tp_size`` > 1 the caller must have initialized the TP process groups first.

    Returns:
        ``(model, RunConfig)``: ``LlamaModel`` in eval mode with fp32 weights on CPU.

    Raises:
        FileNotFoundError: no complete checkpoint / no shard for a saved TP rank.
        ValueError: ``tp_rank``/``tp_size`` invalid for the model (heads/groups/ffn % TP).
    """
    from megatron_lite.config import RunConfig
    from megatron_lite.model.llama import LlamaModel

    path = find_checkpoint(load_dir)
    if path is None:
        raise FileNotFoundError(f"{load_dir}: no complete checkpoint (need manifest.json)")
    cfg = RunConfig.from_dict(read_saved_config(path), source=os.path.join(path, "run_config.json"))
    saved_tp = cfg.parallel.tensor_model_parallel_size
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    if tp_size == saved_tp:
        sd = _module_state(path, tp_rank)
    else:
        # Reshard through the full (HF-layout) weights: every TP layer splits a plain row or
        # column range, so concatenating the saved shards and re-splitting is exact.
        from megatron_lite.model import hf_adapter

        cfg.model.validate(saved_tp)
        full = hf_adapter.megatron_lite_to_hf([_module_state(path, r) for r in range(saved_tp)],
                                              cfg.model)
        sd = hf_adapter.hf_to_megatron_lite(full, cfg.model, tp_rank, tp_size)
        cfg.parallel.tensor_model_parallel_size = tp_size
    cfg.model.validate(tp_size)
    cfg.derived.padded_vocab_size = cfg.model.padded_vocab_size(tp_size)
    model = LlamaModel(cfg.model)
    sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}
    model.load_state_dict(sd)
    model.eval()
    return model, cfg


__all__: list[Any] = ["CheckpointSaveError", "check_coverage", "find_checkpoint", "is_complete", "load_checkpoint",
                      "load_model_for_inference", "save_checkpoint", "tag_for", "list_checkpoints"]
