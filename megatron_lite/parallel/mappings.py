"""Autograd-aware collectives over the tensor-parallel group (after Megatron-LM ``mappings.py``).

Each function is the identity when TP = 1. All split/gather along the LAST dimension.

=================================  ==========================  ==========================
function                           forward                      backward
=================================  ==========================  ==========================
copy_to_tensor_model_parallel      identity                     all-reduce (sum) of grad
reduce_from_tensor_model_parallel  all-reduce (sum)             identity
scatter_to_tensor_model_parallel   keep this rank's last-dim    all-gather last dim
                                   slice [..., h/TP]
gather_from_tensor_model_parallel  all-gather last dim          keep this rank's slice
=================================  ==========================  ==========================

``copy``/``reduce`` are conjugate: a column-parallel layer copies its replicated input into the TP
region (each rank's backward contributes a partial input gradient, summed by the all-reduce); a
row-parallel layer sums the partial outputs of its shards in forward and passes the (replicated)
output gradient straight through.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel import comm_timer
from megatron_lite.parallel.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                          get_tensor_model_parallel_world_size)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    t0 = comm_timer.begin()
    try:
        dist.all_reduce(x, group=get_tensor_model_parallel_group())
    finally:
        comm_timer.end(comm_timer.TP, t0)
    return x


def _split_last(x: torch.Tensor) -> torch.Tensor:
    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return x
    if x.shape[-1] % tp:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by tensor-parallel size {tp}")
    return x.chunk(tp, dim=-1)[get_tensor_model_parallel_rank()].contiguous()


def _gather_last(x: torch.Tensor) -> torch.Tensor:
    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp)]
    t0 = comm_timer.begin()
    try:
        dist.all_gather(parts, x, group=get_tensor_model_parallel_group())
    finally:
        comm_timer.end(comm_timer.TP, t0)
    return torch.cat(parts, dim=-1)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone())


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        # clone: all_reduce is in place and x may be needed by autograd elsewhere.
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last(x)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last(x)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward identity; backward all-reduce(sum) over TP. x: any shape, replicated across TP."""
    return x if get_tensor_model_parallel_world_size() == 1 else _Copy.apply(x)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Forward all-reduce(sum) of partial results over TP; backward identity."""
    return x if get_tensor_model_parallel_world_size() == 1 else _Reduce.apply(x)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., h] -> this rank's [..., h/TP]; backward all-gathers the gradient."""
    return x if get_tensor_model_parallel_world_size() == 1 else _Scatter.apply(x)


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """[..., h/TP] per rank -> [..., h] (rank order); backward keeps this rank's gradient slice."""
    return x if get_tensor_model_parallel_world_size() == 1 else _Gather.apply(x)
