"""One training step: token-mean loss over the whole global batch, accumulation, skip on non-finite.

Loss normalisation. Let the global batch hold micro-batches ``j`` on DP ranks ``r`` with per-token
losses ``l`` and loss masks ``m``, and ``N = sum_{r,j,t} m`` its loss tokens (all-reduced over DP
before the first backward). The step's objective is the token mean over the whole global batch,

    L = (1 / N) * sum_{r, j, t} m * l,

so micro-batches with different numbers of loss tokens weigh by their tokens and the gradient
equals the one of the concatenated batch (the "per-token loss" of Megatron-LM's
``--calculate-per-token-loss``). DeepSpeed averages gradients over the D data-parallel ranks, so
each rank back-propagates ``D / N * sum_t m * l`` per micro-batch with ``scale_wrt_gas=False``.

Context parallelism (``--context-parallel-size CP``): the CP ranks of a replica read the same
micro-batches and each keeps its chunks of every sample (``parallel/context_parallel.py``), so the
sums above run over the D x CP group (``N`` counts every loss token once) and DeepSpeed averages
over those D x CP ranks: each rank back-propagates ``D CP / N * sum_t m * l`` of its own tokens.

Skipping. If the global loss sum is non-finite on any rank, every rank tells the optimizer to skip
(:class:`~megatron_lite.training.optimizer.GuardedAdamW`); a non-finite gradient found by the
optimizer, or an fp16 overflow found by DeepSpeed, skips too. A skipped step leaves parameters,
optimizer state and the LR schedule untouched, but its data is consumed (the next step reads the
next batch). ``max_skipped_steps`` consecutive skips raise :class:`TooManySkippedSteps`.

Optional behaviour (spike guard, noise scale, fault injection in tests) attaches through the step
hooks of :class:`~megatron_lite.training.callbacks.base.Callback` (``on_lr``,
``on_micro_batch_loss``, ``on_after_backward``, ``on_before_optimizer_step``,
``on_optimizer_step_end``); per-sample loss sums are computed only on steps where a callback asks
for them, so without callbacks the step does no extra work and issues no extra collective.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_lite.errors import TooManySkippedSteps
from megatron_lite.parallel import (comm_timer, get_context_parallel_group, get_context_parallel_world_size,
                                    get_data_parallel_group)
from megatron_lite.parallel.context_parallel import split_batch_for_context_parallel
from megatron_lite.training.callbacks.base import Callback, CallbackList
from megatron_lite.training.train_state import StepResult, TrainState


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a micro-batch to ``device``."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def micro_batch_loss_sum(engine, batch: dict[str, Any]) -> torch.Tensor:
    """Sum over tokens of ``loss_mask * per-token loss`` for one micro-batch (fp32 scalar)."""
    return micro_batch_losses(engine, batch, per_sample=False)[0]


def micro_batch_losses(engine, batch: dict[str, Any], per_sample: bool = True):
    """Masked loss of one micro-batch: ``(sum [], per-sample sums [b], per-sample tokens [b])``.

    The per-sample sums (nats, fp32, detached) and loss-token counts feed the spike capture and
    the noise scale; with ``per_sample=False`` they are None (not computed).
    With context parallelism ``batch`` is this rank's share (its chunks of each sample); the
    per-sample sums and counts are then summed over the CP group, so they are whole samples'.
    """
    per_token = engine(batch["tokens"], position_ids=batch.get("position_ids"),
                       cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"),
                       labels=batch["labels"])
    masked = per_token.float() * batch["loss_mask"].float()
    if not per_sample:
        return masked.sum(), None, None
    sums, tokens = masked.detach().sum(dim=1), batch["loss_mask"].detach().sum(dim=1)
    if get_context_parallel_world_size() > 1:
        both = torch.stack([sums, tokens.to(sums.dtype)])
        dist.all_reduce(both, group=get_context_parallel_group())
        sums, tokens = both[0], both[1].to(tokens.dtype)
    return masked.sum(), sums, tokens


def train_step(engine, optimizer, scheduler, micro_batches: Sequence[dict[str, Any]],
               state: TrainState, max_skipped_steps: int, device: torch.device,
               timers=None, callbacks: Callback | Sequence[Callback] | None = None) -> StepResult:
    """Run one optimizer step over this rank's ``A`` micro-batches.

    Args:
        engine: DeepSpeed engine wrapping the model (gradient_accumulation_steps = A).
        optimizer: the :class:`GuardedAdamW` given to DeepSpeed.
        scheduler: :class:`LRScheduler` (advanced only when the update is applied).
        micro_batches: this rank's ``A`` micro-batch dicts (docs/interfaces.md "Batch").
        state: counters, updated in place (iteration, skipped counters; not consumed_samples).
        max_skipped_steps: abort threshold for consecutive skips.
        device: compute device.
        timers: optional ``Timers`` (megatron_lite.training.timers); the forward/backward and the
            optimizer phases are timed separately when given (and, inside forward/backward,
            each micro-batch's forward and backward).
        callbacks: a :class:`Callback` (e.g. a ``CallbackList``) or a list of them whose step
            hooks run inside the step (the spike guard, the noise-scale estimator, test faults).

    Returns:
        The :class:`StepResult` (same values on every rank).

    Raises:
        TooManySkippedSteps: ``max_skipped_steps`` consecutive skipped steps.
    """
    cb = callbacks if isinstance(callbacks, Callback) else CallbackList(callbacks)
    step = state.iteration + 1
    lr = cb.on_lr(step, optimizer, scheduler.apply())
    want_per_sample = cb.wants_per_sample(step)
    batches = [move_batch(b, device) for b in micro_batches]
    # Each CP rank's chunks of the samples (the batch itself with CP = 1); callbacks see whole samples.
    shares = [split_batch_for_context_parallel(b) for b in batches]
    group = get_data_parallel_group(with_context_parallel=True)
    dp = dist.get_world_size(group) if dist.is_initialized() else 1
    n_tokens = _global_loss_tokens(shares, group, step)
    local_sum = torch.zeros((), dtype=torch.float64, device=device)
    _timer(timers, "forward-backward", "start")
    for j, b in enumerate(batches):
        _timer(timers, "forward", "start")
        s, ps_sum, ps_tok = micro_batch_losses(engine, shares[j], want_per_sample)
        _timer(timers, "forward", "stop")
        s, per_sample = cb.on_micro_batch_loss(step, j, b, s, (ps_sum, ps_tok)
                                               if want_per_sample else None)
        _timer(timers, "backward", "start")
        engine.backward(s * (dp / n_tokens), scale_wrt_gas=False)
        _timer(timers, "backward", "stop")
        local_sum += s.detach().double()
        cb.on_after_backward(step, j, engine, per_sample, n_tokens, dp)
        if j < len(batches) - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    loss, non_finite = _global_loss(local_sum, group, n_tokens, device)
    _timer(timers, "forward-backward", "stop")
    _timer(timers, "optimizer", "start")
    force_skip = cb.on_before_optimizer_step(step, loss, non_finite)
    optimizer.begin_step(force_skip=non_finite or force_skip)
    engine.step()
    _timer(timers, "optimizer", "stop")
    result = StepResult(loss=loss, loss_tokens=n_tokens, lr=lr,
                        grad_norm=_global_grad_norm(engine, optimizer),
                        skipped=optimizer.skipped or not engine.was_step_applied(),
                        loss_scale=fp16_loss_scale(engine) if cfg_fp16(engine) else None)
    state.iteration = step
    cb.on_optimizer_step_end(step, result)
    _count_skip(state, result, scheduler, max_skipped_steps, step)
    return result


def _timer(timers, name: str, what: str) -> None:
    if timers is not None:
        getattr(timers(name), what)()


def _global_loss_tokens(batches: list[dict], group, step: int) -> int:
    """N: loss tokens of the global batch (all-reduced over D x CP before the first backward)."""
    n = torch.stack([b["loss_mask"].float().sum() for b in batches]).sum().double()
    if dist.is_initialized():
        with comm_timer.timed(comm_timer.DP):
            dist.all_reduce(n, group=group)
    n_tokens = int(n.item())
    if n_tokens == 0:
        raise RuntimeError(f"step {step}: the global batch has no loss tokens "
                           "(loss_mask is all zero); check --eod-mask-loss and the data")
    return n_tokens


def _global_loss(local_sum: torch.Tensor, group, n_tokens: int,
                 device: torch.device) -> tuple[float, bool]:
    """(token-mean loss of the global batch, whether it is non-finite on any rank)."""
    if dist.is_initialized():
        with comm_timer.timed(comm_timer.DP):
            dist.all_reduce(local_sum, group=group)
    loss = float(local_sum.item()) / n_tokens
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    if dist.is_initialized():
        with comm_timer.timed(comm_timer.DP):
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # TP ranks agree already; be certain
    return loss, bool(bad.item() > 0)


def _global_grad_norm(engine, optimizer) -> float | None:
    """The pre-clip global grad norm: DeepSpeed's, else our optimizer's (fp32 ZeRO-0)."""
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = getattr(optimizer, "_global_grad_norm", None)
    if torch.is_tensor(grad_norm):
        grad_norm = float(grad_norm.item())
    return grad_norm


def _count_skip(state: TrainState, result: StepResult, scheduler, max_skipped_steps: int,
                step: int) -> None:
    """Skipped-step counters; the schedule advances only on an applied update."""
    if not result.skipped:
        state.consecutive_skipped = 0
        scheduler.advance()
        return
    state.skipped_steps += 1
    state.consecutive_skipped += 1
    if state.consecutive_skipped >= max_skipped_steps:
        raise TooManySkippedSteps(
            f"step {step}: {state.consecutive_skipped} consecutive steps skipped "
            f"(non-finite loss or gradient norm, or loss spikes; last loss {result.loss}, grad "
            f"norm {result.grad_norm}); "
            f"aborting (--max-skipped-steps {max_skipped_steps}). Lower --lr, check the data "
            f"for corrupt samples, or resume from an earlier checkpoint.")


def fp16_loss_scale(engine) -> float:
    """The dynamic loss scale multiplying ``p.grad`` under fp16 (1.0 otherwise)."""
    if not cfg_fp16(engine):
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))


def cfg_fp16(engine) -> bool:
    """Whether the engine runs fp16 with a loss scaler."""
    fn = getattr(engine, "fp16_enabled", None)
    return bool(fn()) if callable(fn) else False


__all__ = ["StepResult", "TooManySkippedSteps", "TrainState", "cfg_fp16", "fp16_loss_scale",
           "micro_batch_loss_sum", "micro_batch_losses", "move_batch", "train_step"]
