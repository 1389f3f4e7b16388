"""Preemption signals (``--exit-signal-handler``) and ``--exit-interval``: when the loop stops.

The rank records SIGTERM/SIGUSR1 and the loop saves and exits at the next step boundary; its
DataLoader workers are made to survive them (data/builder.py PreemptionSafeWorkerInit).
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def worker_signals(cfg) -> tuple:
    """Signals the training loader's workers must survive: those this rank handles."""
    return EXIT_SIGNALS if cfg.training.exit_signal_handler else ()


class ExitSignal:
    """Records SIGTERM/SIGUSR1 (when ``enabled``); :meth:`any_rank` asks every rank."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            for s in EXIT_SIGNALS:
                signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank(self, device) -> bool:
        """Whether any rank received a signal (collective: a MAX all-reduce)."""
        t = torch.tensor([1.0 if self.received else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


class ExitCheck:
    """The exit conditions checked after every step.

    Args:
        cfg: finalized RunConfig (``training.exit_interval``, ``training.exit_signal_handler``).
        device: the device of the process group's collectives.
    """

    def __init__(self, cfg, device):
        self.interval = cfg.training.exit_interval
        self.signal = ExitSignal(cfg.training.exit_signal_handler)
        self.device = device

    def reason(self, iteration: int) -> Optional[str]:
        """"--exit-interval", "signal received" or None (collective: every rank calls it)."""
        exit_now = bool(self.interval) and iteration % self.interval == 0
        signalled = self.signal.any_rank(self.device)
        if signalled:
            return "signal received"
        return "--exit-interval" if exit_now else None


__all__ = ["EXIT_SIGNALS", "ExitCheck", "ExitSignal", "worker_signals"]
