"""megatron_lite checkpoint folders (layout: ``megatron_lite/checkpoint/layout.py``): read
any TP degree into a :class:`Checkpoint`, and write a weights-only ("inference") checkpoint at any
TP degree that ``load_model_for_inference``, ``tools/eval_ppl.py --load`` and
``pretrain_llama.py --load DIR --finetune`` accept.

A written checkpoint is ``DIR/latest`` + ``DIR/iter_XXXXXXX/`` holding, per TP rank ``XX``,
``mp_rank_XX_model_states.pt`` (``{"module": shard state dict, ...}`` as DeepSpeed's engine saves
it, so DeepSpeed's ``load_checkpoint(load_module_only=True)`` reads it), ``trainer_state.json``
(ZeRO stage 0, no optimizer or scheduler state: resume it with ``--finetune``),
``run_config.json`` and ``manifest.json``; the tokenizer is copied to ``DIR/tokenizer.model``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch

from megatron_lite.convert.common import Checkpoint, ConversionError

CONVERTER = "tools/convert_checkpoint.py"


def resolve_checkpoint_folder(load: str, iteration: int | None) -> str:
    """The complete checkpoint folder to read from a ``--save`` folder (``latest``, or
    ``iter_<iteration>``) or a checkpoint folder itself.

    Raises:
        ConversionError: no such folder / no complete checkpoint (manifest missing or a listed file
            missing or of another size).
    """
    from megatron_lite.checkpoint.layout import find_checkpoint, is_complete, tag_for

    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: " + ("is a file; give the checkpoint folder (the "
                              "--save folder of the run, or one iter_XXXXXXX folder in it)"
                              if os.path.isfile(load) else "no such folder"))
    if iteration is not None:
        path = os.path.join(load, tag_for(iteration))
        if not os.path.isdir(path):
            raise ConversionError(f"--iteration {iteration}: {path} does not exist")
        if not is_complete(path):
            raise ConversionError(f"{path}: incomplete checkpoint (manifest.json missing, or a file it "
                                  "lists is missing or truncated)")
        return path
    path = find_checkpoint(load)
    if path is None:
        raise ConversionError(f"--load {load}: no complete megatron_lite checkpoint there (need "
                              "latest + iter_XXXXXXX/manifest.json with every listed file)")
    return path


def read_run_config(path: str):
    """``(RunConfig, trainer_state dict)`` saved in checkpoint folder ``path``.

    Raises:
        ConversionError: run_config.json / trainer_state.json missing or unreadable.
    """
    from megatron_lite.config import RunConfig

    rc = os.path.join(path, "run_config.json")
    if not os.path.isfile(rc):
        raise ConversionError(f"{rc}: missing; cannot tell the model architecture")
    try:
        with open(rc) as f:
            cfg = RunConfig.from_dict(json.load(f)["config"], source=rc)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{rc}: unreadable ({e})") from e
    ts_path = os.path.join(path, "trainer_state.json")
    ts = {}
    if os.path.isfile(ts_path):
        with open(ts_path) as f:
            ts = json.load(f)
    return cfg, ts


def _shard_file(path: str, tp_rank: int) -> tuple[str, bool]:
    z3 = os.path.join(path, f"model_tp_{tp_rank:02d}.pt")
    if os.path.isfile(z3):
        return z3, False
    return os.path.join(path, f"mp_rank_{tp_rank:02d}_model_states.pt"), True


def read_ours(load: str, iteration: int | None = None) -> Checkpoint:
    """A megatron_lite checkpoint (any TP, any ZeRO stage) as a :class:`Checkpoint`.

    Weights are the module weights the training saved (at bf16/fp16 training: the 16-bit copy;
    ``--load-format deepspeed`` reads the fp32 master weights of ZeRO checkpoints instead).

    Raises:
        ConversionError: no complete checkpoint, a missing shard file (named), shards that do not
            fit the saved config.
    """
    path = resolve_checkpoint_folder(load, iteration)
    cfg, ts = read_run_config(path)
    tp = cfg.parallel.tensor_model_parallel_size
    shards = []
    for r in range(tp):
        f, wrapped = _shard_file(path, r)
        if not os.path.isfile(f):
            raise ConversionError(f"{f}: missing (weights of TP rank {r} of {tp})")
        sd = torch.load(f, map_location="cpu", weights_only=False)
        shards.append(sd["module"] if wrapped else sd)
    return from_shards(shards, cfg, ts.get("iteration", 0), path)


def from_shards(shards: list, cfg, iteration: int, path: str) -> Checkpoint:
    """:class:`Checkpoint` from our TP shard state dicts (rank order) and their ``RunConfig``.

    Raises:
        ConversionError: shards inconsistent with the config (key/shape named) or an invalid config.
    """
    from megatron_lite.model import hf_adapter

    mc = copy.deepcopy(cfg.model)
    try:
        mc.validate(len(shards))
        full = hf_adapter.megatron_lite_to_hf(shards, mc)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from e
    tok = cfg.data.tokenizer_model or None
    notes = []
    if tok and not os.path.isfile(tok):
        notes.append(f"the run's tokenizer {tok} (--tokenizer-model in run_config.json) does not "
                     "exist from here; pass --tokenizer-model to ship one")
        tok = None
    return Checkpoint(mc, full, run_config=cfg.to_dict(), tokenizer_model=tok,
                      iteration=int(iteration or 0), source=f"{path} (megatron_lite)", notes=notes)


def model_flags(mc) -> list[str]:
    """``pretrain_llama.py`` flags that rebuild architecture ``mc`` (what ``--load DIR --finetune``
    of a converted checkpoint must be given: the loader refuses a different model)."""
    c = copy.deepcopy(mc).resolve()
    flags = ["--hidden-size", c.hidden_size, "--num-layers", c.num_layers,
             "--num-attention-heads", c.num_attention_heads, "--num-query-groups", c.num_query_groups,
             "--ffn-hidden-size", c.ffn_hidden_size, "--vocab-size", c.vocab_size,
             "--max-position-embeddings", c.max_position_embeddings,
             "--norm-epsilon", c.norm_epsilon, "--rotary-base", c.rotary_base,
             "--init-method-std", c.init_method_std,
             "--make-vocab-size-divisible-by", c.make_vocab_size_divisible_by]
    if c.kv_channels:
        flags += ["--kv-channels", c.kv_channels]
    if c.tie_word_embeddings:
        flags.append("--tie-word-embeddings")
    if c.rope_scaling_type != "none":
        flags += ["--rope-scaling-type", c.rope_scaling_type,
                  "--rope-scaling-factor", c.rope_scaling_factor]
    return [str(f) for f in flags]


def write_ours(ckpt: Checkpoint, out_dir: str, final_dir: str, tp: int) -> str:
    """Write ``ckpt`` as a weights-only megatron_lite checkpoint at TP degree ``tp``.

    Args:
        ckpt: the checkpoint (tensors keep their dtype).
        out_dir: the (empty) staging folder written into.
        final_dir: where ``out_dir`` will be renamed to (recorded as the tokenizer's path).
        tp: target TP degree.

    Returns:
        The checkpoint folder name (``iter_XXXXXXX``).

    Raises:
        ConversionError: the model cannot be split ``tp`` ways (heads, KV groups or FFN not
            divisible: the message names the flag).
    """
    from megatron_lite.config import RunConfig
    from megatron_lite.model import hf_adapter
    from megatron_lite.checkpoint.layout import library_versions, tag_for, write_manifest

    mc = copy.deepcopy(ckpt.model_config)
    try:
        mc.validate(tp)
    except ValueError as e:
        raise ConversionError(f"--target-tp {tp}: {e}") from e
    cfg = RunConfig.from_dict(ckpt.run_config) if ckpt.run_config else RunConfig()
    cfg.model = mc
    cfg.parallel.tensor_model_parallel_size = tp
    d = cfg.derived
    d.world_size, d.data_parallel_size = tp, 1
    d.padded_vocab_size, d.head_dim = mc.padded_vocab_size(tp), mc.head_dim
    if ckpt.tokenizer_model:
        shutil.copyfile(ckpt.tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
        cfg.data.tokenizer_model = os.path.join(os.path.abspath(final_dir), "tokenizer.model")
    tag = tag_for(ckpt.iteration)
    ck = os.path.join(out_dir, tag)
    os.makedirs(ck)
    for r in range(tp):
        sd = hf_adapter.hf_to_megatron_lite(ckpt.state, mc, r, tp)
        torch.save({"module": sd, "dp_world_size": 1, "mp_world_size": tp,
                    "global_steps": ckpt.iteration, "skipped_steps": 0, "converted_by": CONVERTER},
                   os.path.join(ck, f"mp_rank_{r:02d}_model_states.pt"))
    trainer_state = {"iteration": ckpt.iteration, "consumed_samples": 0, "skipped_steps": 0,
                     "consecutive_skipped": 0, "data_state": None, "scheduler": None,
                     "world_size": tp, "data_parallel_size": 1, "tensor_model_parallel_size": tp,
                     "zero_stage": 0, "weights_only": True,
                     "converted_from": ckpt.source, "converted_by": CONVERTER}
    with open(os.path.join(ck, "trainer_state.json"), "w") as f:
        json.dump(trainer_state, f, indent=1)
    with open(os.path.join(ck, "run_config.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "versions": library_versions()}, f, indent=1, default=str)
    write_manifest(ck)
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write(tag + "\n")
    return tag
