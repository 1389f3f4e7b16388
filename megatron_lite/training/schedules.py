"""Learning-rate schedules: the exact LR of every optimizer update, and its resumable state.

Let ``u`` be the number of updates already applied (0 for the first step; skipped steps do not
count), ``W`` the warmup length, ``N`` ``lr_decay_iters``, ``lr_max = --lr``, ``lr_min = --min-lr``,
``lr_0 = --lr-warmup-init``. The update with index ``u`` uses

    warmup (u < W):     lr = lr_0 + (lr_max - lr_0) * (u + 1) / W
    after warmup, with progress t = clamp((u - W) / (N - W), 0, 1)   (t = 1 when N == W):
      constant:            lr = lr_max
      linear:              lr = lr_min + (lr_max - lr_min) * (1 - t)
      cosine:              lr = lr_min + (lr_max - lr_min) * (1 + cos(pi * t)) / 2
      inverse-square-root: lr = max(lr_min, lr_max * sqrt(max(W, 1) / (u + 1)))
      wsd (warmup-stable-decay, Hu et al. 2024 "MiniCPM", section 4): lr = lr_max until
          u <= N - S (S = lr_wsd_decay_iters), then with r = (u - (N - S)) / S clamped to [0, 1]
          lr = lr_min + (lr_max - lr_min) * c(r), c = 1 - r (linear), (1 + cos(pi r)) / 2
          (cosine), 2 * 0.5**r - 1 (exponential), 1 - sqrt(r) (minus_sqrt).

The warmup reaches ``lr_max`` on its last step (u = W - 1) rather than starting from ``lr_0``
on the first update as Megatron-LM's ``OptimizerParamScheduler`` does (it evaluates the warmup at
``u / W``, so its first update uses ``lr_0``, typically 0, and is wasted). Decay formulas otherwise
follow ``OptimizerParamScheduler.get_lr`` (Megatron-LM) and Loshchilov & Hutter 2017 (SGDR, eq. 5)
for cosine. Beyond ``N`` the LR stays at ``lr_min`` (``lr_max`` for constant).
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_lite.training.config import LR_DECAY_STYLES, WSD_DECAY_STYLES


def warmup_steps_from(iters: Optional[int], tokens: Optional[int], fraction: Optional[float],
                      global_batch_tokens: int, decay_iters: int) -> int:
    """Warmup length in steps from whichever of the three flags was given (0 if none).

    ``tokens`` -> ceil(tokens / GB_tok); ``fraction`` -> floor(fraction * decay_iters)
    (Megatron-LM's ``--lr-warmup-fraction`` rule).
    """
    if iters is not None:
        return int(iters)
    if tokens is not None:
        return -(-int(tokens) // int(global_batch_tokens))
    if fraction is not None:
        return int(fraction * decay_iters)
    return 0


def lr_at(u: int, *, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
          decay_style: str, warmup_init: float = 0.0, wsd_decay_iters: int = 0,
          wsd_decay_style: str = "linear") -> float:
    """Learning rate of the update with index ``u`` (updates already applied); see module doc.

    Raises:
        ValueError: unknown style or inconsistent lengths.
    """
    if decay_style not in LR_DECAY_STYLES:
        raise ValueError(f"lr decay style {decay_style!r} not in {LR_DECAY_STYLES}")
    if u < 0:
        raise ValueError(f"update index must be >= 0 (got {u})")
    W, N = int(warmup_iters), int(decay_iters)
    if W > N:
        raise ValueError(f"warmup ({W}) longer than lr_decay_iters ({N})")
    if decay_style == "wsd":
        if not 0 < int(wsd_decay_iters) <= N - W:
            raise ValueError(f"wsd decay length {wsd_decay_iters} must be in (0, {N - W}]")
        if wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"wsd decay style {wsd_decay_style!r} not in {WSD_DECAY_STYLES}")
    if u < W:
        return warmup_init + (max_lr - warmup_init) * (u + 1) / W
    delta = max_lr - min_lr
    if decay_style == "constant":
        return max_lr
    if decay_style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(W, 1) / (u + 1)))
    if decay_style == "wsd":
        S = int(wsd_decay_iters)
        start = N - S
        if u <= start:
            return max_lr
        r = min(1.0, (u - start) / S)
        coeff = {"linear": lambda: 1.0 - r,
                 "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * r)),
                 "exponential": lambda: 2.0 * 0.5 ** r - 1.0,
                 "minus_sqrt": lambda: 1.0 - math.sqrt(r)}[wsd_decay_style]()
        return min_lr + delta * coeff
    t = 1.0 if N == W else min(1.0, max(0.0, (u - W) / (N - W)))
    if decay_style == "linear":
        return min_lr + delta * (1.0 - t)
    return min_lr + delta * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine


class LRScheduler:
    """Sets the LR of an optimizer's param groups before each update; resumable.

    State is one integer, ``num_updates`` (applied updates). The trainer calls :meth:`apply` before
    the optimizer step and :meth:`advance` only when the step was applied, so a skipped step leaves
    the schedule where it was. Param groups may carry ``lr_mult`` (default 1).

    Args:
        optimizer: a torch optimizer (its param groups' ``lr`` is overwritten).
        max_lr, min_lr, warmup_iters, decay_iters, decay_style, warmup_init, wsd_decay_iters,
        wsd_decay_style: as in :func:`lr_at`.
    """

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int, decay_style: str, warmup_init: float = 0.0,
                 wsd_decay_iters: int = 0, wsd_decay_style: str = "linear"):
        self.optimizer = optimizer
        self.params = dict(max_lr=float(max_lr), min_lr=float(min_lr),
                           warmup_iters=int(warmup_iters), decay_iters=int(decay_iters),
                           decay_style=decay_style, warmup_init=float(warmup_init),
                           wsd_decay_iters=int(wsd_decay_iters), wsd_decay_style=wsd_decay_style)
        lr_at(0, **self.params)  # validate now, not at the first step
        self.num_updates = 0

    @classmethod
    def from_config(cls, optimizer, cfg) -> "LRScheduler":
        """Build from a finalized RunConfig."""
        d, s, o = cfg.derived, cfg.schedule, cfg.optimizer
        return cls(optimizer, max_lr=o.lr, min_lr=o.min_lr, warmup_iters=d.lr_warmup_iters,
                   decay_iters=d.lr_decay_iters, decay_style=s.lr_decay_style,
                   warmup_init=s.lr_warmup_init, wsd_decay_iters=d.lr_wsd_decay_iters,
                   wsd_decay_style=s.lr_wsd_decay_style)

    def get_lr(self) -> float:
        """LR of the next update."""
        return lr_at(self.num_updates, **self.params)

    def apply(self) -> float:
        """Write the next update's LR into every param group; returns it."""
        lr = self.get_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def advance(self) -> None:
        """Count one applied update."""
        self.num_updates += 1

    def state_dict(self) -> dict:
        """``{"num_updates": int, **schedule parameters}``."""
        return {"num_updates": self.num_updates, **self.params}

    def load_state_dict(self, state: dict, override: bool = False) -> None:
        """Restore ``num_updates``; the schedule parameters must match unless ``override``.

        Raises:
            ValueError: a schedule parameter differs from the checkpoint's and ``override`` is
                False (the message lists the differences and names --override-opt-param-scheduler).
        """
        diffs = {k: (state[k], v) for k, v in self.params.items() if k in state and state[k] != v}
        if diffs and not override:
            raise ValueError(
                "LR schedule differs from the checkpoint's: " + ", ".join(
                    f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
                + "; pass --override-opt-param-scheduler to use the new schedule from this step")
        self.num_updates = int(state["num_updates"])
