"""Evaluation: validation loss / perplexity during training and stream perplexity of a checkpoint."""

from megatron_lite.config.sections import EvalConfig
from megatron_lite.training.evaluation import evaluate
from megatron_lite.eval.perplexity import (build_stream, plan_windows, stream_perplexity,
                                           window_batches)

__all__ = ["EvalConfig", "evaluate", "build_stream", "plan_windows", "window_batches",
           "stream_perplexity"]
