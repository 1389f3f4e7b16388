"""Evaluation settings (section ``eval`` of the run config)."""

from __future__ import annotations

import dataclasses

from megatron_lite.config_field import arg


@dataclasses.dataclass
class EvalConfig:
    """When and how much to evaluate on the validation split during training."""

    eval_interval: int = arg(1000, "evaluate on the validation split every this many steps "
                             "(also after the last step); 0 disables periodic evaluation")
    eval_iters: int = arg(100, "micro-batches per data-parallel rank in one evaluation; the "
                          "loss is the token mean over all of them and all DP ranks. The test "
                          "split (--test-data-path or the third --split part) is evaluated once "
                          "on this many micro-batches after the last step (logged as "
                          "test_loss/test_ppl); a split that is empty is skipped with a warning")

    eval_at_start: bool = arg(False, "also evaluate once before the first training step of a fresh "
                              "(not resumed) run, so the untrained validation loss is on record")

    def __post_init__(self):
        if self.eval_interval is None or int(self.eval_interval) < 0:
            raise ValueError(f"--eval-interval must be >= 0 (got {self.eval_interval})")
        if self.eval_iters is None or int(self.eval_iters) < 1:
            raise ValueError(f"--eval-iters must be >= 1 (got {self.eval_iters}); to turn "
                             "evaluation off use --eval-interval 0")
