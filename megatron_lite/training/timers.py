"""Named wall-clock timers for the training loop's step-time breakdown.

The loop brackets each phase of a step (``data-wait``, ``forward-backward``, ``optimizer``) with
``timers(name).start()`` / ``.stop()`` (or ``with timers.time(name):``); the logger reads the time
accumulated since its last report with :meth:`Timers.elapsed` and resets it. On CUDA, ``start`` and
``stop`` synchronise the device first, because kernels run asynchronously and an unsynchronised
host clock would charge a phase's GPU work to whichever later phase happens to wait for it (the
same reason Megatron-LM's timers synchronise).

Each timer also keeps the seconds spent in collectives during its intervals, by kind (from
:mod:`megatron_lite.parallel.comm_timer`), so the logger can split a phase into compute and
communication; and while ``torch.profiler`` records, each interval is a ``record_function`` range
of the timer's name (``forward``, ``backward``, ``optimizer``, ...) in the trace.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

from megatron_lite.parallel import comm_timer

# Canonical names for the step-time breakdown printed by TrainingLogger.
DATA_WAIT = "data-wait"
FORWARD_BACKWARD = "forward-backward"
OPTIMIZER = "optimizer"
FORWARD = "forward"        # inside forward-backward: the micro-batches' forward passes
BACKWARD = "backward"      # inside forward-backward: their backward passes
CHECKPOINT = "checkpoint"  # checkpoint saves (not training time: excluded from the step time)


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """One named timer accumulating seconds over any number of start/stop pairs.

    Args:
        name: the timer's name (used in messages).
        device: the compute device; when it is CUDA, start/stop synchronise it first.
        clock: a function returning seconds (``time.perf_counter``; tests inject a fake one).
    """

    def __init__(self, name: str, device: torch.device | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.name = name
        self._device = device
        self._clock = clock
        self._elapsed = 0.0  # seconds accumulated since the last reset
        self._started_at: float | None = None
        self._comm = dict.fromkeys(comm_timer.totals(), 0.0)  # collective seconds, by kind
        self._comm_at_start: dict[str, float] = {}
        self._range = None   # the profiler's record_function range while one records

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._started_at is not None

    def start(self) -> None:
        """Start timing.

        Raises:
            RuntimeError: if the timer is already running (a missing ``stop()`` in the loop).
        """
        if self._started_at is not None:
            raise RuntimeError(f"timer '{self.name}' started twice without stop(); "
                               "pair every start() with a stop()")
        _synchronize(self._device)
        if torch.autograd._profiler_enabled():
            self._range = torch.profiler.record_function(self.name)
            self._range.__enter__()
        self._comm_at_start = comm_timer.totals()
        self._started_at = self._clock()

    def stop(self) -> None:
        """Stop timing and add the interval to the accumulated time.

        Raises:
            RuntimeError: if the timer is not running.
        """
        if self._started_at is None:
            raise RuntimeError(f"timer '{self.name}' stopped without start()")
        _synchronize(self._device)
        self._elapsed += self._clock() - self._started_at
        self._started_at = None
        for kind, total in comm_timer.totals().items():
            self._comm[kind] += total - self._comm_at_start[kind]
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def comm_elapsed(self, reset: bool = True) -> dict[str, float]:
        """Seconds spent in collectives inside this timer's finished intervals, by kind
        (``"tp"``, ``"dp"``), since the last reset."""
        out = dict(self._comm)
        if reset:
            self._comm = dict.fromkeys(out, 0.0)
        return out

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated since the last reset (a running interval counts up to now).

        Args:
            reset: zero the accumulator afterwards; a running timer keeps running from now.
        """
        total = self._elapsed
        if self._started_at is not None:
            _synchronize(self._device)
            now = self._clock()
            total += now - self._started_at
            if reset:
                self._started_at = now
        if reset:
            self._elapsed = 0.0
        return total


class Timers:
    """A registry of named :class:`Timer` objects created on first use.

    Args:
        device: the compute device (CUDA timers synchronise it).
        clock: seconds source shared by all timers.

    Example:
        >>> timers = Timers()
        >>> with timers.time("forward-backward"):
        ...     pass
        >>> sorted(timers.elapsed_all())
        ['forward-backward']
    """

    def __init__(self, device: torch.device | str | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device) if device is not None else None
        self.clock = clock
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        """Return the timer called ``name``, creating it on first use."""
        if name not in self._timers:
            self._timers[name] = Timer(name, self.device, self.clock)
        return self._timers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._timers

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[Timer]:
        """Context manager timing its body under ``name``."""
        timer = self(name)
        timer.start()
        try:
            yield timer
        finally:
            timer.stop()

    def elapsed_all(self, reset: bool = True) -> dict[str, float]:
        """Seconds accumulated by every timer since its last reset, by name."""
        return {name: t.elapsed(reset=reset) for name, t in self._timers.items()}

    def comm_all(self, reset: bool = True) -> dict[str, dict[str, float]]:
        """Collective seconds inside every timer's intervals since its last reset, by name."""
        return {name: t.comm_elapsed(reset=reset) for name, t in self._timers.items()}
