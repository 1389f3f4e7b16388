"""Shared pieces of the checkpoint converter: the in-memory checkpoint, errors, sizes, dtypes and
the staged (all-or-nothing) output folder.

Every reader returns a :class:`Checkpoint` whose weights are the *full* (un-sharded) tensors under
HuggingFace ``LlamaForCausalLM`` names with the true (unpadded) vocabulary: that is the one layout
every format maps to and from (``megatron_lite.model.hf_adapter`` does the TP split/merge).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConversionError(ValueError):
    """Bad converter input (missing file, wrong shapes, unknown architecture, bad flag)."""


@dataclasses.dataclass
class Checkpoint:
    """A model checkpoint in memory, independent of its on-disk format.

    Attributes:
        model_config: ``megatron_lite.model.model_config.ModelConfig`` of the architecture.
        state: HF name -> full tensor (vocab rows ``[V, h]``, unpadded); when tied,
            ``lm_head.weight`` is absent or the very tensor of ``model.embed_tokens.weight``.
        run_config: the source's ``RunConfig.to_dict()`` (our formats) or None (HF).
        tokenizer_model: path of a SentencePiece ``.model`` that belongs to the weights, or None.
        iteration: training step of the source (0 for HF folders).
        source: a description for messages (path and format).
        notes: things the user should know about the source (printed by the CLI).
    """

    model_config: Any
    state: dict
    run_config: dict | None = None
    tokenizer_model: str | None = None
    iteration: int = 0
    source: str = ""
    notes: list = dataclasses.field(default_factory=list)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``5GB`` (decimal, as HF's ``max_shard_size``), ``512MiB``
    (binary) or a plain integer of bytes.

    Raises:
        ConversionError: unparsable or non-positive size.
    """
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a "
                                  "byte count")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    if n < 1:
        raise ConversionError(f"--max-shard-size must be positive (got {text!r})")
    return n


def cast_state(state: dict, dtype: torch.dtype | None) -> dict:
    """``state`` with floating tensors cast to ``dtype`` (None: unchanged); tensors shared between
    keys (tied embeddings) stay shared."""
    if dtype is None:
        return dict(state)
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, t in state.items():
        if id(t) not in done:
            done[id(t)] = t.to(dtype) if torch.is_floating_point(t) else t
        out[k] = done[id(t)]
    return out


def state_dtype(state: dict) -> torch.dtype:
    """The dtype of the floating tensors of ``state`` (the widest when they are mixed)."""
    dtypes = {t.dtype for t in state.values() if torch.is_floating_point(t)}
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        if dt in dtypes:
            return dt
    return torch.float32


def check_save_target(save: str, force: bool) -> None:
    """Refuse an existing non-empty ``save`` folder unless ``force``.

    Raises:
        ConversionError: ``save`` is empty (an unset shell variable: with ``--force`` it would
            replace the working folder), a file, or a non-empty folder without ``--force``.
    """
    if not str(save).strip():
        raise ConversionError("--save is an empty string (an unset shell variable?); give the "
                              "output folder")
    if os.path.isfile(save):
        raise ConversionError(f"--save {save} is a file; give a folder path")
    if os.path.isdir(save) and os.listdir(save) and not force:
        raise ConversionError(f"--save {save} exists and is not empty; choose a new folder or pass "
                              "--force to replace it")


@contextmanager
def staged_folder(save: str, force: bool) -> Iterator[str]:
    """Yield a fresh ``<save>.tmp_<id>`` folder; on success it replaces ``save``, on any error it is
    deleted (so a failed conversion leaves nothing behind and an old ``save`` untouched).

    Raises:
        ConversionError: see :func:`check_save_target`.
    """
    check_save_target(save, force)   # before abspath: "" must not become the working folder
    save = os.path.abspath(save)
    check_save_target(save, force)
    parent = os.path.dirname(save)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{save}.tmp_{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(save):
        if os.listdir(save):  # --force (checked above): keep the old one until the new is in place
            old = f"{save}.old_{uuid.uuid4().hex[:8]}"
            os.rename(save, old)
        else:
            os.rmdir(save)
    os.rename(tmp, save)
    if old:
        shutil.rmtree(old, ignore_errors=True)
