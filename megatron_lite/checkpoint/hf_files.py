"""Weights of a HuggingFace ``LlamaForCausalLM`` folder, read from disk (no ``transformers``).

Files understood: ``model.safetensors``; ``model.safetensors.index.json`` with its shards;
``pytorch_model.bin`` (single or sharded with ``pytorch_model.bin.index.json``). Two readers:
:func:`read_hf_state_dict` loads every tensor (the converter and the inference tools), and
:class:`LazyHFStateDict` opens safetensors files and reads a tensor only when asked for (CPT: a
rank keeps only its own TP shard of each matrix).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Iterator

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class HFWeightsError(ValueError):
    """An HF folder's weight files are missing or disagree with their index (file named)."""


def has_safetensors(folder: str) -> bool:
    """Whether ``folder`` holds ``model.safetensors`` or a safetensors index."""
    return (os.path.isfile(os.path.join(folder, SINGLE))
            or os.path.isfile(os.path.join(folder, INDEX)))


def _load_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # why: optional dependency, read on demand

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_indexed(folder: str, ipath: str) -> dict[str, torch.Tensor]:
    """Every shard an index names, checked against the index."""
    try:
        with open(ipath) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError) as e:
        raise HFWeightsError(f"{ipath}: not a valid index (need a 'weight_map'): {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise HFWeightsError(f"{ipath} names shard(s) that do not exist: "
                             f"{[os.path.join(folder, m) for m in missing]}")
    out: dict[str, torch.Tensor] = {}
    for fname in files:
        part = _load_file(os.path.join(folder, fname))
        lost = [k for k, v in weight_map.items() if v == fname and k not in part]
        if lost:
            raise HFWeightsError(f"{os.path.join(folder, fname)} lacks {lost[:5]} which "
                                 f"{ipath} places there")
        out.update(part)
    return out


def read_hf_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (stored dtype, CPU): ``model.safetensors``, a sharded
    safetensors index, or ``pytorch_model.bin`` (single or sharded with
    ``pytorch_model.bin.index.json``).

    Raises:
        HFWeightsError: no weights file, an index naming a missing shard (both named), or an
            index entry whose tensor is not in its shard.
    """
    for single, index in ((SINGLE, INDEX), (_BIN, _BIN_INDEX)):
        if os.path.isfile(os.path.join(folder, single)):
            return _load_file(os.path.join(folder, single))
        ipath = os.path.join(folder, index)
        if os.path.isfile(ipath):
            return _read_indexed(folder, ipath)
    raise HFWeightsError(f"{folder}: no weights (expected {SINGLE}, {INDEX}, pytorch_model.bin or "
                         "pytorch_model.bin.index.json)")


def read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    """:func:`read_hf_state_dict` for the inference tools and CPT, with a missing weights file
    reported as ``FileNotFoundError``.

    Raises:
        FileNotFoundError: no weights file in ``folder``.
        HFWeightsError: an index naming a missing shard or a tensor its shard lacks (file named).
    """
    names = (SINGLE, INDEX, _BIN, _BIN_INDEX)
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        raise FileNotFoundError(f"{folder}: no model.safetensors(.index.json) or pytorch_model.bin")
    return read_hf_state_dict(folder)


class LazyHFStateDict(Mapping):
    """HF state dict of a safetensors folder (:func:`has_safetensors`), each tensor read from its
    file when asked for (``safe_open``); iterating lists the names without reading anything."""

    def __init__(self, folder: str):
        from safetensors import safe_open  # why: optional dependency, read on demand

        single = os.path.join(folder, SINGLE)
        if os.path.isfile(single):
            files = {single}
        else:
            with open(os.path.join(folder, INDEX)) as f:
                files = {os.path.join(folder, v) for v in json.load(f)["weight_map"].values()}
        self._where: dict[str, str] = {}
        self._handles = {}
        for path in sorted(files):
            h = self._handles[path] = safe_open(path, framework="pt", device="cpu")
            for k in h.keys():
                self._where[k] = path

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


__all__ = ["HFWeightsError", "INDEX", "LazyHFStateDict", "SINGLE", "has_safetensors",
           "read_hf_state_dict", "read_hf_weights"]
