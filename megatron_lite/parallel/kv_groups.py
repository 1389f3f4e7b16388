"""KV groups replicated across tensor-parallel ranks (GQA with fewer KV groups g than TP ranks t).

Layout (Megatron-core's for ``num_query_groups < tensor_model_parallel_size``): TP rank r holds the
query heads ``[r*nh/t, (r+1)*nh/t)`` and the one KV group they read, group ``r // (t/g)``; the
``t/g`` consecutive TP ranks ``[j*t/g, (j+1)*t/g)`` hold identical copies of group j's K and V
weights. Each copy receives only the gradient of its own query heads, so the copies' gradients are
summed over those ranks (the "KV-sharing group") before any optimizer sees them;
:func:`copy_to_kv_sharing_region` does that inside autograd (forward identity, backward all-reduce),
which needs no optimizer hook and works with every ZeRO stage and with gradient accumulation.

The sharing groups are created on first use (every rank builds the same model, so every rank asks
for them in the same order, which ``torch.distributed.new_group`` requires) and are keyed by the TP
group object, so a re-initialized TP layout gets fresh groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel import comm_timer
from megatron_lite.parallel.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                          get_tensor_model_parallel_world_size)

# (TP group object, ranks per KV group) -> this rank's KV-sharing group. Holding the TP group keeps
# its identity unique for the lifetime of the cache entry.
_GROUPS: dict = {}


def kv_group_replicas(num_query_groups: int) -> int:
    """Ranks holding each KV group: ``t/g`` when g < t (TP = t), else 1.

    Raises:
        ValueError: g < t and t is not a multiple of g (``ModelConfig.validate`` reports this first).
    """
    tp = get_tensor_model_parallel_world_size()
    if num_query_groups >= tp:
        return 1
    if tp % num_query_groups:
        raise ValueError(f"--tensor-model-parallel-size {tp} is not a multiple of --num-query-groups "
                         f"{num_query_groups}")
    return tp // num_query_groups


def kv_group_index(num_query_groups: int) -> int:
    """Index of the KV group this TP rank's query heads read when g < t: ``tp_rank // (t/g)``."""
    return get_tensor_model_parallel_rank() // kv_group_replicas(num_query_groups)


def is_first_kv_replica(num_query_groups: int) -> bool:
    """True on the first rank of each KV-sharing group: where a replicated KV weight is counted in
    global statistics (grad norm), so that each group counts exactly once over the TP group."""
    return get_tensor_model_parallel_rank() % kv_group_replicas(num_query_groups) == 0


def get_kv_sharing_group(replicas: int):
    """Process group of the ``replicas`` consecutive TP ranks sharing this rank's KV group; None
    when ``replicas`` is 1 or torch.distributed / the TP groups are not initialized.

    Collective on first call for a given ``replicas``: every rank of the world creates every
    sharing group (of every TP group) in the same order.
    """
    tp_group = get_tensor_model_parallel_group()
    if replicas == 1 or tp_group is None or not dist.is_initialized():
        return None
    key = (tp_group, replicas)
    if key not in _GROUPS:
        # Learn every TP group's members in TP-rank order (not assuming which global ranks form a
        # TP group), then cut each into blocks of `replicas` consecutive TP ranks.
        me = (tuple(sorted(dist.get_process_group_ranks(tp_group))), get_tensor_model_parallel_rank(),
              dist.get_rank())
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        members: dict = {}
        for tp_ranks, tp_rank, rank in everyone:
            members.setdefault(tp_ranks, {})[tp_rank] = rank
        mine = None
        for tp_ranks in sorted(members):
            ordered = [members[tp_ranks][i] for i in sorted(members[tp_ranks])]
            for start in range(0, len(ordered), replicas):
                ranks = ordered[start:start + replicas]
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = group
        _GROUPS[key] = mine
    return _GROUPS[key]


class _CopyToKVSharing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, group):
        ctx.group = group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()   # clone: all_reduce is in place, grad may be shared
        t0 = comm_timer.begin()
        try:
            dist.all_reduce(grad, group=ctx.group)
        finally:
            comm_timer.end(comm_timer.TP, t0)
        return grad, None


def copy_to_kv_sharing_region(w: torch.Tensor, replicas: int) -> torch.Tensor:
    """Forward identity; backward all-reduce (sum) of the gradient over the ``replicas`` TP ranks
    that hold this KV group (Megatron's treatment of replicated parameters). The identity when
    ``replicas`` is 1.

    Args:
        w: a replicated KV weight (any shape), identical on the sharing ranks.
        replicas: ``kv_group_replicas(g)``.
    """
    group = get_kv_sharing_group(replicas)
    return w if group is None else _CopyToKVSharing.apply(w, group)
