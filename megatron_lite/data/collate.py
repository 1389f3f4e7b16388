"""Collate per-sample dicts into the micro-batch format of docs/interfaces.md ("Batch")."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch


def collate_samples(samples: List[dict]) -> Dict[str, object]:
    """Stack ``b`` samples of ``s`` tokens into one micro-batch.

    Args:
        samples: dicts from :class:`~megatron_lite.data.gpt_dataset.GPTDataset` /
            :class:`~megatron_lite.data.blended.BlendedDataset`.

    Returns:
        ``tokens``/``labels``/``position_ids`` int64 ``[b, s]``, ``loss_mask`` float32 ``[b, s]``,
        ``cu_seqlens`` int32 ``[n+1]`` (segment starts in the flattened ``b*s`` stream: every row
        starts a segment, plus the per-sample document starts), ``max_seqlen`` int,
        ``sample_ids``/``dataset_ids`` int64 ``[b]``.

    Raises:
        ValueError: empty list or samples of different lengths.
    """
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    s = len(samples[0]["tokens"])
    if any(len(x["tokens"]) != s for x in samples):
        raise ValueError("samples in a micro-batch must all have seq_length tokens")

    def stack(key, dtype):
        return torch.from_numpy(np.stack([np.asarray(x[key]) for x in samples]).astype(dtype, copy=False))

    cu = [np.asarray(x["cu_seqlens"], dtype=np.int64)[:-1] + row * s for row, x in enumerate(samples)]
    cu = np.concatenate(cu + [np.array([len(samples) * s])])
    return {
        "tokens": stack("tokens", np.int64),
        "labels": stack("labels", np.int64),
        "loss_mask": stack("loss_mask", np.float32),
        "position_ids": stack("position_ids", np.int64),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(np.diff(cu).max()),
        "sample_ids": torch.tensor([int(x["sample_id"]) for x in samples], dtype=torch.int64),
        "dataset_ids": torch.tensor([int(x["dataset_id"]) for x in samples], dtype=torch.int64),
    }
