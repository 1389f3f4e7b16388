"""``pretrain(cfg)``: the :class:`Trainer` and its loop.

Set-up lives in :mod:`megatron_lite.training.setup`, one optimizer step in
:mod:`megatron_lite.training.step`; evaluation, checkpoint saving, exit signals and the optional
behaviour (spike guard, noise scale, test faults) are components and callbacks in
:mod:`megatron_lite.training.callbacks` (protocol: :mod:`megatron_lite.training.callbacks.base`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from megatron_lite.config.batch_ramp import ramp_from_config
from megatron_lite.config.checks import check_runtime
from megatron_lite.errors import ConfigError
from megatron_lite.checkpoint import engine_state
from megatron_lite.training.callbacks.base import Callback, CallbackList
from megatron_lite.training.callbacks.checkpoint_saver import CheckpointSaver
from megatron_lite.training.callbacks.data_mixing import DataMixing
from megatron_lite.training.callbacks.extras import extras_state, setup_extras
from megatron_lite.training.callbacks.periodic_eval import PeriodicEval
from megatron_lite.training.callbacks.profiler import ProfilerCallback
from megatron_lite.training.callbacks.signals import ExitCheck, worker_signals
from megatron_lite.training.callbacks.stall_watchdog import StallWatchdog
from megatron_lite.training.callbacks.summary import TrainingSummary
from megatron_lite.training.comm_timing import install_deepspeed_comm_timing
from megatron_lite.training.deepspeed_engine import set_step_batch
from megatron_lite.training.run_lock import RunLock
from megatron_lite.training.setup import (Components, build_components, build_data, make_logger,
                                          run_folder, train_batches, write_run_folder)
from megatron_lite.training.train_state import StepResult, TrainState
from megatron_lite.training.step import train_step

ResumeFallback = Callable[[Any, Any], None]


class Trainer:
    """One training run over built :class:`~megatron_lite.training.setup.Components`.

    Call :meth:`resume`, then (unless :meth:`finished`) :meth:`prepare` and :meth:`fit`.

    Args:
        cfg: finalized RunConfig.
        comp: device, rank, model, optimizer, engine, scheduler.
        callbacks: the caller's callbacks; the spike guard and the noise-scale estimator are
            appended after them when their flags are on.
    """

    def __init__(self, cfg, comp: Components, callbacks: Iterable[Callback] = ()):
        self.cfg, self.device, self.rank = cfg, comp.device, comp.rank
        self.model, self.optimizer = comp.model, comp.optimizer
        self.engine, self.scheduler = comp.engine, comp.scheduler
        self.state = TrainState()
        self.callbacks = CallbackList(callbacks)
        self.resumed: Optional[str] = None
        self.step_batch = cfg.derived.global_batch_size   # samples of the current step (ramp-up)
        self.guard = self.noise = None
        self.watchdog: Optional[StallWatchdog] = None

    def resume(self, fallback: Optional[ResumeFallback] = None) -> None:
        """Load ``--load``'s newest checkpoint (else ``fallback(engine, cfg)``), then build the
        spike guard / noise scale with their saved state."""
        cfg = self.cfg
        if cfg.checkpoint.load:
            self.resumed = engine_state.load_checkpoint(self.engine, cfg, self.state, self.scheduler)
            if self.resumed is None and fallback is not None:
                fallback(self.engine, cfg)
            elif self.resumed is not None:
                self._print(f"[checkpoint] loaded {self.resumed}: " + (
                    "weights only (--finetune)" if cfg.checkpoint.finetune else
                    f"iteration {self.state.iteration}, consumed samples "
                    f"{self.state.consumed_samples}, skipped steps {self.state.skipped_steps}"))
                self.callbacks.on_resume(self, self.resumed)
        self.guard, self.noise = setup_extras(
            cfg, self.optimizer, self.engine, self.state.extras,
            self.resumed is not None and not cfg.checkpoint.finetune, run_folder(cfg))
        profiler = ProfilerCallback.from_config(cfg, self.rank, self.device, run_folder(cfg))
        self.watchdog = StallWatchdog.from_config(cfg, self.rank, cfg.derived.world_size)
        self.callbacks = CallbackList([*self.callbacks, self.guard, self.noise, profiler,
                                       TrainingSummary(self.rank), self.watchdog])

    def finished(self) -> bool:
        """A requeued job restarting after its final save: nothing left to do (and no data to
        build: the train split holds exactly train_iters global batches)."""
        if self.state.iteration < self.cfg.derived.train_iters:
            return False
        self._print(f"[megatron_lite] checkpoint is at step {self.state.iteration} >= --train-iters "
                    f"{self.cfg.derived.train_iters}: training already finished; raise "
                    f"--train-iters (or --train-tokens) to continue")
        return True

    def prepare(self, data_iterators=None) -> None:
        """Run folder, data, logger, evaluation, saver and exit checks."""
        cfg, state = self.cfg, self.state
        run_dir = run_folder(cfg)
        if self.rank == 0 and run_dir:
            write_run_folder(run_dir, cfg)
        if data_iterators is not None:
            train_factory, valid_loader = data_iterators
            self.train_iter, test_loader, train_ds = train_factory(state.consumed_samples), None, None
            valid_corpora = test_corpora = []
        else:
            data = build_data(cfg, state.consumed_samples, state.data_state)
            self.train_iter = train_batches(data.train, worker_signals(cfg))
            valid_loader, test_loader, train_ds = data.valid, data.test, data.train_ds
            valid_corpora, test_corpora = data.valid_corpora, data.test_corpora
        self.logger = make_logger(cfg, self.rank, self.device,
                                  self.resumed is not None and state.iteration or None)
        install_deepspeed_comm_timing()   # DP communication in the step-time breakdown
        self.evaluator = PeriodicEval(cfg, self.engine, valid_loader, test_loader, self.logger,
                                      self.device, valid_corpora, test_corpora)
        mixing = DataMixing.from_config(cfg, train_ds, self.logger, self.rank, self.device,
                                        [name for name, _ in valid_corpora])
        if mixing is not None:   # per-corpus weights/tokens in the record; online re-weighting
            self.callbacks = CallbackList([*self.callbacks, mixing])
            self.evaluator.listeners.append(mixing.on_validation)
        self.saver = CheckpointSaver(cfg, self.engine, self.scheduler, self.logger, train_ds,
                                     lambda: extras_state(self.guard, self.noise),
                                     self.callbacks.on_save_point, self.device)
        self.exit_check = ExitCheck(cfg, self.device)
        self.ramp, self.A = ramp_from_config(cfg), cfg.derived.num_micro_batches

    def fit(self) -> TrainState:
        """The loop: eval at start, then per step: batch, step, log, eval, save, exit checks."""
        cfg, state, cb = self.cfg, self.state, self.callbacks
        self.engine.train()
        self.logger.start_interval()
        cb.on_train_start(self)
        if cfg.eval.eval_at_start and state.iteration == 0:
            self.evaluator.maybe_validate(state.iteration)
            self.engine.train()
        try:
            while state.iteration < cfg.derived.train_iters:
                micro = self._next_batch()
                cb.on_step_begin(self, state.iteration + 1, micro)
                res = train_step(self.engine, self.optimizer, self.scheduler, micro, state,
                                 cfg.training.max_skipped_steps, self.device,
                                 timers=self.logger.timers, callbacks=cb)
                state.consumed_samples += self.step_batch
                self._log_step(res)
                cb.on_step_end(self, state.iteration, res)   # spike guard: capture / rollback
                self.evaluator.maybe_validate(state.iteration)
                stop = self.exit_check.reason(state.iteration)
                self.saver.maybe_save(state, stopping=stop is not None)
                if stop is not None:
                    self._print(f"[exit] {stop}: stopping after step {state.iteration}")
                    break
            self.saver.finish()   # --async-save: the end of training waits for the pending write
            if state.iteration >= cfg.derived.train_iters:
                self.evaluator.test(state.iteration)
        except BaseException:
            self.saver.abandon()  # no collective after a failure: only let the thread end
            raise
        finally:
            if self.watchdog is not None:   # a failed step: no stall report while it unwinds
                self.watchdog.stop()
            self.logger.close()
        cb.on_train_end(self)
        return state

    def _next_batch(self) -> list:
        """This rank's micro-batches of the coming step; with a batch-size ramp-up the step's
        batch (samples) and micro-batch count A follow the consumed samples."""
        if self.ramp is not None:
            self.step_batch = self.ramp.batch_at(self.state.consumed_samples)
            self.A = set_step_batch(self.engine, self.step_batch)
        self.scheduler.set_batch(self.step_batch)
        timer = self.logger.timers("data-wait")
        timer.start()
        micro = [next(self.train_iter) for _ in range(self.A)]
        timer.stop()
        return micro

    def _log_step(self, res: StepResult) -> None:
        """The step's console line / metrics.jsonl record / TensorBoard scalars."""
        state, gb, seq = self.state, self.step_batch, self.cfg.model.seq_length
        self.logger.log_step(state.iteration, {
            "lr": res.lr, "loss": res.loss if not res.skipped else float("nan"),
            "grad_norm": res.grad_norm, "loss_scale": res.loss_scale,
            "skipped_steps": state.skipped_steps,
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_samples * seq,
            "step_loss": res.loss, "step_skipped": int(res.skipped),
            "global_batch_size": gb, "step_tokens": gb * seq,
            **self.callbacks.log_scalars()})

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


def pretrain(cfg, data_iterators=None, model_setup=None,
             resume_fallback: Optional[ResumeFallback] = None,
             callbacks: Iterable[Callback] = ()) -> TrainState:
    """Train according to a finalized RunConfig (collective over all ranks).

    Args:
        cfg: finalized :class:`megatron_lite.config.RunConfig`.
        data_iterators: optional ``(train_iter_factory, valid_loader)`` override where
            ``train_iter_factory(consumed_samples)`` returns an iterator of this rank's
            micro-batches (tests); default: :func:`~megatron_lite.training.setup.build_data`.
        model_setup: optional ``fn(model, cfg)`` called on every rank after this rank's model is
            built (ZeRO-3: already partitioned) and before the optimizer and DeepSpeed engine
            exist: load pretrained weights, set ``requires_grad=False`` on frozen parameters
            (continued pretraining, ``cpt_llama.py``). Parameters it freezes get no optimizer state.
        resume_fallback: optional ``fn(engine, cfg)`` called when ``--load`` finds no checkpoint
            of this run (CPT loads the base's optimizer state there).
        callbacks: :class:`~megatron_lite.training.callbacks.base.Callback` objects (tests' fault
            injection: :func:`megatron_lite.testing.faults.callbacks_from_env`); their hooks run
            before the spike guard's and the noise scale's.

    Returns:
        The final :class:`TrainState`.

    Raises:
        RunLockedError: (every rank) another live run holds ``--save``'s lock
            (:mod:`megatron_lite.training.run_lock`); nothing was written.
    """
    lock = RunLock()   # global rank 0 holds it from start-up to here, whatever ends the run
    try:
        check_runtime(cfg)
        dc = cfg.data
        if data_iterators is None and not (dc.data_path or dc.train_data_path):
            raise ConfigError("no training data: give --data-path PREFIX (or --train-data-path); "
                              "make PREFIX_text_document.bin/.idx with tools/preprocess_data.py")
        trainer = Trainer(cfg, build_components(cfg, lock, model_setup), callbacks)
        trainer.resume(resume_fallback)
        if trainer.finished():
            return trainer.state
        trainer.prepare(data_iterators)
        return trainer.fit()
    finally:
        lock.release()


__all__ = ["Trainer", "pretrain"]
