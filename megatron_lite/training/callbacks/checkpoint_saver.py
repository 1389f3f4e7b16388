"""When the Trainer saves: every ``--save-interval`` steps, on ``--exit-interval`` or a signal,
and after the last step with ``--save-on-exit``; what it saves beside the engine (the blended
dataset's position, the callbacks' ``extras``)."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from megatron_lite.checkpoint import engine_state
from megatron_lite.training.timers import CHECKPOINT
from megatron_lite.utils import is_rank_0


class CheckpointSaver:
    """Saves through :func:`megatron_lite.checkpoint.engine_state.save_checkpoint` (collective).

    Args:
        cfg: finalized RunConfig (``checkpoint`` section, ``derived.train_iters``).
        engine, scheduler: what the checkpoint holds (with the ``TrainState``).
        logger: the ``TrainingLogger``; save time is excluded from training time.
        train_ds: the train dataset (its ``state_dict`` is saved when it has one), or None.
        extras: returns the JSON-safe ``TrainState.extras`` to save (spike guard, noise scale).
        fault_point: ``fault_point(iteration, point)`` passed to ``save_checkpoint`` (tests).
    """

    def __init__(self, cfg, engine, scheduler, logger, train_ds, extras: Callable[[], Optional[dict]],
                 fault_point: Optional[Callable[[int, str], None]] = None):
        self.cfg, self.engine, self.scheduler, self.logger = cfg, engine, scheduler, logger
        self.train_ds, self.extras, self.fault_point = train_ds, extras, fault_point
        self.last_saved: Optional[str] = None   # the newest folder this run saved

    def wants(self, iteration: int, stopping: bool) -> bool:
        """Whether to save after step ``iteration`` (``stopping``: exit interval or signal)."""
        ck = self.cfg.checkpoint
        last = iteration >= self.cfg.derived.train_iters
        return bool(ck.save and (
            (ck.save_interval and iteration % ck.save_interval == 0)
            or stopping or (last and ck.save_on_exit)))

    def maybe_save(self, state, stopping: bool) -> None:
        """Save after this step when :meth:`wants` says so."""
        if not self.wants(state.iteration, stopping):
            return
        if self.train_ds is not None and hasattr(self.train_ds, "state_dict"):
            state.data_state = self.train_ds.state_dict(state.consumed_samples)
        state.extras = self.extras()
        start = time.perf_counter()
        with self.logger.exclude_time(), self.logger.timers.time(CHECKPOINT):
            path = engine_state.save_checkpoint(self.engine, self.cfg, state, self.scheduler,
                                                self.cfg.checkpoint.save,
                                                fault_point=self.fault_point)
        self.last_saved = path
        if is_rank_0() and isinstance(path, str) and os.path.isdir(path):
            print(f"[checkpoint] saved iteration {state.iteration} to {path} "
                  f"({folder_bytes(path) / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)",
                  flush=True)


def folder_bytes(path: str) -> int:
    """Total size in bytes of the files under ``path`` (all ranks' shards of a checkpoint)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


__all__ = ["CheckpointSaver", "folder_bytes"]
