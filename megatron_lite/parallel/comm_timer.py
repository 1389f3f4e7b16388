"""Seconds spent inside collectives, by kind, for the training loop's step-time breakdown.

A process-wide accumulator that costs two ``time.perf_counter()`` calls per collective: our own TP
collectives (``mappings.py``, the vocab-parallel cross entropy) add to :data:`TP`; the training
layer wraps DeepSpeed's collectives (ZeRO reduce-scatter / all-gather / all-reduce) and its own
loss / token-count all-reduces and adds them to :data:`DP`. Totals only grow; readers (``training/timers.py``) take differences, so several readers
never reset each other.

The host clock measures a collective exactly on gloo (CPU collectives block). NCCL collectives are
asynchronous: unless :func:`set_synchronize` is on (``--timing-log-level 2``), a CUDA collective
counts only the host time to launch it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

TP = "tp"   # tensor-parallel collectives of the model (mappings, vocab-parallel cross entropy)
DP = "dp"   # DeepSpeed's collectives in the step (ZeRO gradient reduction, parameter gather)

_totals = {TP: 0.0, DP: 0.0}
_synchronize = False
_depth = 0   # nesting of timed collectives: an inner one is counted by the outer one only


def set_synchronize(flag: bool) -> None:
    """Synchronise the CUDA device before and after each timed collective (exact, slower)."""
    global _synchronize
    _synchronize = bool(flag)


def totals() -> dict[str, float]:
    """Seconds spent in collectives since the process started, by kind (a copy)."""
    return dict(_totals)


def _sync() -> None:
    if _synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def begin() -> float:
    """Mark the start of a collective; returns the start time for :func:`end`."""
    global _depth
    _depth += 1
    _sync()
    return time.perf_counter()


def end(kind: str, started: float) -> None:
    """Mark the end of the collective begun at ``started`` and add its seconds to ``kind``."""
    global _depth
    _sync()
    _depth -= 1
    if _depth == 0:
        _totals[kind] += time.perf_counter() - started


def add(kind: str, seconds: float) -> None:
    """Count ``seconds`` measured elsewhere as ``kind`` communication (tests, other clocks)."""
    _totals[kind] += float(seconds)


@contextlib.contextmanager
def timed(kind: str) -> Iterator[None]:
    """Count the body (one collective) as ``kind`` communication."""
    started = begin()
    try:
        yield
    finally:
        end(kind, started)


__all__ = ["DP", "TP", "add", "begin", "end", "set_synchronize", "timed", "totals"]
