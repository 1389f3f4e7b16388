"""Helpers that need the TP attributes of parameters (``tensor_model_parallel``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank, \
    get_tensor_model_parallel_world_size


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True if ``param`` is TP-sharded or this is TP rank 0: summing a statistic over the TP group
    over such parameters counts each replicated parameter (norm weights) exactly once."""
    return bool(getattr(param, "tensor_model_parallel", False)) or get_tensor_model_parallel_rank() == 0


def tensor_parallel_grad_norm(parameters) -> float:
    """Global L2 norm of the gradients of a TP-sharded model, the same at every TP degree.

    sqrt(sum over TP ranks of sum over non-duplicate params of ||grad||^2), computed in fp32 and
    all-reduced over the TP group (DeepSpeed computes the same with ``mpu``; this serves tools and
    tests without it). Data-parallel gradients must already be averaged.

    Args:
        parameters: iterable of this rank's parameters (those without ``.grad`` are skipped).

    Returns:
        The norm as a Python float.
    """
    device = None
    total = None
    for p in parameters:
        if p.grad is None or not param_is_not_tensor_parallel_duplicate(p):
            continue
        sq = p.grad.detach().float().pow(2).sum()
        total = sq if total is None else total + sq
        device = p.grad.device
    if total is None:
        total = torch.zeros((), device=device or "cpu")
    if get_tensor_model_parallel_world_size() > 1:
        total = total.reshape(1).clone()
        dist.all_reduce(total, group=get_tensor_model_parallel_group())
    return float(total.sqrt())
