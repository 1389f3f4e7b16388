"""The callback protocol: optional behaviour attached to the Trainer and to ``train_step``.

A :class:`Callback` overrides the hooks it needs; every hook of the base class does nothing, so
a run without callbacks does no extra work and issues no extra collective. :class:`CallbackList`
calls the hooks of its callbacks in list order (the Trainer puts the test fault callbacks first,
then the spike guard, then the noise scale, then the caller's own).

Order of the hooks in one run (docs/architecture.md, "Callback hooks"):

* ``on_resume`` - a checkpoint was loaded at start-up (before ``on_train_start``);
* ``on_train_start`` - set-up done, before the evaluation at start;
* per step, in the Trainer: ``on_step_begin`` (micro-batches read) -> ``train_step`` (below) ->
  the step's log line (with ``log_scalars``) -> ``on_step_end`` -> evaluation, save
  (``on_save_point`` at the save's fault points), exit checks;
* inside ``train_step``: ``on_lr`` -> ``wants_per_sample`` -> per micro-batch j:
  ``on_micro_batch_loss`` -> backward -> ``on_after_backward`` -> after the last one:
  ``on_before_optimizer_step`` -> optimizer step -> ``on_optimizer_step_end`` -> skip accounting;
* ``on_train_end`` - after the last step (and the test evaluation), also after an exit signal.

State a callback must carry across a resume goes into ``TrainState.extras``
(:mod:`megatron_lite.training.callbacks.extras`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence


class Callback:
    """No-op base of every callback; override what you need (docstrings say when each runs)."""

    # ---- loop level: called by the Trainer --------------------------------------------------
    def on_resume(self, trainer, path: str) -> None:
        """A checkpoint (folder ``path``) was loaded at start-up; engine and state are restored."""

    def on_train_start(self, trainer) -> None:
        """Set-up done (model, engine, data, logger), before the evaluation at start."""

    def on_step_begin(self, trainer, step: int, micro_batches: Sequence[dict]) -> None:
        """This rank's micro-batches of step ``step`` (1-based) are read; the step starts next."""

    def log_scalars(self) -> dict:
        """Extra scalars appended (in callback order) to the step's log record."""
        return {}

    def on_step_end(self, trainer, step: int, result) -> None:
        """After the step was counted (``consumed_samples``) and logged; before eval and save."""

    def on_save_point(self, iteration: int, point: str) -> None:
        """A checkpoint save of ``iteration`` reached ``point`` ("engine", "manifest", "rename";
        ``save_checkpoint``'s ``fault_point``)."""

    def on_train_end(self, trainer) -> None:
        """Training ended (last step, or stopped by --exit-interval or a signal)."""

    # ---- step level: called by train_step ----------------------------------------------------
    def on_lr(self, step: int, optimizer, lr: float) -> float:
        """The schedule's LR ``lr`` is set on ``optimizer``; return the LR the step uses (a
        callback that changes it also changes the param groups)."""
        return lr

    def wants_per_sample(self, step: int) -> bool:
        """Whether step ``step`` needs the per-sample loss sums (computed only if one says so)."""
        return False

    def on_micro_batch_loss(self, step: int, j: int, batch: dict, loss_sum, per_sample):
        """Micro-batch ``j``'s masked loss sum (scalar tensor, before backward) and per-sample
        ``(sums [b], loss tokens [b])`` (None when not wanted); returns them, possibly changed."""
        return loss_sum, per_sample

    def on_after_backward(self, step: int, j: int, engine, per_sample, n_tokens: int,
                          dp: int) -> None:
        """Micro-batch ``j``'s backward is done (``p.grad`` holds ``dp / n_tokens`` times its
        loss sum's gradient, accumulated); before the next micro-batch."""

    def on_before_optimizer_step(self, step: int, loss: float, skip: bool) -> bool:
        """All backwards done; ``loss`` is the global token-mean loss, ``skip`` whether the step
        is skipped already (non-finite). Return True to skip the update."""
        return False

    def on_optimizer_step_end(self, step: int, result) -> None:
        """The optimizer step ran; ``result`` (a ``StepResult``) may be changed (skipped, grad
        norm, spike, noise) before the skipped-step accounting."""


class CallbackList(Callback):
    """Calls each hook on every callback in order; chained hooks pass the value along."""

    def __init__(self, callbacks: Optional[Iterable[Callback]] = ()):
        self.callbacks = [c for c in (callbacks or ()) if c is not None]

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def on_resume(self, trainer, path):
        for c in self.callbacks:
            c.on_resume(trainer, path)

    def on_train_start(self, trainer):
        for c in self.callbacks:
            c.on_train_start(trainer)

    def on_step_begin(self, trainer, step, micro_batches):
        for c in self.callbacks:
            c.on_step_begin(trainer, step, micro_batches)

    def log_scalars(self) -> dict:
        out: dict[str, Any] = {}
        for c in self.callbacks:
            out.update(c.log_scalars())
        return out

    def on_step_end(self, trainer, step, result):
        for c in self.callbacks:
            c.on_step_end(trainer, step, result)

    def on_save_point(self, iteration, point):
        for c in self.callbacks:
            c.on_save_point(iteration, point)

    def on_train_end(self, trainer):
        for c in self.callbacks:
            c.on_train_end(trainer)

    def on_lr(self, step, optimizer, lr):
        for c in self.callbacks:
            lr = c.on_lr(step, optimizer, lr)
        return lr

    def wants_per_sample(self, step):
        return any(c.wants_per_sample(step) for c in self.callbacks)

    def on_micro_batch_loss(self, step, j, batch, loss_sum, per_sample):
        for c in self.callbacks:
            loss_sum, per_sample = c.on_micro_batch_loss(step, j, batch, loss_sum, per_sample)
        return loss_sum, per_sample

    def on_after_backward(self, step, j, engine, per_sample, n_tokens, dp):
        for c in self.callbacks:
            c.on_after_backward(step, j, engine, per_sample, n_tokens, dp)

    def on_before_optimizer_step(self, step, loss, skip):
        force = False
        for c in self.callbacks:
            force = c.on_before_optimizer_step(step, loss, skip or force) or force
        return force

    def on_optimizer_step_end(self, step, result):
        for c in self.callbacks:
            c.on_optimizer_step_end(step, result)


__all__ = ["Callback", "CallbackList"]
