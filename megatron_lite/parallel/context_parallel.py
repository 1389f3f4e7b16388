"""Context parallelism's load-balanced sequence layout and the per-micro-batch split.

With ``--context-parallel-size CP`` every sample of ``s`` tokens is cut into ``2 CP`` chunks of
``c = s / (2 CP)`` tokens; CP rank ``i`` keeps chunks ``i`` and ``2 CP - 1 - i`` (in that order),
``s / CP`` tokens. Under a causal mask chunk ``j`` attends to ``j + 1`` chunks' worth of keys, so
pairing an early chunk with its mirror gives every rank the same attention work (the layout of
Megatron-core / TransformerEngine's causal context parallelism; with ``CP`` contiguous pieces
the last rank would do ``2 CP - 1`` times the first rank's work).

Every CP rank of a data-parallel replica reads the same micro-batch (the data loader uses the DP
group, ``parallel.state``) and :func:`split_batch_for_context_parallel` keeps its own chunks of
the per-token tensors. The document structure ``cu_seqlens`` (boundaries in the flattened
``b * s`` stream of the WHOLE sequence) is kept whole: ring attention reads it to mask the key /
value chunks of the other CP ranks by global position and document id.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_lite.parallel.state import get_context_parallel_rank, get_context_parallel_world_size

# Batch fields holding one value per token ([b, s]); split along dim 1.
PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def context_parallel_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of ``2 CP``) CP rank ``cp_rank`` holds: ``(i, 2 CP - 1 - i)``."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"CP rank {cp_rank} outside [0, {cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def context_parallel_positions(seq_length: int, cp_size: int, cp_rank: int,
                               device=None) -> torch.Tensor:
    """Global token positions (``0..s-1`` in the whole sequence) of this rank's ``s / CP`` tokens.

    Returns:
        int64 ``[s / CP]``: ``[i c, (i+1) c) ++ [(2CP-1-i) c, (2CP-i) c)`` with ``c = s / (2 CP)``.

    Raises:
        ValueError: ``seq_length`` not divisible by ``2 CP``.
    """
    if seq_length % (2 * cp_size):
        raise ValueError(f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size "
                         f"= {2 * cp_size} (the load-balanced causal layout cuts it in 2 CP chunks)")
    c = seq_length // (2 * cp_size)
    first, second = context_parallel_chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(first * c, (first + 1) * c, device=device),
                      torch.arange(second * c, (second + 1) * c, device=device)])


def split_batch_for_context_parallel(batch: dict[str, Any], cp_size: int | None = None,
                                     cp_rank: int | None = None) -> dict[str, Any]:
    """This CP rank's share of a micro-batch (returned as a new dict; ``batch`` is not changed).

    ``tokens``, ``labels``, ``loss_mask`` and ``position_ids`` (``[b, s]``) keep the columns of
    :func:`context_parallel_positions`; a batch without ``position_ids`` gets the global positions
    (what ``0..s-1`` per row would have been). ``cu_seqlens`` and ``max_seqlen`` stay those of the
    whole sequence (see the module docstring). With CP = 1 the batch is returned unchanged.

    Args:
        batch: a micro-batch dict (docs/interfaces.md "Batch").
        cp_size, cp_rank: default: this process's CP degree and rank (``parallel.state``).

    Raises:
        ValueError: the sequence length is not divisible by ``2 CP``.
    """
    cp = get_context_parallel_world_size() if cp_size is None else cp_size
    if cp == 1:
        return batch
    rank = get_context_parallel_rank() if cp_rank is None else cp_rank
    tokens = batch["tokens"]
    idx = context_parallel_positions(tokens.shape[1], cp, rank, device=tokens.device)
    out = dict(batch)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
    for key in PER_TOKEN_KEYS:
        if out.get(key) is not None:
            out[key] = out[key].index_select(1, idx)
    return out


def local_token_positions(local_length: int, device=None) -> torch.Tensor:
    """Global positions of this process's ``local_length`` tokens: ``0..s-1`` with CP = 1, else
    :func:`context_parallel_positions` of the whole sequence ``local_length x CP``."""
    cp = get_context_parallel_world_size()
    if cp == 1:
        return torch.arange(local_length, device=device)
    return context_parallel_positions(local_length * cp, cp, get_context_parallel_rank(), device=device)
