"""Validation loss and perplexity during training: token-weighted over micro-batches and DP ranks."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megatron_lite import parallel
from megatron_lite.parallel.context_parallel import split_batch_for_context_parallel


def _default_forward(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    # The model contract (docs/interfaces.md): with labels, forward returns the per-token loss
    # [b, s] in fp32, already reduced over the TP group by the vocab-parallel cross entropy.
    return model(batch["tokens"], position_ids=batch.get("position_ids"),
                 cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"),
                 labels=batch["labels"])


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def evaluate(model: Any, data_iterator: Iterator[dict[str, Any]], eval_iters: int, *,
             dp_group: Any = None, device: torch.device | None = None,
             forward_fn: Callable[[Any, dict[str, Any]], torch.Tensor] | None = None
             ) -> dict[str, float | int]:
    """Token-mean validation loss over ``eval_iters`` micro-batches on every DP rank.

    Each micro-batch is a batch dict (docs/interfaces.md): ``tokens``, ``labels``, ``loss_mask``
    ``[b, s]`` and optionally ``position_ids``, ``cu_seqlens``, ``max_seqlen``. The loss of a
    token is weighted by ``loss_mask``; sums of loss and of weights are all-reduced (fp64) over
    the data-parallel group once at the end, so the result equals the loss of the concatenation
    of every rank's micro-batches. With context parallelism each CP rank evaluates its chunks of
    the samples and the sums run over the D x CP group. TP needs nothing here: the model's vocab-parallel loss is
    already complete on every TP rank. The model is put in eval mode and restored afterwards.

    Args:
        model: ``LlamaModel`` (or a DeepSpeed engine wrapping it, or any module honouring the
            model contract). Every rank of the model-parallel group must call this together.
        data_iterator: yields validation micro-batches; an iterator that runs out early ends the
            evaluation early (with a warning), the mean covers what was evaluated.
        eval_iters: micro-batches to evaluate per DP rank.
        dp_group: process group to reduce over (default: the data-parallel group when
            torch.distributed is initialized).
        device: where to move batches (default: the model's parameters' device).
        forward_fn: ``forward_fn(model, batch) -> per-token loss [b, s]`` to override the call.

    Returns:
        ``{"val_loss": nats per token, "val_ppl": exp(val_loss), "tokens": loss tokens
        counted over all DP ranks}``.

    Raises:
        ValueError: ``eval_iters < 1``, or no loss token was evaluated on any rank.
    """
    if eval_iters < 1:
        raise ValueError(f"evaluate: eval_iters must be >= 1 (got {eval_iters}; --eval-iters)")
    forward_fn = forward_fn or _default_forward
    device = device or _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    weight_sum = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    try:
        for _ in range(eval_iters):
            try:
                batch = next(data_iterator)
            except StopIteration:
                warnings.warn(f"evaluate: the validation iterator ran out after {done} of "
                              f"{eval_iters} micro-batches (--eval-iters); the loss covers those")
                break
            batch = split_batch_for_context_parallel(  # this CP rank's chunks (CP = 1: all)
                {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()})
            losses = forward_fn(model, batch).double()
            mask = batch["loss_mask"].to(losses.dtype) if "loss_mask" in batch else \
                (batch["labels"] != -100).to(losses.dtype)
            loss_sum += (losses * mask).sum()
            weight_sum += mask.sum()
            done += 1
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    totals = torch.stack([loss_sum, weight_sum])
    if dist.is_available() and dist.is_initialized():
        group = dp_group if dp_group is not None else \
            parallel.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(totals, group=group)
    loss_total, tokens = float(totals[0]), float(totals[1])
    if tokens <= 0:
        raise ValueError("evaluate: no loss tokens in the validation batches (all loss_mask "
                         "zero, or an empty validation split: check --split / --eval-iters)")
    val_loss = loss_total / tokens
    try:
        ppl = math.exp(val_loss)
    except OverflowError:
        ppl = float("inf")
    return {"val_loss": val_loss, "val_ppl": ppl, "tokens": int(round(tokens))}
