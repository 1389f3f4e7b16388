"""Autograd-aware collectives over the tensor-parallel group (after Megatron-LM ``mappings.py``).

Each function is the identity when TP = 1. The tensor-parallel (TP) ones split/gather along the
LAST dimension; the sequence-parallel (SP) ones along the SEQUENCE dimension, which is dim 1 of
our ``[b, s, H]`` activations (Megatron's ``[s, b, h]`` uses dim 0).

=======================================  ==========================  ==============================
function                                 forward                     backward
=======================================  ==========================  ==============================
copy_to_tensor_model_parallel            identity                    all-reduce (sum) of grad
reduce_from_tensor_model_parallel        all-reduce (sum)            identity
scatter_to_tensor_model_parallel         keep this rank's last-dim   all-gather last dim
                                         slice [..., h/TP]
gather_from_tensor_model_parallel        all-gather last dim         keep this rank's slice
scatter_to_sequence_parallel             keep this rank's slice      all-gather along s
                                         [b, s/TP, ...]
gather_from_sequence_parallel            all-gather along s          reduce-scatter along s (the
                                         [b, s/TP] -> [b, s]         consumer is TP-parallel:
                                                                     partial grads), or keep
                                                                     this rank's slice
reduce_scatter_to_sequence_parallel      reduce-scatter along s      all-gather along s
                                         [b, s] -> [b, s/TP]
=======================================  ==========================  ==============================

``copy``/``reduce`` are conjugate: a column-parallel layer copies its replicated input into the TP
region (each rank's backward contributes a partial input gradient, summed by the all-reduce); a
row-parallel layer sums the partial outputs of its shards in forward and passes the (replicated)
output gradient straight through. With sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2)
the pair becomes all-gather / reduce-scatter along s: an all-reduce is a reduce-scatter followed
by an all-gather, so the communication volume is unchanged while the regions between them
(norms, residual adds, dropout) hold only ``s/TP`` tokens.

gloo has no reduce-scatter: there it is an all-reduce followed by taking this rank's slice (the
same values, TP times the traffic); NCCL uses ``reduce_scatter_tensor``. Every collective here is
timed as :data:`comm_timer.TP`.
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


def _split(x: torch.Tensor, dim: int, what: str, why: str = "") -> torch.Tensor:
    """This TP rank's 1/TP slice of ``x`` along ``dim`` (``what``/``why`` word the error)."""
    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return x
    if x.shape[dim] % tp:
        raise ValueError(f"{what} {x.shape[dim]} is not divisible by tensor-parallel size {tp}{why}")
    return x.chunk(tp, dim=dim)[get_tensor_model_parallel_rank()].contiguous()


def _gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """All TP ranks' ``x`` concatenated along ``dim`` in rank order (no autograd)."""
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
    return torch.cat(parts, dim=dim)


def _split_last(x: torch.Tensor) -> torch.Tensor:
    return _split(x, -1, "last dim")


def _gather_last(x: torch.Tensor) -> torch.Tensor:
    return _gather(x, -1)


SEQUENCE_DIM = 1  # [b, s, H]: the dimension sequence parallelism splits


def _split_seq(x: torch.Tensor) -> torch.Tensor:
    return _split(x, SEQUENCE_DIM, "sequence length", " (sequence parallelism)")


def gather_along_sequence(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``[b, s/TP, ...]`` from every TP rank into ``[b, s, ...]`` (rank order), no autograd."""
    return _gather(x, SEQUENCE_DIM)


def reduce_scatter_along_sequence(x: torch.Tensor) -> torch.Tensor:
    """Sum ``[b, s, ...]`` over the TP group and keep this rank's ``[b, s/TP, ...]``, no autograd.

    NCCL: ``reduce_scatter_tensor`` on the sequence-major copy (it splits dim 0). gloo implements
    no reduce-scatter: all-reduce a copy, then take the slice (same values).
    """
    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return x
    if x.shape[SEQUENCE_DIM] % tp:
        raise ValueError(f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by tensor-parallel "
                         f"size {tp} (sequence parallelism)")
    group = get_tensor_model_parallel_group()
    t0 = comm_timer.begin()
    try:
        if dist.get_backend(group) == "nccl":
            seq_major = x.transpose(0, SEQUENCE_DIM).contiguous()
            out = seq_major.new_empty((seq_major.shape[0] // tp, *seq_major.shape[1:]))
            dist.reduce_scatter_tensor(out, seq_major, group=group)
            return out.transpose(0, SEQUENCE_DIM).contiguous()
        summed = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, group=group)
    finally:
        comm_timer.end(comm_timer.TP, t0)
    return summed.chunk(tp, dim=SEQUENCE_DIM)[get_tensor_model_parallel_rank()].contiguous()


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


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_seq(x)

    @staticmethod
    def backward(ctx, g):
        return gather_along_sequence(g)


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return gather_along_sequence(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.tensor_parallel_output_grad:
            return reduce_scatter_along_sequence(g), None
        return _split_seq(g), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return reduce_scatter_along_sequence(x)

    @staticmethod
    def backward(ctx, g):
        return gather_along_sequence(g)


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


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``[b, s, ...]`` replicated over TP -> this rank's ``[b, s/TP, ...]`` (contiguous block
    ``rank*s/TP .. (rank+1)*s/TP``); backward all-gathers the gradient along s.

    Raises:
        ValueError: s is not divisible by TP.
    """
    return x if get_tensor_model_parallel_world_size() == 1 else _ScatterToSequence.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """This rank's ``[b, s/TP, ...]`` -> ``[b, s, ...]`` (all-gather along s, rank order).

    Args:
        x: the sequence shard.
        tensor_parallel_output_grad: the consumer is tensor-parallel (a column-parallel GEMM, the
            vocab-parallel LM head), so each rank's output gradient is a partial sum: backward
            reduce-scatters it (Megatron's default). False: the gradient is already complete and
            replicated; backward keeps this rank's slice.
    """
    if get_tensor_model_parallel_world_size() == 1:
        return x
    return _GatherFromSequence.apply(x, bool(tensor_parallel_output_grad))


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Partial sums ``[b, s, ...]`` (a row-parallel GEMM's output) -> this rank's slice of their sum
    ``[b, s/TP, ...]``; backward all-gathers the gradient along s.

    Raises:
        ValueError: s is not divisible by TP.
    """
    return x if get_tensor_model_parallel_world_size() == 1 else _ReduceScatterToSequence.apply(x)
