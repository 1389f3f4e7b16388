"""Fused Q/K/V projection for GQA with fewer KV groups than TP ranks (g < t, t % g == 0).

TP rank r holds query rows ``[r*nh*d/t, (r+1)*nh*d/t)`` (sharded like any column-parallel
weight) and the K and V rows of the single KV group ``j = r // (t/g)`` its query heads read
(``parallel/kv_groups.py``), replicated on the t/g ranks that share j. The two parameters are

- ``weight`` ``[nh*d/t, H]``: this rank's query shard (``tensor_model_parallel=True``, dim 0);
- ``kv_weight`` ``[2d, H]`` = ``[K_j; V_j]``, identical on the sharing ranks;

and one GEMM multiplies the input by ``[weight; kv_weight]``, so the output is this rank's
``[.., nh*d/t | d | d]`` = ``[Q_r | K_j | V_j]`` as with g >= t.

Gradients. The K/V rows pass through ``copy_to_kv_sharing_region`` (forward identity, backward
all-reduce over the sharing ranks), so ``kv_weight.grad`` is the full gradient of group j (the
sum of every query head's contribution, as at TP = 1) on each replica, whatever the ZeRO stage or
accumulation. The input gradient needs nothing extra: the column-parallel backward sums
``dY_r [weight_r; kv_j]`` over all TP ranks, and the K/V partial products of the ranks sharing j
add up to ``dKV_j kv_j`` because their kv copies are equal.

Grad norm. Split from ``weight`` so that the replicated rows can be counted once:
``kv_weight.tensor_model_parallel`` is True only on the first rank of each sharing group (the
DeepSpeed / ``parallel.utils`` rule then counts each group exactly once over the TP group).

Cost: the concatenated ``[nh*d/t + 2d, H]`` weight is a temporary (kept for backward by autograd
unless the layer is recomputed): one weight-sized copy per layer.
"""

from __future__ import annotations

import torch

from megatron_lite.layers.init import kv_group_replicated_weight
from megatron_lite.layers.linear import ColumnParallelLinear
from megatron_lite.parallel.kv_groups import (copy_to_kv_sharing_region, get_kv_sharing_group, is_first_kv_replica,
                                              kv_group_index, kv_group_replicas)
from megatron_lite.parallel.state import get_tensor_model_parallel_world_size


class KVReplicatedQKVLinear(ColumnParallelLinear):
    """Column-parallel Q with group-replicated K/V in one GEMM (see the module docstring).

    Args:
        input_size: H.
        num_heads: nh (whole model).
        num_groups: g, with g < TP and TP % g == 0.
        head_dim: d.
        init_std: weights ~ N(0, init_std^2), drawn TP-independently in the order Q, K, V (the
            TP = 1 fused weight's order, so the values equal its rows).
        **column_kwargs: passed to :class:`ColumnParallelLinear` (dtype, device, sequence
            parallelism, ...).

    Attributes:
        local_sizes: ``[nh*d/t, d, d]``, the output split.

    Raises:
        ValueError: g >= TP or TP % g != 0.
    """

    def __init__(self, input_size: int, num_heads: int, num_groups: int, head_dim: int, *,
                 init_std: float = 0.02, **column_kwargs):
        tp = get_tensor_model_parallel_world_size()
        if num_groups >= tp or tp % num_groups:
            raise ValueError(f"KVReplicatedQKVLinear needs --num-query-groups {num_groups} < TP {tp} with "
                             f"TP a multiple of it")
        super().__init__(input_size, num_heads * head_dim, init_std=init_std, **column_kwargs)
        self.replicas = kv_group_replicas(num_groups)
        rows = num_groups * head_dim
        self.kv_weight = kv_group_replicated_weight(
            [rows, rows], input_size, num_groups, kv_group_index(num_groups), is_first_kv_replica(num_groups),
            init_std, dtype=self.weight.dtype, device=self.weight.device)
        self.local_sizes = [num_heads * head_dim // tp, head_dim, head_dim]
        # Create the sharing groups now (a collective every rank reaches while building the
        # model), not lazily inside the first forward.
        get_kv_sharing_group(self.replicas)

    def forward_weight(self) -> torch.Tensor:
        """``[Q_r; K_j; V_j]`` ``[nh*d/t + 2d, H]``; K/V gradients summed over the sharing ranks."""
        return torch.cat([self.weight, copy_to_kv_sharing_region(self.kv_weight, self.replicas)], dim=0)

    def extra_repr(self) -> str:
        """Sizes plus the KV replication factor, for ``print(model)``."""
        return super().extra_repr() + f", kv_weight=[{self.kv_weight.shape[0]}, {self.input_size}] x{self.replicas}"
