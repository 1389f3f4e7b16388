"""One training step: token-mean loss over the whole global batch, accumulation, skip on non-finite.

Loss normalisation. Let the global batch hold micro-batches ``j`` on DP ranks ``r`` with per-token
losses ``l`` and loss masks ``m``, and ``N = sum_{r,j,t} m`` its loss tokens (all-reduced over DP
before the first backward). The step's objective is the token mean over the whole global batch,

    L = (1 / N) * sum_{r, j, t} m * l,

so micro-batches with different numbers of loss tokens weigh by their tokens and the gradient
equals the one of the concatenated batch (the "per-token loss" of Megatron-LM's
``--calculate-per-token-loss``). DeepSpeed averages gradients over the D data-parallel ranks, so
each rank back-propagates ``D / N * sum_t m * l`` per micro-batch with ``scale_wrt_gas=False``.

Skipping. If the global loss sum is non-finite on any rank, every rank tells the optimizer to skip
(:class:`~megatron_lite.training.optimizer.GuardedAdamW`); a non-finite gradient found by the
optimizer, or an fp16 overflow found by DeepSpeed, skips too. A skipped step leaves parameters,
optimizer state and the LR schedule untouched, but its data is consumed (the next step reads the
next batch). ``max_skipped_steps`` consecutive skips raise :class:`TooManySkippedSteps`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


class TooManySkippedSteps(RuntimeError):
    """Raised on every rank when too many consecutive steps were skipped."""


@dataclasses.dataclass
class TrainState:
    """Counters saved in checkpoints.

    Attributes:
        iteration: steps finished (applied or skipped).
        consumed_samples: training samples read so far (all DP ranks).
        skipped_steps: total skipped steps.
        consecutive_skipped: skipped steps since the last applied one.
        data_state: the blended train dataset's resume state (per-source consumed counts, see
            ``BlendedDataset.state_dict``); None for a single corpus.
    """

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    data_state: Optional[dict] = None


@dataclasses.dataclass
class StepResult:
    """Outcome of one step: ``loss`` (token mean over the global batch, nats), ``loss_tokens``
    (N), ``lr`` used, ``grad_norm`` (None if unknown), ``skipped``, ``loss_scale``."""

    loss: float
    loss_tokens: int
    lr: float
    grad_norm: float | None
    skipped: bool
    loss_scale: float | None


def _nan_injections() -> set[tuple[int, int]]:
    """Test hook: ``MEGATRON_LITE_INJECT_NAN="step:rank,..."`` makes that rank's loss NaN."""
    spec = os.environ.get("MEGATRON_LITE_INJECT_NAN", "")
    out = set()
    for item in filter(None, spec.split(",")):
        step, rank = item.split(":")
        out.add((int(step), int(rank)))
    return out


def _dp_group():
    from megatron_lite.parallel import get_data_parallel_group

    return get_data_parallel_group()


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a micro-batch to ``device``."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def micro_batch_loss_sum(engine, batch: dict[str, Any]) -> torch.Tensor:
    """Sum over tokens of ``loss_mask * per-token loss`` for one micro-batch (fp32 scalar)."""
    per_token = engine(batch["tokens"], position_ids=batch.get("position_ids"),
                       cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"),
                       labels=batch["labels"])
    return (per_token.float() * batch["loss_mask"].float()).sum()


def train_step(engine, optimizer, scheduler, micro_batches: Sequence[dict[str, Any]],
               state: TrainState, max_skipped_steps: int, device: torch.device,
               timers=None) -> StepResult:
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
            optimizer phases are timed separately when given.

    Returns:
        The :class:`StepResult` (same values on every rank).

    Raises:
        TooManySkippedSteps: ``max_skipped_steps`` consecutive skipped steps.
    """
    step_number = state.iteration + 1
    lr = scheduler.apply()
    batches = [move_batch(b, device) for b in micro_batches]
    group = _dp_group()
    dp = dist.get_world_size(group) if dist.is_initialized() else 1
    n = torch.stack([b["loss_mask"].float().sum() for b in batches]).sum().double()
    if dist.is_initialized():
        dist.all_reduce(n, group=group)
    n_tokens = int(n.item())
    if n_tokens == 0:
        raise RuntimeError(f"step {step_number}: the global batch has no loss tokens "
                           "(loss_mask is all zero); check --eod-mask-loss and the data")
    rank = dist.get_rank() if dist.is_initialized() else 0
    inject = (step_number, rank) in _nan_injections()
    local_sum = torch.zeros((), dtype=torch.float64, device=device)
    if timers is not None:
        timers("forward-backward").start()
    for j, b in enumerate(batches):
        s = micro_batch_loss_sum(engine, b)
        if inject and j == 0:
            s = s * float("nan")
        engine.backward(s * (dp / n_tokens), scale_wrt_gas=False)
        local_sum += s.detach().double()
        if j < len(batches) - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    if dist.is_initialized():
        dist.all_reduce(local_sum, group=group)
    loss = float(local_sum.item()) / n_tokens
    bad = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # TP ranks agree already; be certain
    if timers is not None:
        timers("forward-backward").stop()
        timers("optimizer").start()
    optimizer.begin_step(force_skip=bool(bad.item() > 0))
    engine.step()
    if timers is not None:
        timers("optimizer").stop()
    skipped = optimizer.skipped or not engine.was_step_applied()
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = getattr(optimizer, "_global_grad_norm", None)
    if torch.is_tensor(grad_norm):
        grad_norm = float(grad_norm.item())
    scale = None
    if cfg_fp16(engine):
        scale = float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer,
                                                                      "loss_scale", 1.0)))
    state.iteration = step_number
    if skipped:
        state.skipped_steps += 1
        state.consecutive_skipped += 1
        if state.consecutive_skipped >= max_skipped_steps:
            raise TooManySkippedSteps(
                f"step {step_number}: {state.consecutive_skipped} consecutive steps skipped "
                f"(non-finite loss or gradient norm; last loss {loss}, grad norm {grad_norm}); "
                f"aborting (--max-skipped-steps {max_skipped_steps}). Lower --lr, check the data "
                f"for corrupt samples, or resume from an earlier checkpoint.")
    else:
        state.consecutive_skipped = 0
        scheduler.advance()
    return StepResult(loss=loss, loss_tokens=n_tokens, lr=lr, grad_norm=grad_norm,
                      skipped=skipped, loss_scale=scale)


def cfg_fp16(engine) -> bool:
    """Whether the engine runs fp16 with a loss scaler."""
    fn = getattr(engine, "fp16_enabled", None)
    return bool(fn()) if callable(fn) else False
