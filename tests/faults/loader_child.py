"""A stand-in for one training rank, for tests/faults/test_preemption_workers.py: a process
that handles the preemption signals like pretrain()'s ``_ExitSignal`` and reads a
``build_data_loader`` DataLoader with 2 workers. Usage::

    python tests/faults/loader_child.py MODE SIGNALS STATUS_JSON

MODE: ``until_signal`` (read batches until a handled signal arrives, then stop cleanly with the
loader still alive, exit 0), ``exit`` (the same after 3 batches without a signal). SIGNALS:
``guarded`` (``worker_signals=EXIT_SIGNALS``, what pretrain passes) or ``plain`` (torch's
default). STATUS_JSON receives ``{"workers": [pids], ...}`` as soon as the
workers run (written atomically), then the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

SEQ = 8


class ToyDataset:
    """Samples in the GPTDataset format (docs/interfaces.md) of ``SEQ`` tokens."""

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, i: int) -> dict:
        t = (np.arange(SEQ + 1) + i) % 100
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": np.ones(SEQ, np.float32),
                "position_ids": np.arange(SEQ), "cu_seqlens": np.array([0, SEQ]),
                "sample_id": i, "dataset_id": 0}


def write_status(path: str, status: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(status, f)
    os.replace(path + ".tmp", path)


def main(mode: str, which: str, out: str) -> int:
    from megatron_lite.data.builder import build_data_loader, iter_loader
    from megatron_lite.training.callbacks.signals import EXIT_SIGNALS

    got = []
    for s in EXIT_SIGNALS:   # as ExitSignal: record, stop at the next "step" boundary
        signal.signal(s, lambda signum, frame: got.append(signum))
    sigs = EXIT_SIGNALS if which == "guarded" else ()
    loader = build_data_loader(ToyDataset(), 0, 2, 0, 1, num_workers=2, worker_signals=sigs)
    it = iter_loader(loader, sigs)
    first = next(it)
    next(it)   # batch 2 comes from worker 1: both workers are past their start-up
    status = {"workers": [w.pid for w in it._workers], "first_ids": first["sample_ids"].tolist()}
    write_status(out, status)
    n = 2
    while not got and (mode != "exit" or n < 3):
        next(it)
        n += 1
        time.sleep(0.01)
    status.update(batches=n, signals=[int(s) for s in got], stopped="cleanly")
    write_status(out, status)
    # Keep the loader alive to interpreter exit: multiprocessing's exit handler then terminates
    # the (daemon) workers with SIGTERM and joins them without a timeout.
    KEEP.append(it)
    return 0


KEEP: list = []


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(*sys.argv[1:4]))
