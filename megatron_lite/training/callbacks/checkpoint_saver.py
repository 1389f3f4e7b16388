"""When the Trainer saves: every ``--save-interval`` steps, on ``--exit-interval`` or a signal,
and after the last step with ``--save-on-exit``; what it saves beside the engine (the blended
dataset's position, the callbacks' ``extras``); with ``--async-save``, when the pending background
write is committed."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_lite.checkpoint import engine_state
from megatron_lite.training.timers import CHECKPOINT
from megatron_lite.utils import is_rank_0


class CheckpointSaver:
    """Saves through :func:`megatron_lite.checkpoint.engine_state.save_checkpoint`, or with
    ``--async-save`` its two halves :func:`~megatron_lite.checkpoint.engine_state.start_save` /
    :func:`~megatron_lite.checkpoint.engine_state.commit_save` (collective).

    Synchronous (default): the whole save at the step boundary. ``--async-save``: the step boundary
    pays only for copying the state to host memory; the files are written by a background
    thread, and the save is committed (manifest, rename, ``latest``) at the first step boundary
    at which every rank's thread has finished (:meth:`poll`, one all-reduce per step while a save
    is pending), before the next save starts, and before the run ends or exits on a signal
    (:meth:`finish`).

    Args:
        cfg: finalized RunConfig (``checkpoint`` section, ``derived.train_iters``).
        engine, scheduler: what the checkpoint holds (with the ``TrainState``).
        logger: the ``TrainingLogger``; save time is excluded from training time.
        train_ds: the train dataset (its ``state_dict`` is saved when it has one), or None.
        extras: returns the JSON-safe ``TrainState.extras`` to save (spike guard, noise scale).
        fault_point: ``fault_point(iteration, point)`` passed to the save (tests).
        device: the device of the process group's collectives (the pending-write poll).
    """

    def __init__(self, cfg, engine, scheduler, logger, train_ds, extras: Callable[[], Optional[dict]],
                 fault_point: Optional[Callable[[int, str], None]] = None, device=None):
        self.cfg, self.engine, self.scheduler, self.logger = cfg, engine, scheduler, logger
        self.train_ds, self.extras, self.fault_point = train_ds, extras, fault_point
        self.device = device if device is not None else torch.device("cpu")
        self.last_saved: Optional[str] = None   # the newest folder this run saved
        self.pending: Optional[engine_state.PendingSave] = None

    def wants(self, iteration: int, stopping: bool) -> bool:
        """Whether to save after step ``iteration`` (``stopping``: exit interval or signal)."""
        ck = self.cfg.checkpoint
        last = iteration >= self.cfg.derived.train_iters
        return bool(ck.save and (
            (ck.save_interval and iteration % ck.save_interval == 0)
            or stopping or (last and ck.save_on_exit)))

    def maybe_save(self, state, stopping: bool) -> None:
        """Commit a finished background write; save after this step when :meth:`wants` says so
        (waiting for a pending write first). A save when ``stopping`` or after the last step is
        completed before this returns."""
        self.poll()
        if not self.wants(state.iteration, stopping):
            return
        self.finish()                   # a second save waits for the first
        if self.train_ds is not None and hasattr(self.train_ds, "state_dict"):
            state.data_state = self.train_ds.state_dict(state.consumed_samples)
        state.extras = self.extras()
        ck, start = self.cfg.checkpoint, time.perf_counter()
        with self.logger.exclude_time(), self.logger.timers.time(CHECKPOINT):
            if ck.async_save:
                self.pending = engine_state.start_save(
                    self.engine, self.cfg, state, self.scheduler, ck.save,
                    fault_point=self.fault_point, background=True)
            else:
                path = engine_state.save_checkpoint(self.engine, self.cfg, state, self.scheduler,
                                                    ck.save, fault_point=self.fault_point)
        if not ck.async_save:
            self._saved(path, state.iteration, f"{time.perf_counter() - start:.1f} s")
        elif stopping or state.iteration >= self.cfg.derived.train_iters:
            self.finish()

    def poll(self) -> None:
        """With a save pending: commit it if every rank's write has finished (collective: a MIN
        all-reduce of the ranks' done flags, so all ranks commit at the same step)."""
        if self.pending is None:
            return
        done = torch.tensor([1.0 if self.pending.done() else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() > 0:
            self.finish()

    def finish(self) -> None:
        """Wait for the pending save's files and commit it (collective); nothing when none is
        pending. Called before a new save, at the end of training and on an exit signal."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        start = time.perf_counter()
        with self.logger.exclude_time(), self.logger.timers.time(CHECKPOINT):
            path = engine_state.commit_save(pending, self.cfg, fault_point=self.fault_point)
        bg = pending.background
        self._saved(path, pending.iteration,
                    f"training blocked {pending.blocked_s:.2f} s + "
                    f"{time.perf_counter() - start:.2f} s, written in the background in "
                    f"{bg.seconds:.1f} s, {bg.host_bytes / 1e6:.1f} MB host copy")

    def _saved(self, path, iteration: int, took: str) -> None:
        """Record the saved folder; rank 0 prints the save line."""
        self.last_saved = path
        if is_rank_0() and isinstance(path, str) and os.path.isdir(path):
            print(f"[checkpoint] saved iteration {iteration} to {path} "
                  f"({folder_bytes(path) / 1e6:.1f} MB, {took})", flush=True)

    def abandon(self) -> None:
        """After an exception: let a pending background write end (no collective, no commit;
        its temporary folder is removed by the next save)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.background is not None:
            pending.background.thread.join()


def folder_bytes(path: str) -> int:
    """Total size in bytes of the files under ``path`` (all ranks' shards of a checkpoint)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


__all__ = ["CheckpointSaver", "folder_bytes"]
