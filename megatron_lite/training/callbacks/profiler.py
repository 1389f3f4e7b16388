"""``--profile``: ``torch.profiler`` over steps N..M, a trace per rank, and a CUDA memory snapshot.

The profiler starts at the first step in ``[--profile-step-start, --profile-step-end]`` (after that
step's batch is read) and stops after step ``--profile-step-end`` (or at the end of training, when
that comes first). Each step is a ``ProfilerStep#<step>`` range; the training timers add
``forward``, ``backward``, ``optimizer``, ``data-wait`` ranges inside it
(:mod:`megatron_lite.training.timers`). Written under ``RUN/profile/`` on each rank of
``--profile-ranks``:

* ``trace_rank<r>.json``: Chrome trace format, open in https://ui.perfetto.dev or chrome://tracing;
* ``tensorboard/rank<r>.<ns>.pt.trace.json``: the same trace in the layout of the TensorBoard
  profiler plugin (``tensorboard --logdir RUN/profile/tensorboard``);
* with ``--memory-snapshot`` (CUDA): ``memory_snapshot_rank<r>.pickle``, the caching allocator's
  history over the profiled steps (https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from megatron_lite.config.sections import parse_rank_list
from megatron_lite.training.callbacks.base import Callback

MEMORY_HISTORY_ENTRIES = 100_000   # allocator events kept (torch's recommended order of size)


def _always_record(step: int) -> torch.profiler.ProfilerAction:
    return torch.profiler.ProfilerAction.RECORD


class ProfilerCallback(Callback):
    """Profile steps ``start..end`` on the listed ranks (see the module docstring).

    Args:
        start: first profiled step (>= 1).
        end: last profiled step (>= start).
        ranks: global ranks that profile.
        out_dir: folder for the traces (created on first use).
        rank: this process's global rank.
        device: the training device (CUDA activities and the memory snapshot on GPU).
        memory_snapshot: also record the CUDA allocator history (CUDA only).
    """

    def __init__(self, start: int, end: int, ranks: list[int], out_dir: str, rank: int,
                 device: torch.device, memory_snapshot: bool = False):
        self.start, self.end, self.out_dir = int(start), int(end), out_dir
        self.enabled = rank in ranks
        self.rank, self.device = rank, torch.device(device)
        self.memory_snapshot = memory_snapshot and self.device.type == "cuda"
        self.prof = None
        self.first = None
        self.written: list[str] = []

    @classmethod
    def from_config(cls, cfg, rank: int, device: torch.device, run_dir: str | None):
        """The callback for ``cfg.logging``'s profiling flags, or None without ``--profile``."""
        lg = cfg.logging
        if not lg.profile:
            return None
        return cls(lg.profile_step_start, lg.profile_step_end, parse_rank_list(lg.profile_ranks),
                   os.path.join(run_dir or ".", "profile"), rank, device, lg.memory_snapshot)

    def on_step_begin(self, trainer, step: int, micro_batches) -> None:
        if not self.enabled or self.prof is not None or self.first is not None:
            return
        if self.start <= step <= self.end:
            self._begin(step)

    def on_step_end(self, trainer, step: int, result) -> None:
        if self.prof is None:
            return
        if step >= self.end:
            with trainer.logger.exclude_time():   # writing the trace is not training time
                self._finish(step)
        else:
            self.prof.step()

    def on_train_end(self, trainer) -> None:
        if self.prof is not None:
            self._finish(None)

    def _begin(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        # A schedule that always records: torch writes ProfilerStep#<n> ranges only with one.
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False,
                                           with_stack=False, profile_memory=False,
                                           schedule=_always_record)
        self.prof.step_num = step   # ProfilerStep#<n> ranges carry the training step number
        self.first = step
        self.prof.start()

    def _finish(self, last: int | None) -> None:
        prof, self.prof = self.prof, None
        prof.stop()
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(path + ".tmp")
        os.replace(path + ".tmp", path)   # a reader never sees half a trace
        self.written.append(path)
        # The TensorBoard plugin reads the same Chrome trace under the name its handler
        # (torch.profiler.tensorboard_trace_handler) would give; a trace can be exported once.
        tb_dir = os.path.join(self.out_dir, "tensorboard")
        os.makedirs(tb_dir, exist_ok=True)
        tb_path = os.path.join(tb_dir, f"rank{self.rank}.{time.time_ns() // 1_000_000}"
                                       ".pt.trace.json")
        try:
            os.link(path, tb_path)   # one file on disk for both names
        except OSError:              # a file system without hard links
            shutil.copyfile(path, tb_path)
        self.written.append(tb_dir)
        if self.memory_snapshot:
            snap = os.path.join(self.out_dir, f"memory_snapshot_rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(snap)
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snap)
        steps = f"{self.first}..{last}" if last is not None else f"{self.first}..end"
        print(f"[profile] rank {self.rank}: steps {steps} -> {', '.join(self.written)}",
              flush=True)


__all__ = ["ProfilerCallback"]
