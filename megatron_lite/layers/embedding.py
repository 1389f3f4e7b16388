"""Vocab-parallel token embedding and LM-head logits (Megatron-LM ``VocabParallelEmbedding``).

The padded vocabulary ``V_pad`` (see ``model.config.padded_vocab_size``) is split by rows: rank r
owns token ids ``[r*V_pad/TP, (r+1)*V_pad/TP)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.layers.init import sharded_normal_weight
from megatron_lite.parallel.mappings import (copy_to_tensor_model_parallel_region,
                                             reduce_from_tensor_model_parallel_region,
                                             reduce_scatter_to_sequence_parallel_region)
from megatron_lite.parallel.state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size


class VocabParallelEmbedding(torch.nn.Module):
    """Token embedding with rows split over TP.

    Forward: each rank looks up the ids it owns (others give zeros), then an all-reduce (sum) over
    TP assembles the full ``[b, s, H]`` output; backward: identity for the output gradient, each
    rank accumulates gradients only into its own rows.

    Args:
        num_embeddings: padded vocabulary size ``V_pad`` (divisible by TP).
        embedding_dim: hidden size H.
        num_real_embeddings: true vocabulary size V; rows ``[V, V_pad)`` are padding, zero at init.
        init_std: weight ~ N(0, init_std^2), TP-independent.
        params_dtype, device: parameter dtype/device (``meta`` allowed).
        reduce_scatter_embeddings: sequence parallelism: reduce-scatter the partial lookups along
            the sequence (dim 1) instead of all-reducing them, so the output is this rank's
            ``[b, s/TP, H]`` (Megatron's ``reduce_scatter_embeddings``; backward: all-gather).

    Shapes: weight ``[V_pad/TP, H]`` (``tensor_model_parallel=True``, ``partition_dim=0``).
    Token ids must lie in ``[0, V_pad)``; with TP > 1 an id outside every rank's range embeds to zeros.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, num_real_embeddings: int | None = None,
                 init_std: float = 0.02, params_dtype: torch.dtype = torch.float32, device=None,
                 reduce_scatter_embeddings: bool = False):
        super().__init__()
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        self.reduce_scatter_embeddings = bool(reduce_scatter_embeddings) and tp > 1
        if num_embeddings % tp:
            raise ValueError(f"padded vocab {num_embeddings} is not divisible by TP={tp}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_rank = num_embeddings // tp
        self.vocab_start = rank * self.per_rank
        self.vocab_end = self.vocab_start + self.per_rank
        self.weight = sharded_normal_weight((num_embeddings, embedding_dim), 0, init_std, dtype=params_dtype,
                                            device=device, real_rows=num_real_embeddings)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[b, s]`` int64 -> embeddings ``[b, s, H]`` (replicated across TP), or this rank's
        ``[b, s/TP, H]`` with ``reduce_scatter_embeddings``."""
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(out)
        return reduce_from_tensor_model_parallel_region(out)


def padded_logits_mask(local_vocab: int, vocab_size: int, device) -> torch.Tensor | None:
    """Bool ``[V_pad/TP]`` marking this rank's padded columns (global id >= vocab_size), or None if none."""
    start = get_tensor_model_parallel_rank() * local_vocab
    if start + local_vocab <= vocab_size:
        return None
    return torch.arange(start, start + local_vocab, device=device) >= vocab_size


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int | None = None,
                       copy_input: bool = True) -> torch.Tensor:
    """Vocab-parallel LM head: logits_r = h W_r^T for this rank's vocab rows.

    Args:
        hidden: ``[b, s, H]`` replicated across TP (copied into the TP region here; backward
            all-reduces its gradient).
        weight: ``[V_pad/TP, H]`` (the output layer's or, when tied, the embedding's shard).
        vocab_size: true vocabulary V; columns of padded ids (>= V) are set to the fp32 minimum so
            they receive no probability mass (exp underflows to exactly 0) and no gradient.
        copy_input: copy ``hidden`` into the TP region (backward: all-reduce of its gradient).
            False when ``hidden`` comes from ``gather_from_sequence_parallel_region`` (sequence
            parallelism), whose backward already sums the ranks' partial gradients.

    Returns:
        fp32 logits ``[b, s, V_pad/TP]``.
    """
    if copy_input:
        hidden = copy_to_tensor_model_parallel_region(hidden)
    logits = F.linear(hidden, weight).float()
    if vocab_size is not None:
        mask = padded_logits_mask(weight.shape[0], vocab_size, logits.device)
        if mask is not None:
            logits = logits.masked_fill(mask, torch.finfo(torch.float32).min)
    return logits
