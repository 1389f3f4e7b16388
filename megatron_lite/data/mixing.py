"""Mixing controls of a blend: share bounds, per-corpus epoch caps, loss-aware re-weighting.

* Share bounds ``lo_i <= w_i <= hi_i`` (``--data-share-bounds NAME:LO:HI``, or a stage's
  ``bounds`` key in ``--data-stages``): weights are replaced by their Euclidean projection onto the
  bounded simplex ``{x : lo <= x <= hi, sum x = 1}`` (:func:`project_bounded_simplex`).
* Epoch caps (``--data-max-epochs N``): corpus ``i`` gives at most ``N * B_i`` samples (``B_i`` its
  samples per epoch); when it has given them its weight is set to 0 and the others are renormalised
  (proportional redistribution), then projected onto the bounds again
  (:func:`effective_weights`; the walk itself is in :mod:`megatron_lite.data.blended`).
* Online re-weighting (``--mixing-update online``): the exponentiated-gradient step of DoReMi
  (Xie et al. 2023, Alg. 1) on per-corpus held-out losses (:func:`exponentiated_gradient_step`);
  the online data mixing of Albalak et al. 2023 is the same multiplicative update on a bandit's
  loss reward.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def parse_share_bounds(specs: Optional[Sequence[str]], names: Sequence[str],
                       flag: str = "--data-share-bounds") -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``['NAME:LO:HI', ...]`` -> ``(lo [n], hi [n])`` float64 in corpus order; unnamed corpora get
    ``[0, 1]``. ``LO`` or ``HI`` may be empty (``web::0.5`` = no lower bound).

    Raises:
        ValueError: one line naming ``flag``: malformed entry, unknown or repeated name, a bound
            outside [0, 1], ``LO > HI``, lower bounds summing above 1 or upper bounds below 1.
    """
    if not specs:
        return None
    n = len(names)
    lo, hi, seen = np.zeros(n), np.ones(n), set()
    for spec in specs:
        parts = str(spec).rsplit(":", 2)
        if len(parts) != 3:
            raise ValueError(f"{flag} {spec!r}: expected NAME:LO:HI (e.g. web:0.1:0.6)")
        name, a, b = parts
        if name not in names:
            raise ValueError(f"{flag} {spec!r}: unknown corpus {name!r}; corpora are {list(names)}")
        if name in seen:
            raise ValueError(f"{flag}: corpus {name!r} is bounded twice")
        seen.add(name)
        try:
            la, hb = float(a) if a else 0.0, float(b) if b else 1.0
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: LO and HI must be numbers in [0, 1]") from None
        if not (0.0 <= la <= 1.0 and 0.0 <= hb <= 1.0) or la > hb:
            raise ValueError(f"{flag} {spec!r}: bounds must satisfy 0 <= LO <= HI <= 1")
        k = list(names).index(name)
        lo[k], hi[k] = la, hb
    check_bounds_feasible(lo, hi, flag)
    return lo, hi


def check_bounds_feasible(lo: np.ndarray, hi: np.ndarray, flag: str) -> None:
    """Raises ValueError (naming ``flag``) when ``sum lo > 1`` or ``sum hi < 1``."""
    if lo.sum() > 1 + 1e-12:
        raise ValueError(f"{flag}: lower bounds sum to {lo.sum():.6g} > 1; no mix can meet them")
    if hi.sum() < 1 - 1e-12:
        raise ValueError(f"{flag}: upper bounds sum to {hi.sum():.6g} < 1; no mix can meet them")


def project_bounded_simplex(w: Sequence[float], lo: Optional[np.ndarray] = None,
                            hi: Optional[np.ndarray] = None) -> np.ndarray:
    """Euclidean projection of ``w`` onto ``{x : lo <= x <= hi, sum x = 1}``.

    The projection is ``x_i = clip(w_i - tau, lo_i, hi_i)`` with the scalar ``tau`` for which the
    sum is 1 (KKT conditions of ``min ||x - w||^2``); ``sum_i clip(w_i - tau)`` is piecewise linear
    and non-increasing in ``tau`` with breakpoints ``w_i - lo_i``, ``w_i - hi_i``, so ``tau`` is
    found exactly on the segment between two breakpoints.

    Args:
        w: ``[n]`` weights (any real values).
        lo, hi: ``[n]`` bounds (default 0 and 1).

    Returns:
        ``[n]`` float64.

    Raises:
        ValueError: ``sum lo > 1`` or ``sum hi < 1`` (empty feasible set).
    """
    w = np.asarray(w, np.float64)
    lo = np.zeros_like(w) if lo is None else np.asarray(lo, np.float64)
    hi = np.ones_like(w) if hi is None else np.asarray(hi, np.float64)
    check_bounds_feasible(lo, hi, "share bounds")

    def total(t: float) -> float:
        return float(np.clip(w - t, lo, hi).sum())

    bps = np.unique(np.concatenate([w - lo, w - hi]))
    # total(bps[0]) = sum hi >= 1 and total(bps[-1]) = sum lo <= 1: a crossing lies between.
    k = int(np.searchsorted(-np.array([total(t) for t in bps]), -1.0, side="left"))
    k = min(max(k, 1), len(bps) - 1) if len(bps) > 1 else 0
    t0, t1 = bps[k - 1] if k else bps[0], bps[k]
    f0, f1 = total(t0), total(t1)
    t = t0 if f0 == f1 else t0 + (f0 - 1.0) * (t1 - t0) / (f0 - f1)
    x = np.clip(w - t, lo, hi)
    return x / x.sum()   # removes the last ulp of rounding; x.sum() is 1 up to it


def effective_weights(weights: np.ndarray, exhausted: np.ndarray,
                      bounds: Optional[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Weights a blend walk uses: exhausted corpora (epoch cap reached) get 0 and the rest are
    renormalised (their weight is redistributed proportionally), then projected onto the share
    bounds with ``lo = hi = 0`` for the exhausted ones.

    When the remaining corpora's upper bounds sum below 1 the upper bounds are dropped (the run must
    read something); when their lower bounds sum above 1 they are scaled to sum to 1.

    Raises:
        ValueError: every corpus with a positive weight is exhausted.
    """
    w = np.where(exhausted, 0.0, np.asarray(weights, np.float64))
    if w.sum() <= 0:
        live = ~exhausted
        if not live.any():
            raise ValueError("--data-max-epochs: every corpus has been read its maximum number of "
                             "epochs; raise --data-max-epochs or add data")
        w = live.astype(np.float64)   # only zero-weight corpora remain: spread evenly over them
    w = w / w.sum()
    if bounds is None:
        return w
    lo = np.where(exhausted, 0.0, bounds[0])
    hi = np.where(exhausted, 0.0, bounds[1])
    if hi.sum() < 1:
        hi = np.where(exhausted, 0.0, 1.0)
    if lo.sum() > 1:
        lo = lo / lo.sum()
    return project_bounded_simplex(w, lo, hi)


def exponentiated_gradient_step(alpha: np.ndarray, excess: np.ndarray, eta: float, smoothing: float,
                                bounds: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
    """One DoReMi domain-weight update (Xie et al. 2023, Alg. 1, steps 3-4).

    ``a = alpha * exp(eta * max(excess, 0))``, ``a /= sum a``, ``a = (1 - c) a + c / n``, then the
    projection onto the share bounds (so the bounds hold exactly for the weights used).

    Args:
        alpha: ``[n]`` current weights (sum 1).
        excess: ``[n]`` per-corpus held-out loss minus the reference loss (nats per token);
            negative values count as 0 (DoReMi clips the excess loss at 0).
        eta: step size (``--mixing-eta``).
        smoothing: ``c`` in [0, 1] (``--mixing-smoothing``).
        bounds: ``(lo, hi)`` or None.

    Returns:
        ``[n]`` float64 new weights.
    """
    alpha = np.asarray(alpha, np.float64)
    lam = np.maximum(np.asarray(excess, np.float64), 0.0)
    with np.errstate(divide="ignore"):
        logits = np.log(alpha) + eta * lam
    logits -= logits[np.isfinite(logits)].max()   # exp without overflow; a 0 weight stays 0
    a = np.exp(logits)
    a /= a.sum()
    a = (1.0 - smoothing) * a + smoothing / len(a)
    return a if bounds is None else project_bounded_simplex(a, *bounds)


def load_reference_losses(path: str, names: Sequence[str]) -> List[Tuple[int, Dict[str, float]]]:
    """Per-corpus reference losses from ``--mixing-reference``.

    Accepted: a JSON object ``{name: loss}`` (one reference for every step), or a metrics.jsonl of
    a reference run, whose ``eval`` records' ``val_loss/<name>`` fields give a reference per step.

    Returns:
        ``[(step, {name: loss}), ...]`` sorted by step (step -1 for a plain JSON object).

    Raises:
        ValueError: unreadable file, or a corpus of ``names`` without a reference loss.
    """
    with open(path) as f:
        text = f.read()
    out: List[Tuple[int, Dict[str, float]]] = []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and all(isinstance(v, (int, float)) for v in obj.values()):
        out = [(-1, {k: float(v) for k, v in obj.items()})]
    else:
        for line in text.splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("type") == "eval":
                losses = {k[len("val_loss/"):]: float(v) for k, v in rec.items() if k.startswith("val_loss/")}
                if losses:
                    out.append((int(rec.get("step", 0)), losses))
    out.sort(key=lambda x: x[0])
    for step, losses in out or [(-1, {})]:
        missing = [n for n in names if n not in losses or not math.isfinite(losses[n])]
        if missing:
            raise ValueError(f"--mixing-reference {path}: no reference loss for corpora {missing} "
                             f"(step {step}); give {{name: loss}} JSON or a metrics.jsonl with "
                             "val_loss/<name> fields")
    return out


def reference_at(table: List[Tuple[int, Dict[str, float]]], step: int, names: Sequence[str]) -> np.ndarray:
    """The reference losses of the latest reference record at or before ``step`` (the first one
    when all are later)."""
    pick = table[0][1]
    for s, losses in table:
        if s <= step:
            pick = losses
    return np.array([pick[n] for n in names], np.float64)


__all__ = ["check_bounds_feasible", "effective_weights", "exponentiated_gradient_step",
           "load_reference_losses", "parse_share_bounds", "project_bounded_simplex", "reference_at"]
