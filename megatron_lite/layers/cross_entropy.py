"""Cross entropy over vocab-parallel logits without gathering the vocabulary (Megatron-LM
``vocab_parallel_cross_entropy``; math: loss = log sum_j exp(z_j - m) - (z_y - m), m = max_j z_j).

Per rank only ``[b, s]``-sized tensors cross the TP group (three all-reduces: max, target logit,
sum of exponentials); the ``[b, s, V_pad/TP]`` logits stay local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel import comm_timer
from megatron_lite.parallel.state import (get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                          get_tensor_model_parallel_world_size)


def reduce_over_tp(x: torch.Tensor, op) -> torch.Tensor:
    """All-reduce ``x`` in place over the TP group with ``op`` (timed as TP communication); the
    identity at TP = 1. Returns ``x``."""
    if get_tensor_model_parallel_world_size() > 1:
        t0 = comm_timer.begin()
        try:
            dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())
        finally:
            comm_timer.end(comm_timer.TP, t0)
    return x


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError for a label outside ``[0, vocab)`` that is not ``ignore_index`` (one
    device-to-host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"vocab_parallel_cross_entropy: label {int(labels[tuple(where)])} at index {where} "
                         f"is outside [0, {vocab}) and is not ignore_index={ignore_index}; check --vocab-size "
                         "against the tokenizer that produced the data")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, vocab_size, inplace):
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        local_v = logits.shape[-1]
        vocab = local_v * tp if vocab_size is None else vocab_size
        check_labels(labels, vocab, ignore_index)
        z = logits.float()
        own = inplace or z is not logits  # z may be modified in place (a copy, or allowed)
        start = rank * local_v
        if vocab < start + local_v:  # this rank holds padded columns: give them zero probability
            pad = torch.arange(start, start + local_v, device=z.device) >= vocab
            z = z.masked_fill_(pad, torch.finfo(torch.float32).min) if own else \
                z.masked_fill(pad, torch.finfo(torch.float32).min)
            own = True
        zmax = z.amax(dim=-1)  # amax: no argmax computed
        reduce_over_tp(zmax, dist.ReduceOp.MAX)
        # In place when z is ours: a [b, s, V_pad/TP] fp32 temporary less per step (the largest
        # tensor of a small model; on CPU a fresh one also costs page faults every step).
        z = z.sub_(zmax.unsqueeze(-1)) if own else z - zmax.unsqueeze(-1)
        not_here = (labels < start) | (labels >= start + local_v)  # includes ignore_index
        local_labels = (labels - start).masked_fill(not_here, 0)
        target = z.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        reduce_over_tp(target, dist.ReduceOp.SUM)
        z.exp_()
        sumexp = z.sum(dim=-1)
        reduce_over_tp(sumexp, dist.ReduceOp.SUM)
        ignored = labels == ignore_index
        loss = (sumexp.log() - target).masked_fill(ignored, 0.0)
        # Kept for backward unnormalised: the 1/sumexp is folded into backward's per-token
        # multiplier, saving a [b, s, V_pad/TP] division pass.
        ctx.save_for_backward(z, sumexp, local_labels, not_here, ignored)
        ctx.in_dtype = logits.dtype
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy backward ran twice (retain_graph=True): its "
                               "softmax buffer is reused in place; recompute the loss instead")
        ctx.backward_done = True
        expz, sumexp, local_labels, not_here, ignored = ctx.saved_tensors
        gl = grad_loss.masked_fill(ignored, 0.0).to(expz.dtype)
        # (softmax - one_hot(label)) * gl = exp(z) * (gl / sumexp) - one_hot * gl, in the saved
        # [b, s, V_pad/TP] buffer instead of a new one (Megatron reuses it too).
        grad = expz.mul_((gl / sumexp).unsqueeze(-1))
        hit = (~not_here).to(grad.dtype)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), (-hit * gl).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                                 vocab_size: int | None = None, inplace: bool = False) -> torch.Tensor:
    """Per-token cross entropy from TP-sharded logits.

    Args:
        logits: ``[b, s, V_pad/TP]`` this rank's vocab slice (any float dtype; computed in fp32).
        labels: ``[b, s]`` int64 global token ids, identical on all TP ranks.
        ignore_index: label value that contributes loss 0 and gradient 0.
        vocab_size: true vocabulary V (<= V_pad). Columns of ids >= V (vocab padding) are excluded
            from the softmax, so the loss does not depend on padding or TP. None: all columns count
            (the LM head of ``LlamaModel`` already masks padded columns).
        inplace: the fp32 logits may be overwritten (with the softmax, reused as the gradient
            buffer), saving a ``[b, s, V_pad/TP]`` temporary. Only for logits nobody else reads
            afterwards and no autograd node saved (``LlamaModel`` passes its LM-head output,
            whose matmul saves only its inputs); default False leaves the caller's logits untouched.

    Returns:
        fp32 loss ``[b, s]`` (0 where ignored). Gradient: softmax - one_hot(label), times upstream.

    Raises:
        ValueError: a label outside ``[0, V)`` that is not ``ignore_index`` (checked on every call;
            this costs one device-to-host sync).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree; "
                         "expected logits [b, s, V_pad/TP] and labels [b, s]")
    return _VocabParallelCrossEntropy.apply(logits, labels, ignore_index, vocab_size, bool(inplace))
