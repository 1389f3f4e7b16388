"""DeepSpeed ZeRO training checkpoints consolidated into full fp32 weights.

Two kinds of folder are read:

* our training checkpoints (``--save DIR`` of ``pretrain_llama.py`` at any ZeRO stage and TP
  degree: ``DIR/latest`` -> ``iter_XXXXXXX/`` with ``run_config.json``);
* a raw ``engine.save_checkpoint(DIR)`` folder of a ``transformers`` ``LlamaForCausalLM`` (as the
  HF Trainer writes it: ``DIR/latest`` -> ``global_stepN/``, ``config.json`` in ``DIR`` or the tag
  folder), TP=1.

At ZeRO 1-3 the fp32 master weights live only in the optimizer partitions
(``*zero_pp_rank_<d>_mp_rank_<t>_optim_states.pt``, one per DP rank): DeepSpeed's own
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` merges them. It knows
nothing of tensor parallelism (it globs every ``*_optim_states.pt`` of a folder), so each TP rank
``t`` is consolidated from a scratch folder holding links to that rank's files only. At ZeRO-0
(no partitions) the module weights of ``mp_rank_<t>_model_states.pt`` are used.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil
import tempfile

import torch

from megatron_lite.convert.common import Checkpoint, ConversionError

_MP_RE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def resolve_tag_folder(load: str, iteration: int | None) -> str:
    """The folder holding the DeepSpeed files: ``load`` itself, or what ``load/latest`` names
    (``--iteration N``: ``iter_000000N`` or ``global_stepN``).

    Raises:
        ConversionError: none found.
    """
    from megatron_lite.checkpoint.layout import find_checkpoint, tag_for

    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: " + ("is a file; give the checkpoint folder (the "
                              "--save folder of the run, or one iter_XXXXXXX folder in it)"
                              if os.path.isfile(load) else "no such folder"))
    if glob.glob(os.path.join(load, "*_model_states.pt")):
        return load
    if iteration is not None:
        for tag in (tag_for(iteration), f"global_step{iteration}"):
            if os.path.isdir(os.path.join(load, tag)):
                return os.path.join(load, tag)
        raise ConversionError(f"--iteration {iteration}: neither {tag_for(iteration)} nor "
                              f"global_step{iteration} exists in {load}")
    latest = os.path.join(load, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        cand = os.path.join(load, tag)
        # A raw DeepSpeed tag folder has no manifest; ours are checked for completeness (and
        # fall back to the newest complete one) by find_checkpoint.
        if os.path.isdir(cand) and not os.path.isfile(os.path.join(cand, "run_config.json")):
            return cand
    ours = find_checkpoint(load)
    if ours is not None:
        return ours
    if os.path.isfile(latest):
        raise ConversionError(f"{latest} names {tag}, which is missing or incomplete in {load}")
    raise ConversionError(f"--load {load}: not a DeepSpeed checkpoint (no *_model_states.pt there and "
                          "no 'latest' file naming a tag folder)")


def _tp_ranks(tag_dir: str) -> list[int]:
    ranks = sorted({int(m.group(1)) for f in os.listdir(tag_dir) if (m := _MP_RE.search(f))})
    if not ranks:
        raise ConversionError(f"{tag_dir}: no *mp_rank_XX_model_states.pt files")
    if ranks != list(range(len(ranks))):
        raise ConversionError(f"{tag_dir}: model-state files for TP ranks {ranks}; some are missing")
    return ranks


def consolidate_tp_rank(tag_dir: str, tp_rank: int) -> dict:
    """Full-over-DP state dict of TP rank ``tp_rank``: fp32 master weights at ZeRO 1-3, the
    module weights (training dtype) at ZeRO-0.

    Raises:
        ConversionError: missing or inconsistent partitions (DeepSpeed's message kept).
    """
    suffix = f"mp_rank_{tp_rank:02d}_"
    files = [f for f in os.listdir(tag_dir) if suffix in f and f.endswith("_states.pt")]
    optim = [f for f in files if f.endswith("_optim_states.pt")]
    if not optim:  # ZeRO-0: the module file holds the weights
        path = os.path.join(tag_dir, f"mp_rank_{tp_rank:02d}_model_states.pt")
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: missing (no ZeRO partitions either)")
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    scratch = tempfile.mkdtemp(prefix="convert_zero_")
    try:
        os.makedirs(os.path.join(scratch, "t"))
        for f in files:
            os.symlink(os.path.abspath(os.path.join(tag_dir, f)), os.path.join(scratch, "t", f))
        try:  # zero_to_fp32 prints its progress; keep the converter's output readable
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return get_fp32_state_dict_from_zero_checkpoint(scratch, tag="t")
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise ConversionError(f"{tag_dir}: cannot consolidate the ZeRO partitions of TP rank "
                                  f"{tp_rank}: {e}") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_deepspeed(load: str, iteration: int | None = None) -> Checkpoint:
    """Consolidate a DeepSpeed checkpoint (ours at any TP, or a raw HF-model one) into a
    :class:`Checkpoint` with fp32 master weights.

    Raises:
        ConversionError: no checkpoint, no config (run_config.json for ours, config.json for an HF
            model), missing partitions, weights that do not match the config.
    """
    from megatron_lite.convert import hf_io, ours_io
    from megatron_lite.model.hf_adapter import check_hf_state_dict, config_from_hf

    tag_dir = resolve_tag_folder(load, iteration)
    ranks = _tp_ranks(tag_dir)
    if os.path.isfile(os.path.join(tag_dir, "run_config.json")):
        cfg, ts = ours_io.read_run_config(tag_dir)
        tp = cfg.parallel.tensor_model_parallel_size
        if len(ranks) != tp:
            raise ConversionError(f"{tag_dir}: run_config.json says TP={tp} but model-state files "
                                  f"exist for {len(ranks)} TP rank(s)")
        shards = [consolidate_tp_rank(tag_dir, r) for r in ranks]
        ck = ours_io.from_shards(shards, cfg, ts.get("iteration", 0), tag_dir)
        ck.source = f"{tag_dir} (deepspeed, megatron_lite)"
        return ck
    parent = os.path.dirname(os.path.abspath(tag_dir))
    cfg_dir = next((d for d in (tag_dir, parent) if os.path.isfile(os.path.join(d, "config.json"))),
                   None)
    if cfg_dir is None:
        raise ConversionError(f"{tag_dir}: missing config: need run_config.json (megatron_lite) "
                              f"there, or an HF config.json in {tag_dir} or {parent}")
    if len(ranks) != 1:
        raise ConversionError(f"{tag_dir}: {len(ranks)} model-parallel ranks in a raw DeepSpeed "
                              "checkpoint of an HF model; only TP=1 is supported")
    hf_cfg = hf_io.read_hf_config(cfg_dir)
    try:
        mc = config_from_hf(hf_cfg)
        mc.validate(1)
        sd = consolidate_tp_rank(tag_dir, 0)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        state = check_hf_state_dict(sd, mc, where=tag_dir)
    except ConversionError:
        raise
    except ValueError as e:
        raise ConversionError(str(e)) from e
    step = re.search(r"(\d+)$", os.path.basename(tag_dir))
    tok = os.path.join(cfg_dir, "tokenizer.model")
    return Checkpoint(mc, state, tokenizer_model=tok if os.path.isfile(tok) else None,
                      iteration=int(step.group(1)) if step else 0,
                      source=f"{tag_dir} (deepspeed, hf)")
