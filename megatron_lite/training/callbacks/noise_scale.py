"""Gradient noise scale B_simple during training (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A.1).

For a gradient estimated on a batch of B tokens, E[|G_B|^2] = |G|^2 + tr(Sigma) / B, where G is the
true gradient and Sigma the per-token gradient covariance. Two batch sizes B_small < B_big give
the unbiased estimators (eq. A.2 and A.3):

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each is smoothed with an exponential moving average (decay ``--noise-scale-ema``, bias-corrected
as in Adam) before the ratio B_simple = tr(Sigma) / |G|^2, which estimates the critical batch size
B_crit (in tokens: both batch sizes here count loss tokens).

The two batch sizes training already has:

* B_small: one micro-batch on one DP rank, before accumulation and reduction. Its gradient of the
  token-mean loss is read from ``p.grad`` (or DeepSpeed's ``p.grad_accum``) right after the first
  micro-batch's backward (rescaled
  from the trainer's ``D / N`` loss normalisation, see :mod:`megatron_lite.training.step`), its
  squared norm TP-aware (sharded parameters summed over TP, replicated ones once) and averaged over
  the DP ranks; B_small is the harmonic mean of the ranks' loss tokens (E|G_B|^2 is linear in 1/B).
  One all-reduce of two numbers over the world group, on measurement steps only.
* B_big: the global batch (N loss tokens). Its squared norm is the pre-clip global grad norm the
  optimizer computes anyway (DeepSpeed's, or ours at fp32 ZeRO-0), so it costs nothing.

Supported: ZeRO stage 0 and 1 without optimizer offload, with at least 2 micro-batches per rank
(A >= 2) on every step; with a batch ramp-up (``--rampup-batch-size``/``--rampup-batch-tokens``)
A follows the ramp, so its first batch must already give A >= 2 (refused at parse time
otherwise). B_big is then each step's own global batch. At A = 1 DeepSpeed reduces the only micro-batch's gradient at the boundary backward, and
at ZeRO-2/3 (or with offload) its backward hooks reduce and partition every micro-batch's gradient,
so the per-rank micro-batch gradient never exists whole in ``p.grad``; those runs are refused with
a message pointing to ``tools/noise_scale_estimator.py`` (offline, any checkpoint). The criterion
also needs the global norm, computed only when clipping is on (``--clip-grad`` > 0).

With ``--noise-scale-interval 0`` (default) no estimator exists and training does no extra work.
The estimator is a :class:`~megatron_lite.training.callbacks.base.Callback`: ``on_after_backward``
reads B_small after the first micro-batch, ``on_optimizer_step_end`` combines it with the global
norm into ``StepResult.noise``, ``log_scalars`` adds the latest values to every step's record.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_lite.parallel import get_data_parallel_world_size, get_tensor_model_parallel_rank
from megatron_lite.training.callbacks.base import Callback
from megatron_lite.training.step import fp16_loss_scale


def unbiased_estimates(b_small: float, g2_small: float, b_big: float,
                       g2_big: float) -> tuple[float, float]:
    """McCandlish et al. (2018) eq. A.2 / A.3 from squared norms at two batch sizes.

    Args:
        b_small, b_big: batch sizes (any unit, e.g. tokens), ``b_small < b_big``.
        g2_small, g2_big: squared gradient norms measured at those batch sizes.

    Returns:
        ``(|G|^2, tr(Sigma))`` estimates (tr(Sigma) in squared-norm x batch-unit).

    Raises:
        ValueError: ``b_small >= b_big``.
    """
    if not b_small < b_big:
        raise ValueError(f"noise scale needs B_small < B_big (got {b_small}, {b_big})")
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScaleEstimator(Callback):
    """EMA-smoothed B_simple from (micro-batch, global-batch) squared gradient norms.

    Args:
        interval: measure every this many steps (> 0).
        ema: EMA decay per measurement, in [0, 1).
    """

    def __init__(self, interval: int, ema: float = 0.95):
        self.interval, self.beta = int(interval), float(ema)
        self.ema_g2 = 0.0
        self.ema_trace = 0.0
        self.count = 0
        self._small: Optional[tuple[float, float]] = None  # (harmonic-mean B_small, mean |g|^2)
        self.last: dict = {}

    def wants(self, step: int) -> bool:
        """Whether ``step`` (1-based) is a measurement step."""
        return step % self.interval == 0

    # ---- hooks ----------------------------------------------------------------------------
    def wants_per_sample(self, step: int) -> bool:
        """Measurement steps need the first micro-batch's loss tokens."""
        return self.wants(step)

    def on_after_backward(self, step: int, j: int, engine, per_sample, n_tokens: int,
                          dp: int) -> None:
        """B_small: the first micro-batch's gradient, before the second backward adds to it."""
        if j != 0 or not self.wants(step):
            return
        # p.grad = d(dp/N * S_0): rescale to the token-mean gradient of this micro-batch.
        n0 = max(int(per_sample[1].sum().item()), 1)
        self.measure_small(engine.module.parameters(),
                           n_tokens / (dp * n0) / fp16_loss_scale(engine), n0)

    def on_optimizer_step_end(self, step: int, result) -> None:
        """B_big: the global batch's norm (dropped when the step was skipped)."""
        if self.wants(step):
            result.noise = self.measure_big(step, None if result.skipped else result.grad_norm,
                                            result.loss_tokens)

    def log_scalars(self) -> dict:
        """The latest measurement's values (kept between measurement steps)."""
        return {k: v for k, v in self.last.items() if k != "noise_scale/step"}

    @torch.no_grad()
    def measure_small(self, params: Iterable[torch.nn.Parameter], grad_scale: float,
                      loss_tokens: int, micro_batches: Optional[int] = None) -> None:
        """Read this rank's first micro-batch gradient from ``p.grad`` (collective, world group).

        Args:
            params: the model's parameters (this rank's TP shards).
            grad_scale: factor turning ``p.grad`` into the gradient of that micro-batch's
                token-mean loss: ``N / (D * n_0)`` divided by the fp16 loss scale, if any.
            loss_tokens: n_0, the micro-batch's loss tokens on this rank.
            micro_batches: A of this step (for the error message; a ramp changes it per step).

        Raises:
            RuntimeError: no parameter holds a gradient; the message names the cause (A = 1 at
                this step, or a configuration that reduces in backward hooks).
        """
        tp_rank = get_tensor_model_parallel_rank()
        sq, seen, device = None, False, torch.device("cpu")
        for p in params:
            # ZeRO-1 with bf16 parameters and fp32 gradient accumulation parks the accumulated
            # gradient in ``p.grad_accum`` (DeepSpeed's use_grad_accum_attribute) instead.
            grad = p.grad if p.grad is not None else getattr(p, "grad_accum", None)
            if grad is None:
                continue
            seen, device = True, grad.device
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                s = grad.detach().float().pow(2).sum()
                sq = s if sq is None else sq + s
        if not seen:
            if micro_batches is not None and micro_batches < 2:
                raise RuntimeError(
                    f"noise scale: no parameter holds a gradient after the first micro-batch: "
                    f"this step has A = {micro_batches} micro-batch per rank (e.g. early in a "
                    f"--rampup-batch-size/--rampup-batch-tokens ramp), and DeepSpeed reduces the "
                    f"only micro-batch's gradient inside its backward; give A >= 2 on every step "
                    f"or --noise-scale-interval 0")
            raise RuntimeError("noise scale: no parameter holds a gradient after the first "
                               "micro-batch (this DeepSpeed configuration reduces gradients in "
                               "backward hooks: ZeRO-2/3 or offload); use --zero-stage 0/1 "
                               "without offload or --noise-scale-interval 0")
        sq = torch.zeros((), device=device) if sq is None else sq
        # Every TP rank adds its shards' part; only TP rank 0 adds the batch's 1/n_0 (once per
        # DP rank), so a world SUM gives sum over DP of |g_r|^2 and of 1/n_r.
        inv_n = 1.0 / loss_tokens if tp_rank == 0 else 0.0
        t = torch.stack([sq.double() * grad_scale ** 2,
                         torch.tensor(inv_n, dtype=torch.float64, device=device)])
        if dist.is_initialized():
            dist.all_reduce(t)
        d = get_data_parallel_world_size()
        mean_sq, mean_inv = float(t[0]) / d, float(t[1]) / d
        self._small = (1.0 / mean_inv, mean_sq)

    def measure_big(self, step: int, grad_norm: Optional[float], loss_tokens: int) -> dict:
        """Combine with the global batch's pre-clip norm and update the EMAs.

        Args:
            step: the step measured.
            grad_norm: pre-clip global grad norm of the token-mean loss (None/non-finite: the
                measurement is dropped).
            loss_tokens: N, the global batch's loss tokens.

        Returns:
            The scalars to log (empty when nothing was measured): ``noise_scale/b_simple``
            (tokens), ``noise_scale/g2`` (|G|^2), ``noise_scale/trace_sigma`` (tr(Sigma), per
            token), plus the raw inputs ``noise_scale/g2_small``, ``noise_scale/g2_big``,
            ``noise_scale/b_small``, ``noise_scale/b_big`` (tokens).
        """
        small, self._small = self._small, None
        if small is None or grad_norm is None or not math.isfinite(grad_norm):
            return {}
        b_small, g2_small = small
        g2_big = float(grad_norm) ** 2
        g2, trace = unbiased_estimates(b_small, g2_small, float(loss_tokens), g2_big)
        self.update(g2, trace)
        self.last = dict(self.values(), **{
            "noise_scale/g2_small": g2_small, "noise_scale/g2_big": g2_big,
            "noise_scale/b_small": b_small, "noise_scale/b_big": float(loss_tokens),
            "noise_scale/step": step})
        return self.last

    def update(self, g2: float, trace: float) -> None:
        """Fold one (|G|^2, tr(Sigma)) estimate into the EMAs."""
        self.ema_g2 = self.beta * self.ema_g2 + (1 - self.beta) * g2
        self.ema_trace = self.beta * self.ema_trace + (1 - self.beta) * trace
        self.count += 1

    def values(self) -> dict:
        """Bias-corrected EMAs and their ratio (the correction cancels in B_simple)."""
        if not self.count:
            return {}
        corr = 1 - self.beta ** self.count
        g2, trace = self.ema_g2 / corr, self.ema_trace / corr
        return {"noise_scale/b_simple": trace / g2 if g2 != 0 else float("nan"),
                "noise_scale/g2": g2, "noise_scale/trace_sigma": trace}

    def state_dict(self) -> dict:
        """EMAs and measurement count (saved beside checkpoints for an exact resume)."""
        return {"ema_g2": self.ema_g2, "ema_trace": self.ema_trace, "count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.ema_g2, self.ema_trace = float(sd["ema_g2"]), float(sd["ema_trace"])
        self.count = int(sd["count"])
