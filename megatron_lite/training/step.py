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

Optional per-step extras, each absent (no extra work, no extra collective) unless given:
``spike_guard`` (:mod:`megatron_lite.training.callbacks.spike_guard`: the loss criterion is decided here
before the update, the grad-norm criterion inside ``engine.step`` through the guard's gate; a spike
is skipped like a NaN step) and ``noise_scale`` (:mod:`megatron_lite.training.callbacks.noise_scale`: on its
measurement steps the first micro-batch's gradient norm is read before the second backward).
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
        extras: JSON-safe state of optional step companions (spike-guard windows, noise-scale
            EMAs: ``step_extras.extras_state``), saved in trainer_state.json with the counters
            so one atomic checkpoint holds everything a resume needs; None when none is on.
    """

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    data_state: Optional[dict] = None
    extras: Optional[dict] = None


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
    spike: Optional[dict] = None
    spike_samples: Optional[list] = None
    noise: Optional[dict] = None


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
    return micro_batch_losses(engine, batch, per_sample=False)[0]


def micro_batch_losses(engine, batch: dict[str, Any], per_sample: bool = True):
    """Masked loss of one micro-batch: ``(sum [], per-sample sums [b], per-sample tokens [b])``.

    The per-sample sums (nats, fp32, detached) and loss-token counts feed the spike capture and
    the noise scale; with ``per_sample=False`` they are None (not computed).
    """
    per_token = engine(batch["tokens"], position_ids=batch.get("position_ids"),
                       cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"),
                       labels=batch["labels"])
    masked = per_token.float() * batch["loss_mask"].float()
    if not per_sample:
        return masked.sum(), None, None
    return masked.sum(), masked.detach().sum(dim=1), batch["loss_mask"].detach().sum(dim=1)


def train_step(engine, optimizer, scheduler, micro_batches: Sequence[dict[str, Any]],
               state: TrainState, max_skipped_steps: int, device: torch.device,
               timers=None, spike_guard=None, noise_scale=None) -> StepResult:
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
        spike_guard: optional :class:`~megatron_lite.training.callbacks.spike_guard.SpikeGuard` whose gate
            is installed on ``optimizer``; a flagged step is skipped and returned with ``spike``
            (criterion, value, window stats) and ``spike_samples`` (this rank's records).
        noise_scale: optional
            :class:`~megatron_lite.training.callbacks.noise_scale.NoiseScaleEstimator`; on its
            measurement steps ``noise`` holds the scalars to log.

    Returns:
        The :class:`StepResult` (same values on every rank).

    Raises:
        TooManySkippedSteps: ``max_skipped_steps`` consecutive skipped steps.
    """
    step_number = state.iteration + 1
    lr = scheduler.apply()
    inject_scale = 1.0
    if spike_guard is not None:
        mult = spike_guard.lr_multiplier()
        if mult != 1.0:  # --spike-lr-factor after a rollback: on top of the schedule's LR
            for g in optimizer.param_groups:
                g["lr"] *= mult
            lr *= mult
        inject_scale = spike_guard.injection_scale(step_number)
    measure = noise_scale is not None and noise_scale.wants(step_number)
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
    per_sample = []
    for j, b in enumerate(batches):
        s, ps_sum, ps_tok = micro_batch_losses(engine, b, spike_guard is not None or measure)
        if inject and j == 0:
            s = s * float("nan")
        if inject_scale != 1.0:  # test hook: a "bad batch" scales loss and gradient
            s = s * inject_scale
            ps_sum = ps_sum * inject_scale if ps_sum is not None else None
        if spike_guard is not None:
            per_sample.append((ps_sum, ps_tok))
        engine.backward(s * (dp / n_tokens), scale_wrt_gas=False)
        local_sum += s.detach().double()
        if measure and j == 0:
            # p.grad = d(dp/N * S_0): rescale to the token-mean gradient of this micro-batch.
            n0 = max(int(ps_tok.sum().item()), 1)
            noise_scale.measure_small(engine.module.parameters(),
                                      n_tokens / (dp * n0) / _fp16_scale(engine), n0,
                                      len(batches))
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
    force_skip = bool(bad.item() > 0)
    spike = None
    if spike_guard is not None:
        spike = None if force_skip else spike_guard.check_loss(loss)
        if force_skip or spike is not None:
            spike_guard.disarm()
        else:
            spike_guard.arm()  # the grad-norm criterion runs inside engine.step
    optimizer.begin_step(force_skip=force_skip or spike is not None)
    engine.step()
    if timers is not None:
        timers("optimizer").stop()
    if spike_guard is not None:
        spike = spike or spike_guard.gate_fired
        spike_guard.disarm()
    skipped = optimizer.skipped or not engine.was_step_applied() or spike is not None
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = getattr(optimizer, "_global_grad_norm", None)
    if torch.is_tensor(grad_norm):
        grad_norm = float(grad_norm.item())
    if spike is not None and spike["criterion"] == "grad_norm":
        grad_norm = spike["value"]  # the gate's reading (our optimizer never ran its own)
    scale = None
    if cfg_fp16(engine):
        scale = float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer,
                                                                      "loss_scale", 1.0)))
    state.iteration = step_number
    noise = None
    if measure:
        noise = noise_scale.measure_big(step_number, None if skipped else grad_norm, n_tokens)
    spike_samples = None
    if spike is not None:
        from megatron_lite.training.callbacks.spike_guard import per_sample_records

        spike_guard.spikes += 1
        spike = dict(spike, step=step_number)
        spike_samples = [r for j, (b, (ps, pt)) in enumerate(zip(batches, per_sample))
                         for r in per_sample_records(b, ps, pt, j)]
    elif spike_guard is not None and not skipped:
        spike_guard.accept(loss, grad_norm)
    if skipped:
        state.skipped_steps += 1
        state.consecutive_skipped += 1
        if state.consecutive_skipped >= max_skipped_steps:
            raise TooManySkippedSteps(
                f"step {step_number}: {state.consecutive_skipped} consecutive steps skipped "
                f"(non-finite loss or gradient norm, or loss spikes; last loss {loss}, grad norm "
                f"{grad_norm}); "
                f"aborting (--max-skipped-steps {max_skipped_steps}). Lower --lr, check the data "
                f"for corrupt samples, or resume from an earlier checkpoint.")
    else:
        state.consecutive_skipped = 0
        scheduler.advance()
    return StepResult(loss=loss, loss_tokens=n_tokens, lr=lr, grad_norm=grad_norm,
                      skipped=skipped, loss_scale=scale, spike=spike, spike_samples=spike_samples,
                      noise=noise)


def _fp16_scale(engine) -> float:
    """The dynamic loss scale multiplying ``p.grad`` under fp16 (1.0 otherwise)."""
    if not cfg_fp16(engine):
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))


def cfg_fp16(engine) -> bool:
    """Whether the engine runs fp16 with a loss scaler."""
    fn = getattr(engine, "fp16_enabled", None)
    return bool(fn()) if callable(fn) else False
