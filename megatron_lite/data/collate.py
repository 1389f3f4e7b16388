"""Collate per-sample dicts into the micro-batch format of docs/interfaces.md ("Batch")."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch


def collate_samples(samples: List[dict], vocab_size: Optional[int] = None) -> Dict[str, object]:
    """Stack ``b`` samples of ``s`` tokens into one micro-batch.

    Args:
        samples: dicts from :class:`~megatron_lite.data.gpt_dataset.GPTDataset` /
            :class:`~megatron_lite.data.blended.BlendedDataset`.
        vocab_size: the model's true vocabulary size; when given, a token id outside
            ``[0, vocab_size)`` in the inputs or labels is refused. Checked here, on the host,
            with one min/max over the ``[b, s+1]`` ids per micro-batch (no device sync), because
            ids in ``[vocab_size, V_pad)`` would silently hit zero padding rows of the embedding
            and larger ones would index another TP rank's slice or fail deep inside a kernel.

    Returns:
        ``tokens``/``labels``/``position_ids`` int64 ``[b, s]``, ``loss_mask`` float32 ``[b, s]``,
        ``cu_seqlens`` int32 ``[n+1]`` (segment starts in the flattened ``b*s`` stream: every row
        starts a segment, plus the per-sample document starts), ``max_seqlen`` int,
        ``sample_ids``/``dataset_ids`` int64 ``[b]``.

    Raises:
        ValueError: empty list, samples of different lengths, or (with ``vocab_size``) a token
            id out of range, naming the sample and the fix.
    """
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    s = len(samples[0]["tokens"])
    if any(len(x["tokens"]) != s for x in samples):
        raise ValueError("samples in a micro-batch must all have seq_length tokens")

    def stack(key, dtype):
        return torch.from_numpy(np.stack([np.asarray(x[key]) for x in samples]).astype(dtype, copy=False))

    tokens = stack("tokens", np.int64)
    labels = stack("labels", np.int64)
    if vocab_size is not None:
        _check_ids(samples, tokens, labels, int(vocab_size))
    cu = [np.asarray(x["cu_seqlens"], dtype=np.int64)[:-1] + row * s for row, x in enumerate(samples)]
    cu = np.concatenate(cu + [np.array([len(samples) * s])])
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": stack("loss_mask", np.float32),
        "position_ids": stack("position_ids", np.int64),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(np.diff(cu).max()),
        "sample_ids": torch.tensor([int(x["sample_id"]) for x in samples], dtype=torch.int64),
        "dataset_ids": torch.tensor([int(x["dataset_id"]) for x in samples], dtype=torch.int64),
    }


def _check_ids(samples: List[dict], tokens: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> None:
    # Labels are the inputs shifted by one, so together they cover the sample's s + 1 tokens;
    # label -100 (ignored) is allowed.
    hi = max(int(tokens.max()), int(labels.max()))
    lo = min(int(tokens.min()), int(labels[labels != -100].min()) if (labels != -100).any() else 0)
    if hi < vocab_size and lo >= 0:
        return
    bad = (tokens >= vocab_size) | (tokens < 0) | (labels >= vocab_size) | ((labels < 0) & (labels != -100))
    row = int(bad.any(dim=1).nonzero()[0])
    ids = torch.cat([tokens[row][bad[row]], labels[row][bad[row]]])
    raise ValueError(
        f"token id {int(ids.max()) if hi >= vocab_size else int(ids.min())} in sample "
        f"{int(samples[row]['sample_id'])} (dataset {int(samples[row]['dataset_id'])}) is outside "
        f"[0, --vocab-size {vocab_size}): the data was tokenized with a larger vocabulary than the "
        f"model's. Set --vocab-size (or --tokenizer-model) to the tokenizer that made the .bin "
        f"files, or re-run tools/preprocess_data.py with the model's tokenizer")
