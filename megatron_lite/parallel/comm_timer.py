"""Seconds spent inside collectives, by kind, for the training loop's step-time breakdown.

A process-wide accumulator that costs two ``time.perf_counter()`` calls per collective: our own TP
collectives (``mappings.py``, the vocab-parallel cross entropy) add to :data:`TP`; the training
layer wraps DeepSpeed's collectives (ZeRO reduce-scatter / all-gather / all-reduce) and its own
loss / token-count all-reduces and adds them to :data:`DP`. Totals only grow; readers (``training/timers.py``) take differences, so several readers
never reset each other.

The host clock measures a collective exactly on gloo (CPU collectives block). NCCL collectives are
asynchronous: unless :func:`set_synchronize` is on (``--timing-log-level 2``), a CUDA collective
counts only the host time to launch it.

The same two calls keep a hang tracker: :func:`last_collective` is the collective this process
entered last (its name, kind, sequence number, and whether it returned), which the stall watchdog
(``training/callbacks/stall_watchdog.py``) writes into ``<save>/hang/rank_<r>.txt`` when a rank
stops making progress. A caller that passes no name is named after its function
(``mappings._all_reduce``), one frame lookup per collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator, Optional

import torch

TP = "tp"   # tensor-parallel collectives of the model (mappings, vocab-parallel cross entropy)
DP = "dp"   # DeepSpeed's collectives in the step (ZeRO gradient reduction, parameter gather)

_totals = {TP: 0.0, DP: 0.0}
_synchronize = False
_depth = 0   # nesting of timed collectives: an inner one is counted by the outer one only
_seq = 0     # collectives entered so far by this process
# the last collective entered: (seq, name, kind or None until it returns, entered at, returned at)
_last: tuple = (0, "", None, 0.0, None)


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


_TORCH_DIR = os.path.dirname(torch.__file__)


# torch.compile must not trace the timer (host clock, frame lookup): inside a compiled block it
# would warn that it cannot trace sys._getframe / time.perf_counter; disabled, it runs eagerly at
# the graph break the collective makes anyway.
@torch.compiler.disable
def begin(name: Optional[str] = None) -> float:
    """Mark the start of a collective; returns the start time for :func:`end`.

    ``name`` is what the hang tracker records (default: the calling function, ``module.func``,
    skipping torch's own frames such as torch.compile's wrapper).
    """
    global _depth, _seq, _last
    if name is None:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        code = frame.f_code
        name = f"{os.path.splitext(os.path.basename(code.co_filename))[0]}.{code.co_name}"
    _seq += 1
    _depth += 1
    _sync()
    t = time.perf_counter()
    _last = (_seq, name, None, time.time(), None)
    return t


@torch.compiler.disable
def end(kind: str, started: float) -> None:
    """Mark the end of the collective begun at ``started`` and add its seconds to ``kind``."""
    global _depth, _last
    _sync()
    _depth -= 1
    if _depth == 0:
        _totals[kind] += time.perf_counter() - started
    seq, name, _, entered, _ = _last
    _last = (seq, name, kind, entered, time.time())


def last_collective() -> dict:
    """The collective entered last by this process (read by the stall watchdog's thread).

    Returns:
        ``{"seq": n-th collective of the process (0: none yet), "name", "kind": "tp"/"dp"
        (None while inside it), "entered": wall-clock time, "returned": wall-clock time or None
        while inside it}``.
    """
    seq, name, kind, entered, returned = _last
    return {"seq": seq, "name": name, "kind": kind, "entered": entered, "returned": returned}


def add(kind: str, seconds: float) -> None:
    """Count ``seconds`` measured elsewhere as ``kind`` communication (tests, other clocks)."""
    _totals[kind] += float(seconds)


@contextlib.contextmanager
def timed(kind: str, name: Optional[str] = None) -> Iterator[None]:
    """Count the body (one collective, called ``name`` in the hang tracker; default: the
    calling function) as ``kind`` communication."""
    if name is None:
        code = sys._getframe(2).f_code   # 2: past contextlib's __enter__
        name = f"{os.path.splitext(os.path.basename(code.co_filename))[0]}.{code.co_name}"
    started = begin(f"{name} [{kind}]")
    try:
        yield
    finally:
        end(kind, started)


__all__ = ["DP", "TP", "add", "begin", "end", "last_collective", "set_synchronize", "timed",
           "totals"]
