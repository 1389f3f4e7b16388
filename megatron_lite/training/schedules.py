"""Learning-rate schedules: the exact LR of every optimizer update, and its resumable state.

**Convention (one for every phase and style).** Steps are numbered from 1; step ``n`` is the
update after which ``n`` updates have been applied (``u = n - 1`` were applied before it; skipped
steps do not count). Step ``n`` uses ``F(n)``, where ``F`` is Megatron-LM's
``OptimizerParamScheduler.get_lr`` evaluated at ``num_steps = n``. With ``W`` the warmup length,
``N`` ``lr_decay_iters``, ``S`` ``lr_wsd_decay_iters``, ``lr_max = --lr``, ``lr_min = --min-lr``,
``lr_0 = --lr-warmup-init``:

    warmup (W > 0 and n <= W):  F(n) = lr_0 + (lr_max - lr_0) * n / W
    constant:                   F(n) = lr_max
    beyond the decay (n > N):   F(n) = lr_min
    inverse-square-root:        F(n) = max(lr_min, lr_max * sqrt(max(W, 1) / n))
    with t = (n - W) / (N - W) in [0, 1]:
      linear:                   F(n) = lr_min + (lr_max - lr_min) * (1 - t)
      cosine:                   F(n) = lr_min + (lr_max - lr_min) * (1 + cos(pi * t)) / 2
      wsd (warmup-stable-decay, Hu et al. 2024 "MiniCPM", section 4): lr_max while n <= N - S,
          then with r = (n - (N - S)) / S, F(n) = lr_min + (lr_max - lr_min) * c(r),
          c = 1 - r (linear), (1 + cos(pi r)) / 2 (cosine), 2 * 0.5**r - 1 (exponential),
          1 - sqrt(r) (minus_sqrt).

So the warmup reaches ``lr_max`` on step ``W`` (held for that one step: ``t = 0`` there), the decay
reaches ``lr_min`` on step ``N`` (the last step when ``N = train_iters``), and ``F`` is the same
function in both phases. ``lr_at_step(n)`` returns ``F(n)``, i.e. Megatron-LM's LR at
``num_steps = n`` exactly (``F(0) = lr_0``). Megatron-LM applies ``F(u)`` to the update with index
``u`` (its scheduler is stepped after the optimizer), so its first update uses ``lr_0``
(typically 0, a wasted step) and its last update of an ``N``-step run stops one step short of
``lr_min``; this module applies ``F(u + 1)`` (:func:`lr_at`), i.e. Megatron-LM's sequence one
step earlier. Decay formulas follow ``OptimizerParamScheduler.get_lr`` and Loshchilov & Hutter
2017 (SGDR, eq. 5) for cosine.

Batch-size ramp-up (``--rampup-batch-size`` / ``--rampup-batch-tokens``): the schedule is counted in
samples (equivalently tokens, = samples x L_ctx), as Megatron-LM does during a ramp, so a small
early batch moves the LR by less than a full-size one. Every length given in steps or tokens
(warmup, ``lr_decay_iters``, the WSD decay) is first resolved to a step count as without a ramp
(tokens -> ``ceil(tokens / GB_tok)`` with the final GB_tok) and then to the samples the ramp
consumes in that many steps, ``W_s = consumed_after(W)``, ``N_s = consumed_after(N)``,
``S_s = N_s - consumed_after(N - S)``. With ``s`` the samples of the updates already applied
(skipped steps do not count) and ``b`` the batch of this update, the update uses ``F`` at the
samples applied after it, ``n = s + b``, with ``W, N, S -> W_s, N_s, S_s`` and
inverse-square-root ``max(lr_min, lr_max * sqrt(max(W_s, GB) / max(n, GB)))`` (GB the final
batch: a constant batch ``b = GB``, ``s = u * GB`` gives the step formulas exactly, and a small
early batch never lifts the LR above ``lr_max``; Megatron-LM's sample-counted form uses 1 for GB). Step ``W`` then ends the warmup at
``lr_max`` and step ``N`` reaches ``lr_min`` with or without a ramp.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_lite.config.batch_ramp import ramp_from_config
from megatron_lite.config.sections import LR_DECAY_STYLES, WSD_DECAY_STYLES


def _lr(n, unit, *, max_lr, min_lr, W, N, S, decay_style, warmup_init,
        wsd_decay_style) -> float:
    """``F(n)`` (module doc): ``n`` updates (or samples) applied after this update, ``unit`` the
    inverse-square-root floor of the warmup length (1 in steps, GB in samples)."""
    if W > 0 and n <= W:
        return warmup_init + (max_lr - warmup_init) * n / W
    if decay_style == "constant":
        return max_lr
    if n > N:
        return min_lr
    delta = max_lr - min_lr
    if decay_style == "inverse-square-root":
        return max(min_lr, max_lr * max(W, unit) ** 0.5 / max(n, unit) ** 0.5)  # Megatron's order
    if decay_style == "wsd":
        start = N - S
        if n <= start:
            return max_lr
        r = (n - start) / S
        coeff = {"linear": lambda: 1.0 - r,
                 "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * r)),
                 "exponential": lambda: 2.0 * 0.5 ** r - 1.0,
                 "minus_sqrt": lambda: 1.0 - math.sqrt(r)}[wsd_decay_style]()
        return min_lr + delta * coeff
    t = (n - W) / (N - W)      # N > W here: n > W and n <= N
    if decay_style == "linear":
        return min_lr + delta * (1.0 - t)
    return min_lr + delta * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine


def lr_at_samples(s: int, b: int, *, max_lr: float, min_lr: float, warmup_samples: int,
                  decay_samples: int, decay_style: str, unit: int, warmup_init: float = 0.0,
                  wsd_decay_samples: int = 0, wsd_decay_style: str = "linear") -> float:
    """LR of an update of ``b`` samples after ``s`` samples of applied updates (batch ramp-up):
    ``F(s + b)`` counted in samples (module doc).

    Args:
        s: samples of the updates already applied (skipped steps excluded).
        b: this update's global batch (samples).
        warmup_samples, decay_samples, wsd_decay_samples: W_s, N_s, S_s (module doc).
        unit: the final global batch GB (samples); the inverse-square-root floor ``max(W_s, GB)``.
        Others as in :func:`lr_at`.

    Raises:
        ValueError: unknown style, inconsistent lengths, s < 0 or b <= 0.
    """
    if s < 0 or b <= 0:
        raise ValueError(f"need samples >= 0 and batch > 0 (got {s}, {b})")
    _check(decay_style, int(warmup_samples), int(decay_samples), int(wsd_decay_samples),
           wsd_decay_style, "samples")
    return _lr(s + b, int(unit), max_lr=max_lr, min_lr=min_lr, W=int(warmup_samples),
               N=int(decay_samples), S=int(wsd_decay_samples), decay_style=decay_style,
               warmup_init=warmup_init, wsd_decay_style=wsd_decay_style)


def _check(decay_style, W, N, S, wsd_decay_style, what="") -> None:
    if decay_style not in LR_DECAY_STYLES:
        raise ValueError(f"lr decay style {decay_style!r} not in {LR_DECAY_STYLES}")
    if W > N:
        raise ValueError(f"warmup ({W}{' ' + what if what else ''}) longer than lr_decay_iters "
                         f"({N}{' ' + what if what else ''})")
    if decay_style == "wsd":
        if not 0 < S <= N - W:
            raise ValueError(f"wsd decay length {S} must be in (0, {N - W}]")
        if wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"wsd decay style {wsd_decay_style!r} not in {WSD_DECAY_STYLES}")


def lr_at_step(n: int, *, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
               decay_style: str, warmup_init: float = 0.0, wsd_decay_iters: int = 0,
               wsd_decay_style: str = "linear") -> float:
    """``F(n)``: the LR of step ``n`` (1-based; ``n`` updates applied after it), which is
    Megatron-LM's ``OptimizerParamScheduler.get_lr`` at ``num_steps = n`` (module doc).

    ``n = 0`` gives ``lr_0`` (Megatron-LM's LR before its first step); the trainer never uses it.

    Raises:
        ValueError: unknown style, inconsistent lengths or n < 0.
    """
    if n < 0:
        raise ValueError(f"step number must be >= 0 (got {n})")
    W, N = int(warmup_iters), int(decay_iters)
    _check(decay_style, W, N, int(wsd_decay_iters), wsd_decay_style)
    return _lr(n, 1, max_lr=max_lr, min_lr=min_lr, W=W, N=N, S=int(wsd_decay_iters),
               decay_style=decay_style, warmup_init=warmup_init, wsd_decay_style=wsd_decay_style)


def lr_at(u: int, *, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
          decay_style: str, warmup_init: float = 0.0, wsd_decay_iters: int = 0,
          wsd_decay_style: str = "linear") -> float:
    """Learning rate of the update with index ``u`` (``u`` updates already applied): step
    ``u + 1``, i.e. ``lr_at_step(u + 1)`` (module doc). ``lr_at(W - 1) = lr_max`` and
    ``lr_at(N - 1) = lr_min``.

    Raises:
        ValueError: unknown style or inconsistent lengths.
    """
    if u < 0:
        raise ValueError(f"update index must be >= 0 (got {u})")
    return lr_at_step(u + 1, max_lr=max_lr, min_lr=min_lr, warmup_iters=warmup_iters,
                      decay_iters=decay_iters, decay_style=decay_style, warmup_init=warmup_init,
                      wsd_decay_iters=wsd_decay_iters, wsd_decay_style=wsd_decay_style)


class LRScheduler:
    """Sets the LR of an optimizer's param groups before each update; resumable.

    State: ``num_updates`` (applied updates) and ``num_samples`` (samples of the applied updates).
    The trainer calls :meth:`apply` before the optimizer step and :meth:`advance` only when the
    step was applied, so a skipped step leaves the schedule where it was. Param groups may carry
    ``lr_mult`` (default 1). With a batch ramp (``ramp`` given) the schedule is counted in samples
    (module doc) and the loop calls :meth:`set_batch` with each step's global batch before it.

    Args:
        optimizer: a torch optimizer (its param groups' ``lr`` is overwritten).
        max_lr, min_lr, warmup_iters, decay_iters, decay_style, warmup_init, wsd_decay_iters,
        wsd_decay_style: as in :func:`lr_at` (lengths in steps).
        ramp: optional :class:`megatron_lite.config.batch_ramp.BatchRamp`; converts the step lengths
            to samples (``ramp.consumed_after``) and switches to the sample-counted schedule.
    """

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int, decay_style: str, warmup_init: float = 0.0,
                 wsd_decay_iters: int = 0, wsd_decay_style: str = "linear", ramp=None):
        self.optimizer = optimizer
        self.params = dict(max_lr=float(max_lr), min_lr=float(min_lr),
                           warmup_iters=int(warmup_iters), decay_iters=int(decay_iters),
                           decay_style=decay_style, warmup_init=float(warmup_init),
                           wsd_decay_iters=int(wsd_decay_iters), wsd_decay_style=wsd_decay_style)
        lr_at(0, **self.params)  # validate now, not at the first step
        self.ramp = ramp
        self.sample_params = None
        if ramp is not None:
            p = self.params
            n_s = ramp.consumed_after(p["decay_iters"])
            wsd = p["wsd_decay_iters"]
            self.sample_params = dict(
                max_lr=p["max_lr"], min_lr=p["min_lr"],
                warmup_samples=ramp.consumed_after(p["warmup_iters"]), decay_samples=n_s,
                decay_style=decay_style, unit=ramp.final, warmup_init=p["warmup_init"],
                wsd_decay_samples=(n_s - ramp.consumed_after(p["decay_iters"] - wsd)) if wsd else 0,
                wsd_decay_style=wsd_decay_style)
            lr_at_samples(0, ramp.batch_at(0), **self.sample_params)
        self.num_updates = 0
        self.num_samples = 0
        self.batch = ramp.batch_at(0) if ramp is not None else None

    @classmethod
    def from_config(cls, optimizer, cfg) -> "LRScheduler":
        """Build from a finalized RunConfig (sample-counted when it has a batch ramp)."""
        d, s, o = cfg.derived, cfg.schedule, cfg.optimizer
        return cls(optimizer, max_lr=o.lr, min_lr=o.min_lr, warmup_iters=d.lr_warmup_iters,
                   decay_iters=d.lr_decay_iters, decay_style=s.lr_decay_style,
                   warmup_init=s.lr_warmup_init, wsd_decay_iters=d.lr_wsd_decay_iters,
                   wsd_decay_style=s.lr_wsd_decay_style, ramp=ramp_from_config(cfg))

    def set_batch(self, batch_samples: int) -> None:
        """Global batch (samples) of the coming update; used by the sample-counted schedule."""
        self.batch = int(batch_samples)

    def get_lr(self) -> float:
        """LR of the next update."""
        if self.sample_params is not None:
            return lr_at_samples(self.num_samples, self.batch, **self.sample_params)
        return lr_at(self.num_updates, **self.params)

    def apply(self) -> float:
        """Write the next update's LR into every param group; returns it."""
        lr = self.get_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def advance(self) -> None:
        """Count one applied update (of the batch last given to :meth:`set_batch`)."""
        self.num_updates += 1
        if self.batch is not None:
            self.num_samples += self.batch

    def state_dict(self) -> dict:
        """``{"num_updates": int, "num_samples": int, **schedule parameters}`` (plus
        ``sample_params`` with a batch ramp)."""
        out = {"num_updates": self.num_updates, "num_samples": self.num_samples, **self.params}
        if self.sample_params is not None:
            out["sample_params"] = dict(self.sample_params)
        return out

    def load_state_dict(self, state: dict, override: bool = False) -> None:
        """Restore ``num_updates``/``num_samples``; the schedule must match unless ``override``.

        Raises:
            ValueError: a schedule parameter (or the ramp's sample lengths) differs from the
                checkpoint's and ``override`` is False (the message lists the differences and
                names --override-opt-param-scheduler).
        """
        diffs = {k: (state[k], v) for k, v in self.params.items() if k in state and state[k] != v}
        old_sp = state.get("sample_params")
        if (old_sp is None) != (self.sample_params is None):
            diffs["batch ramp-up"] = ("on" if old_sp else "off", "on" if self.sample_params
                                      else "off")
        elif old_sp is not None:
            diffs.update({f"ramp {k}": (old_sp[k], v) for k, v in self.sample_params.items()
                          if k in old_sp and old_sp[k] != v})
        if diffs and not override:
            raise ValueError(
                "LR schedule differs from the checkpoint's: " + ", ".join(
                    f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
                + "; pass --override-opt-param-scheduler to use the new schedule from this step")
        self.num_updates = int(state["num_updates"])
        self.num_samples = int(state.get("num_samples", 0))
