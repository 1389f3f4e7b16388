"""Validation every ``--eval-interval`` steps (and after the last one), the test split once at the
end of training; results go to the logger (console, TensorBoard, metrics.jsonl)."""

from __future__ import annotations

from megatron_lite.training.evaluation import evaluate


class PeriodicEval:
    """Runs :func:`~megatron_lite.training.evaluation.evaluate` when the schedule says so.

    Args:
        cfg: finalized RunConfig (``eval`` section, ``derived.train_iters``).
        engine: the DeepSpeed engine (``engine.module`` is evaluated, then put back in train mode).
        valid_loader: the validation split's loader (None: no validation).
        test_loader: the test split's loader (None: no test evaluation).
        logger: the ``TrainingLogger``; evaluation time is excluded from training time.
        device: compute device.
        valid_corpora: ``[(name, loader), ...]``: each corpus of a blended validation split on its
            own (``build_corpus_datasets``); each is evaluated on ``--eval-iters`` micro-batches
            after the blend and logged as ``val_loss/<name>``, ``val_ppl/<name>``. Empty: the
            blend alone, as before.
        test_corpora: the same for the test split (``test_loss/<name>``, ``test_ppl/<name>``).
    """

    def __init__(self, cfg, engine, valid_loader, test_loader, logger, device, valid_corpora=(),
                 test_corpora=()):
        self.cfg, self.engine, self.logger, self.device = cfg, engine, logger, device
        self.valid_loader, self.test_loader = valid_loader, test_loader
        self.valid_corpora, self.test_corpora = list(valid_corpora), list(test_corpora)
        # fn(iteration, per_corpus) after each validation (online data mixing reads the losses).
        self.listeners: list = []

    def maybe_validate(self, iteration: int) -> None:
        """Validate after step ``iteration`` if it is an eval step or the last step."""
        interval = self.cfg.eval.eval_interval
        if not interval or self.valid_loader is None:
            return
        if iteration % interval and iteration != self.cfg.derived.train_iters:
            return
        res = self._evaluate(self.valid_loader)
        per_corpus = {name: self._evaluate(loader) for name, loader in self.valid_corpora}
        self.logger.log_eval(iteration, res["val_loss"], tokens=res.get("tokens"),
                             per_corpus=per_corpus)
        for fn in self.listeners:
            fn(iteration, per_corpus)

    def test(self, iteration: int) -> None:
        """Evaluate the test split once after the last step (Megatron's ``do_test``):
        ``--eval-iters`` micro-batches per DP rank; logged as ``test_loss``/``test_ppl``
        (console, TensorBoard ``test/``, metrics.jsonl record of type ``test``). Nothing when
        the test split is empty."""
        if self.test_loader is None:
            return
        res = self._evaluate(self.test_loader)
        per_corpus = {name: self._evaluate(loader) for name, loader in self.test_corpora}
        self.logger.log_eval(iteration, res, split="test", per_corpus=per_corpus)

    def _evaluate(self, loader) -> dict:
        with self.logger.exclude_time():
            res = evaluate(self.engine.module, iter(loader), self.cfg.eval.eval_iters,
                           device=self.device)
            self.engine.module.train()
        return res


__all__ = ["PeriodicEval"]
