"""Cross entropy over vocab-parallel logits without gathering the vocabulary (Megatron-LM
``vocab_parallel_cross_entropy``; math: loss = log sum_j exp(z_j - m) - (z_y - m), m = max_j z_j).

Per rank only ``[b, s]``-sized tensors cross the TP group (three all-reduces: max, target logit,
sum of exponentials); the ``[b, s, V_pad/TP]`` logits stay local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                          get_tensor_model_parallel_world_size)


def _reduce(x: torch.Tensor, op) -> torch.Tensor:
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())
    return x


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"vocab_parallel_cross_entropy: label {int(labels[tuple(where)])} at index {where} "
                         f"is outside [0, {vocab}) and is not ignore_index={ignore_index}; check --vocab-size "
                         "against the tokenizer that produced the data")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, vocab_size):
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        local_v = logits.shape[-1]
        vocab = local_v * tp if vocab_size is None else vocab_size
        _check_labels(labels, vocab, ignore_index)
        z = logits.float()
        start = rank * local_v
        if vocab < start + local_v:  # this rank holds padded columns: give them zero probability
            pad = torch.arange(start, start + local_v, device=z.device) >= vocab
            z = z.masked_fill(pad, torch.finfo(torch.float32).min)
        zmax = z.max(dim=-1).values
        _reduce(zmax, dist.ReduceOp.MAX)
        z = z - zmax.unsqueeze(-1)  # new tensor: the caller's logits are left untouched
        not_here = (labels < start) | (labels >= start + local_v)  # includes ignore_index
        local_labels = (labels - start).masked_fill(not_here, 0)
        target = z.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        _reduce(target, dist.ReduceOp.SUM)
        z.exp_()
        sumexp = z.sum(dim=-1)
        _reduce(sumexp, dist.ReduceOp.SUM)
        ignored = labels == ignore_index
        loss = (sumexp.log() - target).masked_fill(ignored, 0.0)
        z.div_(sumexp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(z, local_labels, not_here, ignored)
        ctx.in_dtype = logits.dtype
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy backward ran twice (retain_graph=True): its "
                               "softmax buffer is reused in place; recompute the loss instead")
        ctx.backward_done = True
        softmax, local_labels, not_here, ignored = ctx.saved_tensors
        grad = softmax  # reuse the [b, s, V_pad/TP] buffer instead of allocating another (Megatron does too)
        hit = (~not_here).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -hit)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross entropy from TP-sharded logits.

    Args:
        logits: ``[b, s, V_pad/TP]`` this rank's vocab slice (any float dtype; computed in fp32).
        labels: ``[b, s]`` int64 global token ids, identical on all TP ranks.
        ignore_index: label value that contributes loss 0 and gradient 0.
        vocab_size: true vocabulary V (<= V_pad). Columns of ids >= V (vocab padding) are excluded
            from the softmax, so the loss does not depend on padding or TP. None: all columns count
            (the LM head of ``LlamaModel`` already masks padded columns).

    Returns:
        fp32 loss ``[b, s]`` (0 where ignored). Gradient: softmax - one_hot(label), times upstream.

    Raises:
        ValueError: a label outside ``[0, V)`` that is not ``ignore_index`` (checked on every call;
            this costs one device-to-host sync).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree; "
                         "expected logits [b, s, V_pad/TP] and labels [b, s]")
    return _VocabParallelCrossEntropy.apply(logits, labels, ignore_index, vocab_size)
