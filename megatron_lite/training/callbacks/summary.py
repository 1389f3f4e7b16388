"""The closing summary of a training run (rank 0): steps, tokens, wall time, mean tokens/s and
MFU, last and best validation loss, and where the checkpoint, metrics.jsonl and TensorBoard
files are, with the command that shows the curves."""

from __future__ import annotations

import os
import time
from typing import Callable

from megatron_lite.training.callbacks.base import Callback

RULE = "-" * 47


class TrainingSummary(Callback):
    """Prints :func:`summary_lines` at the end of :meth:`Trainer.fit` (rank 0).

    The numbers come from the trainer's ``TrainingLogger`` (tokens/s and MFU over the logged
    intervals, training time only, as in each console line; validation losses) and its
    ``CheckpointSaver`` (the newest folder saved).

    Args:
        rank: this process's global rank (only rank 0 prints).
        clock: seconds source for the wall time (tests).
        print_fn: where the lines go (default ``print``).
    """

    def __init__(self, rank: int, clock: Callable[[], float] = time.perf_counter,
                 print_fn: Callable[[str], None] | None = None):
        self.rank, self.clock = rank, clock
        self._print = print_fn or (lambda s: print(s, flush=True))
        self.start, self.start_iteration, self.start_samples = 0.0, 0, 0

    def on_train_start(self, trainer) -> None:
        self.start = self.clock()
        self.start_iteration = trainer.state.iteration
        self.start_samples = trainer.state.consumed_samples

    def on_train_end(self, trainer) -> None:
        if self.rank == 0:
            self._print("\n".join(summary_lines(trainer, self.clock() - self.start,
                                                self.start_iteration, self.start_samples)))


def summary_lines(trainer, wall_s: float, start_iteration: int, start_samples: int) -> list[str]:
    """The summary's lines (the layout of the resolved plan: ``name : value``)."""
    cfg, state, logger = trainer.cfg, trainer.state, trainer.logger
    seq = cfg.model.seq_length
    tokens = (state.consumed_samples - start_samples) * seq
    tps, mfu = logger.run_throughput()
    speed = "n/a (no step was logged)" if tps is None else f"{tps:.1f} tokens/s mean"
    if tps is not None:
        speed += ", MFU n/a" if mfu is None else f", MFU {mfu * 100:.2f}%"
    val = "none (no validation ran)"
    if logger.last_val is not None:
        (ls, lv), (bs, bv) = logger.last_val, logger.best_val
        val = f"last {lv:.4f} (iteration {ls}), best {bv:.4f} (iteration {bs})"
    saved = trainer.saver.last_saved
    ckpt = os.path.abspath(saved) if saved else (
        "none saved this run" if cfg.checkpoint.save else "none (no --save)")
    metrics = os.path.abspath(logger.metrics_path) if logger.metrics_path else \
        "none (give --save or --metrics-file)"
    tb = cfg.logging.tensorboard_dir
    lines = ["---------------- training summary ----------------",
             f"steps                   : {state.iteration - start_iteration} this run "
             f"(iteration {state.iteration} of {cfg.derived.train_iters})",
             f"tokens                  : {tokens} this run ({state.consumed_samples * seq} in "
             f"total)",
             f"wall time               : {wall_s:.1f} s (the training loop, evaluation and "
             f"saves included)",
             f"throughput              : {speed}",
             f"validation loss         : {val}",
             f"checkpoint              : {ckpt}",
             f"metrics.jsonl           : {metrics}"]
    if tb:
        lines += [f"TensorBoard             : {os.path.abspath(tb)}",
                  f"view the curves         : tensorboard --logdir {os.path.abspath(tb)}"]
    else:
        lines.append("TensorBoard             : not written (add --tensorboard-dir DIR)")
    return lines + [RULE + "---"]


__all__ = ["TrainingSummary", "summary_lines"]
