#!/usr/bin/env python
"""Offline gradient noise scale of a checkpoint on a dataset, and a suggested GB_tok.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training", appendix A.1: for a
gradient estimated on B tokens, E[|G_B|^2] = |G|^2 + tr(Sigma) / B. This tool measures the mean
squared gradient norm at several batch sizes (``--batch-sizes``, in samples of ``seq_length``
tokens; ``--num-batches`` independent batches each, no optimizer), fits that line in 1/B by least
squares (with two batch sizes the fit is exactly the unbiased estimators A.2/A.3) and reports

    B_simple = tr(Sigma) / |G|^2   (tokens)

which approximates the critical batch size B_crit; the suggested global batch GB_tok is B_simple
rounded to a whole number of samples (at least one). Samples are the dataset's documents
concatenated in on-disk order and cut into ``seq_length + 1``-token windows; each batch draws its
samples at random without replacement (``--seed``). The gradient is that of the token-mean loss
over the batch. Runs on one process at TP=1 (any saved TP degree is resharded on load).

Usage::

    python tools/noise_scale_estimator.py --load CKPT_DIR --data-path PREFIX \\
        --batch-sizes 1,2,4,8 --num-batches 8 [--output result.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder or --save directory")
    p.add_argument("--data-path", required=True, help="dataset prefix (without .bin/.idx)")
    p.add_argument("--batch-sizes", default="1,2,4,8",
                   help="comma-separated batch sizes in samples (at least two distinct)")
    p.add_argument("--num-batches", type=int, default=8,
                   help="independent batches averaged per batch size")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sample (default: the checkpoint's --seq-length)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--output", default=None, help="write the result as JSON here (atomic)")
    return p


def fit_noise_scale(batch_tokens, mean_sq_norms) -> tuple[float, float]:
    """Least-squares fit of ``E|G_B|^2 = |G|^2 + tr(Sigma) / B`` over the measured batch sizes.

    Args:
        batch_tokens: batch sizes B (tokens), at least two distinct values.
        mean_sq_norms: mean squared gradient norm measured at each B.

    Returns:
        ``(|G|^2, tr(Sigma))``; with two batch sizes these equal eq. A.2 / A.3 exactly.

    Raises:
        ValueError: fewer than two distinct batch sizes.
    """
    xs = [1.0 / float(b) for b in batch_tokens]
    ys = [float(y) for y in mean_sq_norms]
    if len(set(xs)) < 2:
        raise ValueError("--batch-sizes: need at least two distinct batch sizes")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def suggest_global_batch_tokens(b_simple_tokens: float, seq_length: int) -> int | None:
    """B_simple rounded to whole samples of ``seq_length`` tokens (>= 1 sample); None when the
    estimate is not positive and finite."""
    if not (math.isfinite(b_simple_tokens) and b_simple_tokens > 0):
        return None
    return max(1, round(b_simple_tokens / seq_length)) * seq_length


def _samples(prefix: str, seq_length: int):
    import numpy as np

    from megatron_lite.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    stream = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])
    n = (len(stream) - 1) // seq_length
    if n < 1:
        raise ValueError(f"--data-path {prefix}: {len(stream)} tokens, fewer than one sample of "
                         f"{seq_length + 1}")
    return stream, n


def squared_grad_norm(model, tokens, labels) -> tuple[float, int]:
    """|grad of the token-mean loss|^2 of one batch (``tokens``/``labels`` [B, s]) and its tokens."""
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels).float().mean()
    loss.backward()
    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()
             if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return sq, tokens.numel()


def main(argv: list[str] | None = None) -> dict:
    """Measure, fit, print and optionally write the result. Returns the result dict.

    Raises:
        ValueError, FileNotFoundError: bad flags, checkpoint or data (the script prints them as
            one line, exit 2).
    """
    args = build_parser().parse_args(argv)
    import numpy as np
    import torch

    from megatron_lite.checkpoint.weights import load_model_for_inference
    from megatron_lite.training.callbacks.noise_scale import unbiased_estimates

    try:
        sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})
    except ValueError:
        sizes = []
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError(f"--batch-sizes {args.batch_sizes}: give at least two distinct sizes "
                         ">= 1, comma-separated (e.g. 4,8,16,32)")
    if args.num_batches < 1:
        raise ValueError(f"--num-batches must be >= 1 (got {args.num_batches})")
    if args.output:
        from megatron_lite.config.checks import check_output_path

        check_output_path("--output", args.output, "file")  # before the measurement, not after
    model, cfg = load_model_for_inference(args.load, 0, 1)
    seq = int(args.seq_length or cfg.model.seq_length)
    device = torch.device(args.device)
    model.to(device).train()
    stream, n = _samples(args.data_path, seq)
    if sizes[-1] > n:
        raise ValueError(f"--batch-sizes: {sizes[-1]} samples > the {n} the dataset holds")
    rng = np.random.default_rng(args.seed)
    rows = []
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    try:
        for b in sizes:
            sqs = []
            for _ in range(args.num_batches):
                idx = rng.choice(n, size=b, replace=False)
                win = np.stack([stream[i * seq:i * seq + seq + 1] for i in idx])
                t = torch.from_numpy(win).to(device)
                sq, _ = squared_grad_norm(model, t[:, :-1], t[:, 1:])
                sqs.append(sq)
            rows.append({"batch_samples": b, "batch_tokens": b * seq,
                         "mean_sq_grad_norm": float(np.mean(sqs)),
                         "std_sq_grad_norm": float(np.std(sqs))})
    finally:
        torch.set_grad_enabled(prev)
    g2, trace = fit_noise_scale([r["batch_tokens"] for r in rows],
                                [r["mean_sq_grad_norm"] for r in rows])
    b_simple = trace / g2 if g2 > 0 else float("nan")
    pair = unbiased_estimates(rows[0]["batch_tokens"], rows[0]["mean_sq_grad_norm"],
                              rows[-1]["batch_tokens"], rows[-1]["mean_sq_grad_norm"])
    result = {"load": args.load, "data_path": args.data_path, "seq_length": seq, "rows": rows,
              "g2": g2, "trace_sigma": trace, "b_simple_tokens": b_simple,
              "b_simple_from_extremes_tokens": pair[1] / pair[0] if pair[0] > 0 else float("nan"),
              "suggested_global_batch_tokens": suggest_global_batch_tokens(b_simple, seq)}
    for r in rows:
        print(f"B = {r['batch_samples']:5d} samples ({r['batch_tokens']:8d} tokens): "
              f"E|G_B|^2 = {r['mean_sq_grad_norm']:.6g} (std {r['std_sq_grad_norm']:.3g})")
    print(f"|G|^2 = {g2:.6g}, tr(Sigma) = {trace:.6g} -> B_simple = {b_simple:.6g} tokens")
    if result["suggested_global_batch_tokens"] is None:
        print("B_simple is not positive: the noise dominates; raise --num-batches")
    else:
        print(f"suggested --global-batch-tokens {result['suggested_global_batch_tokens']} "
              f"(B_crit ~ B_simple, McCandlish et al. 2018)")
    if args.output:
        tmp = f"{args.output}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.output)
    return result


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("noise_scale_estimator.py", main))
