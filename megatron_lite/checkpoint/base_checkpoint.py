"""The base checkpoint a continued-pretraining run starts from: a HuggingFace folder or one of
our checkpoints, told apart by :func:`detect_base` (its config only, no weights)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from megatron_lite.checkpoint.layout import find_checkpoint, read_saved_config
from megatron_lite.config import ConfigError, RunConfig
from megatron_lite.model.hf_adapter import config_from_hf


@dataclasses.dataclass
class BaseCheckpoint:
    """A detected base checkpoint.

    Attributes:
        format: ``"hf"`` or ``"megatron_lite"``.
        path: the HF folder, or our resolved checkpoint folder (``iter_XXXXXXX``).
        model: its ``ModelConfig`` (resolved; ``vocab_size`` = the base vocabulary V_base).
        tokenizer_model: tokenizer file it was trained with, when known (else None).
        tp: TP degree it was saved with (1 for HF).
    """

    format: str
    path: str
    model: Any
    tokenizer_model: str | None
    tp: int


def _detect_hf(path: str, where: str) -> BaseCheckpoint:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            model = config_from_hf(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{where}: cannot use {cfg_path} as a LLaMA config ({e})") from None
    tok = os.path.join(path, "tokenizer.model")
    return BaseCheckpoint("hf", path, model.resolve(), tok if os.path.isfile(tok) else None, 1)


def _detect_ours(path: str, where: str) -> BaseCheckpoint:
    ck = find_checkpoint(path)
    if ck is None:
        raise ConfigError(f"{where}: neither a HuggingFace folder (config.json) nor a folder with a "
                          "complete megatron_lite checkpoint (manifest.json)")
    saved = RunConfig.from_dict(read_saved_config(ck), source=os.path.join(ck, "run_config.json"))
    tok = saved.data.tokenizer_model
    return BaseCheckpoint("megatron_lite", ck, saved.model.resolve(),
                          tok if tok and os.path.isfile(tok) else None,
                          saved.parallel.tensor_model_parallel_size)


def detect_base(path: str, fmt: str = "auto") -> BaseCheckpoint:
    """Read the config of a base checkpoint (no weights).

    Args:
        path: HF folder, our ``--save`` folder, or one of our checkpoint folders.
        fmt: ``auto`` (HF when ``config.json`` is there), ``hf`` or ``megatron_lite``.

    Raises:
        ConfigError: path missing, no complete checkpoint, unreadable or unsupported config.
    """
    where = f"--pretrained-checkpoint {path}"
    if not path or not os.path.isdir(path):
        raise ConfigError(f"{where}: folder not found")
    if fmt == "auto":
        fmt = "hf" if os.path.isfile(os.path.join(path, "config.json")) else "megatron_lite"
    if fmt == "hf":
        return _detect_hf(path, where)
    return _detect_ours(path, where)


__all__ = ["BaseCheckpoint", "detect_base"]
