"""Fault injection for the test suites (tests/faults, docs/reliability.md), as Trainer callbacks.

The one injection point: :func:`megatron_lite.entrypoints.run_entrypoint` (``pretrain_llama.py``,
``cpt_llama.py``) and ``tests/faults/driver.py`` pass :func:`callbacks_from_env` to the train
function; in-process tests pass it (or a callback built here) to ``pretrain(callbacks=...)``.
Production modules never read these variables. Each is off unless set:

* ``MEGATRON_LITE_INJECT_NAN="step:rank,..."``: that rank's first micro-batch loss is NaN at that
  step (the non-finite skip path).
* ``MEGATRON_LITE_INJECT_SPIKE="step:scale,..."``: with ``--spike-detection`` on, every rank's
  loss (hence its gradient) at that step number is multiplied by ``scale``, once per run (not
  again when a rollback repeats the step).
* ``MEGATRON_LITE_LOG_SAMPLES=PATH``: append ``{"step", "rank", "sample_ids"}`` (this rank's
  global sample indices of the step, micro-batch order) to ``PATH.rank<R>`` before the step.
* ``MEGATRON_LITE_INJECT_RAISE="step:rank,..."``: raise RuntimeError on that rank before that step
  (a crashing rank; the others must not hang in a collective).
* ``MEGATRON_LITE_INJECT_SLEEP="step:rank:seconds,..."``: that rank sleeps before that step's
  first collective (a hung rank; the stall watchdog, ``--stall-timeout-seconds``, must report it).
* ``MEGATRON_LITE_DUMP_PARAMS=DIR``: each rank saves its module's parameters at the end of training
  to ``DIR/rank_<R>.pt`` (cross-rank divergence checks; ZeRO <= 2).
* ``MEGATRON_LITE_INJECT_SAVE_KILL="iteration:rank:point,..."``: SIGKILL this rank at ``point`` of
  the save after ``iteration`` steps: ``engine`` (DeepSpeed's files written, RNG file not yet),
  ``manifest`` (rank 0: manifest written, folder not yet renamed), ``rename`` (rank 0: folder
  renamed, ``latest`` not yet updated), ``async_write`` (``--async-save``: in the background
  writer thread after its first file, while training goes on).
* ``MEGATRON_LITE_DUMP_OPTIM_STATE=DIR``: after a resume that loaded the optimizer (ZeRO >= 1), the
  full optimizer state is written by
  :func:`megatron_lite.checkpoint.zero_reshard.dump_full_state` to ``DIR/<tag>_tp<tp>.pt``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import torch

from megatron_lite.checkpoint.zero_reshard import dump_full_state
from megatron_lite.training.callbacks.base import Callback
from megatron_lite.utils import get_rank


def _pairs(spec: str) -> list[list[str]]:
    return [item.split(":") for item in filter(None, (spec or "").split(","))]


class InjectNaN(Callback):
    """``(step, rank)`` pairs whose first micro-batch loss becomes NaN."""

    def __init__(self, spec: str):
        self.points = {(int(s), int(r)) for s, r in _pairs(spec)}

    def on_micro_batch_loss(self, step, j, batch, loss_sum, per_sample):
        if j == 0 and (step, get_rank()) in self.points:
            loss_sum = loss_sum * float("nan")
        return loss_sum, per_sample


class InjectSpike(Callback):
    """``{step: scale}``: a "bad batch" scales loss and gradient (spike detection runs only)."""

    def __init__(self, spec: str):
        self.scales = {int(s): float(x) for s, x in _pairs(spec)}
        self.done: set[int] = set()
        self.active = False
        self.scale = 1.0

    def on_train_start(self, trainer):
        self.active = bool(trainer.cfg.training.spike_detection)

    def on_lr(self, step, optimizer, lr):
        scale = self.scales.get(step) if self.active else None
        self.scale = 1.0 if scale is None or step in self.done else scale
        if self.scale != 1.0:
            self.done.add(step)
        return lr

    def on_micro_batch_loss(self, step, j, batch, loss_sum, per_sample):
        if self.scale != 1.0:
            loss_sum = loss_sum * self.scale
            if per_sample is not None:
                per_sample = (per_sample[0] * self.scale, per_sample[1])
        return loss_sum, per_sample


class LogSamples(Callback):
    """Appends each step's sample ids of this rank to ``PATH.rank<R>``."""

    def __init__(self, path: str):
        self.path = path

    def on_step_begin(self, trainer, step, micro_batches):
        rank = get_rank()
        ids = [int(i) for b in micro_batches for i in b["sample_ids"].reshape(-1).tolist()]
        with open(f"{self.path}.rank{rank}", "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "sample_ids": ids}) + "\n")


class InjectRaise(Callback):
    """Raises RuntimeError on ``rank`` before ``step`` for each ``(step, rank)``."""

    def __init__(self, spec: str):
        self.points = {(int(s), int(r)) for s, r in _pairs(spec)}

    def on_step_begin(self, trainer, step, micro_batches):
        rank = get_rank()
        if (step, rank) in self.points:
            raise RuntimeError(f"MEGATRON_LITE_INJECT_RAISE: injected failure on rank {rank} "
                               f"before step {step}")


class InjectSleep(Callback):
    """Sleeps ``seconds`` on ``rank`` before ``step`` (``step:rank:seconds`` items): the step's
    first collective (the loss-token all-reduce) then waits for this rank on every other."""

    def __init__(self, spec: str):
        self.points = {(int(s), int(r)): float(t) for s, r, t in _pairs(spec)}

    def on_step_begin(self, trainer, step, micro_batches):
        seconds = self.points.get((step, get_rank()))
        if seconds:
            time.sleep(seconds)


class DumpParams(Callback):
    """Saves this rank's module parameters to ``DIR/rank_<R>.pt`` at the end of training."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer):
        os.makedirs(self.out_dir, exist_ok=True)
        sd = {k: v.detach().cpu().clone() for k, v in trainer.engine.module.state_dict().items()}
        torch.save(sd, os.path.join(self.out_dir, f"rank_{get_rank()}.pt"))


class SaveKill(Callback):
    """SIGKILLs this rank at a save's fault point (``iteration:rank:point`` items)."""

    def __init__(self, spec: str):
        self.points = {(int(i), int(r), p) for i, r, p in _pairs(spec)}

    def on_save_point(self, iteration, point):
        if (iteration, get_rank(), point) in self.points:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpOptimState(Callback):
    """After a resume that loaded the optimizer at ZeRO >= 1: the full state to ``DIR``."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_resume(self, trainer, path):
        ck = trainer.cfg.checkpoint
        if ck.finetune or ck.no_load_optim or trainer.cfg.parallel.zero_stage < 1:
            return
        dump_full_state(trainer.engine, self.out_dir, os.path.basename(os.path.abspath(path)))


def callbacks_from_env(env: Optional[dict] = None) -> list[Callback]:
    """The fault callbacks the ``MEGATRON_LITE_*`` variables of ``env`` (default: os.environ)
    ask for, in the order their effects happened before they were callbacks (NaN before the
    spike scale, sample log before the injected raise)."""
    env = os.environ if env is None else env
    makers = (("MEGATRON_LITE_INJECT_NAN", InjectNaN), ("MEGATRON_LITE_INJECT_SPIKE", InjectSpike),
              ("MEGATRON_LITE_LOG_SAMPLES", LogSamples), ("MEGATRON_LITE_INJECT_RAISE", InjectRaise),
              ("MEGATRON_LITE_INJECT_SLEEP", InjectSleep),
              ("MEGATRON_LITE_DUMP_PARAMS", DumpParams),
              ("MEGATRON_LITE_INJECT_SAVE_KILL", SaveKill),
              ("MEGATRON_LITE_DUMP_OPTIM_STATE", DumpOptimState))
    return [make(env[name]) for name, make in makers if env.get(name)]


__all__ = ["DumpOptimState", "DumpParams", "InjectNaN", "InjectRaise", "InjectSleep", "InjectSpike",
           "LogSamples", "SaveKill", "callbacks_from_env"]
