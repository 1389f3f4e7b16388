"""Checkpoint conversion between megatron_lite (any TP degree), HuggingFace ``LlamaForCausalLM``
folders and DeepSpeed ZeRO training checkpoints (``tools/convert_checkpoint.py`` is the CLI).

Every reader produces a :class:`Checkpoint` (full tensors, HF names, true vocabulary); every writer
takes one. TP splitting/merging, vocab padding and the fused q/k/v and gate/up layouts are
``megatron_lite.model.hf_adapter``'s. Output is written into ``<save>.tmp_*`` and renamed into
place only when complete: a failed conversion writes nothing.
"""

from __future__ import annotations

import copy

from megatron_lite.convert.common import (DTYPES, Checkpoint, ConversionError, cast_state,
                                          check_save_target, parse_size, staged_folder)

LOAD_FORMATS = ("megatron_lite", "hf", "deepspeed")
SAVE_FORMATS = ("megatron_lite", "hf")


def load_checkpoint(load: str, load_format: str, iteration: int | None = None) -> Checkpoint:
    """Read ``load`` in ``load_format`` (see :data:`LOAD_FORMATS`).

    Raises:
        ConversionError: unknown format or bad input (the message names the file).
    """
    from megatron_lite.convert import deepspeed_io, hf_io, ours_io

    if load_format == "hf":
        if iteration is not None:
            raise ConversionError("--iteration applies to megatron_lite/deepspeed checkpoints, not "
                                  "to an HF folder")
        return hf_io.read_hf(load)
    if load_format == "megatron_lite":
        return ours_io.read_ours(load, iteration)
    if load_format == "deepspeed":
        return deepspeed_io.read_deepspeed(load, iteration)
    raise ConversionError(f"--load-format {load_format!r}: choose one of {LOAD_FORMATS}")


def _check_tokenizer(ckpt: Checkpoint) -> None:
    """The tokenizer must exist and fit the model's vocabulary (ids < vocab_size)."""
    import os

    path = ckpt.tokenizer_model
    if not path:
        return
    if not os.path.isfile(path):
        raise ConversionError(f"tokenizer {path} does not exist (--tokenizer-model)")
    import sentencepiece as spm

    try:
        n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    except Exception as e:  # noqa: BLE001 - sentencepiece raises plain RuntimeError/OSError
        raise ConversionError(f"tokenizer {path}: not a SentencePiece model ({e})") from e
    if n > ckpt.model_config.vocab_size:
        raise ConversionError(f"tokenizer {path} has {n} pieces but the model's vocabulary has "
                              f"{ckpt.model_config.vocab_size} rows: wrong tokenizer")


def convert(load: str, save: str, load_format: str, save_format: str, target_tp: int | None = None,
            dtype: str | None = None, max_shard_size: str | int = "5GB",
            tokenizer_model: str | None = None, iteration: int | None = None,
            force: bool = False) -> dict:
    """Convert one checkpoint; see ``tools/convert_checkpoint.py --help`` for the flags.

    Args:
        load, save: input and output folders.
        load_format, save_format: see :data:`LOAD_FORMATS` / :data:`SAVE_FORMATS`.
        target_tp: TP degree of a megatron_lite output (default: the source's, 1 for HF).
        dtype: ``fp32``/``bf16``/``fp16`` for the written tensors (default: keep the source's).
        max_shard_size: HF output: largest safetensors file (``5GB``, ``500MB``, bytes).
        tokenizer_model: SentencePiece model to ship with the output (default: the source's).
        iteration: which checkpoint of a ``--save`` folder to read (default: latest).
        force: replace a non-empty ``save``.

    Returns:
        ``{"save": path, "notes": [str], "tp": int | None, "iteration": int}``.

    Raises:
        ConversionError: any bad input; nothing is written then.
    """
    from megatron_lite.convert import hf_io, ours_io

    if save_format not in SAVE_FORMATS:
        raise ConversionError(f"--save-format {save_format!r}: choose one of {SAVE_FORMATS}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    if target_tp is not None and target_tp < 1:
        raise ConversionError(f"--target-tp must be >= 1 (got {target_tp})")
    if target_tp is not None and save_format != "megatron_lite":
        raise ConversionError("--target-tp applies to --save-format megatron_lite only (HF folders "
                              "hold full tensors)")
    shard_bytes = parse_size(max_shard_size)
    check_save_target(save, force)  # fail before reading a large checkpoint
    ckpt = load_checkpoint(load, load_format, iteration)
    if tokenizer_model:
        ckpt.tokenizer_model = tokenizer_model
    _check_tokenizer(ckpt)
    ckpt.state = cast_state(ckpt.state, DTYPES[dtype] if dtype else None)
    tp = None
    if save_format == "megatron_lite":
        tp = target_tp or (ckpt.run_config or {}).get("parallel", {}).get(
            "tensor_model_parallel_size", 1)
        try:  # refuse an impossible TP degree before creating anything
            copy.deepcopy(ckpt.model_config).validate(tp)
        except ValueError as e:
            raise ConversionError(f"--target-tp {tp}: {e}") from e
    notes: list[str] = [] if tokenizer_model else list(ckpt.notes)
    with staged_folder(save, force) as tmp:
        if save_format == "hf":
            notes += hf_io.write_hf(ckpt, tmp, shard_bytes)
        else:
            ours_io.write_ours(ckpt, tmp, save, tp)
            notes.append("weights only (no optimizer state): train from it with --load "
                         f"{save} --finetune --tp {tp} " + " ".join(ours_io.model_flags(ckpt.model_config)))
    return {"save": save, "notes": notes, "tp": tp, "iteration": ckpt.iteration,
            "source": ckpt.source}


__all__ = ["Checkpoint", "ConversionError", "LOAD_FORMATS", "SAVE_FORMATS", "convert",
           "load_checkpoint", "parse_size"]
