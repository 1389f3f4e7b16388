#!/usr/bin/env python
"""Chinchilla calculator: compute-optimal N and T for a FLOP budget, or the loss of a given N, T.

Examples::

    python tools/chinchilla.py --flops 5.76e23             # compute-optimal N, T (approach 3, 20x)
    python tools/chinchilla.py --params 7e9 --tokens 1e12  # FLOPs and predicted loss of a plan
    python tools/chinchilla.py --gpus 64 --gpu h100 --mfu 0.45 --days 30   # budget from a cluster

Formulas and constants: ``megatron_lite.planning.chinchilla`` (Hoffmann et al. 2022, approach 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.planning import chinchilla  # noqa: E402
from megatron_lite.planning.time_cost import GPU_SPECS, SECONDS_PER_DAY, peak_flops  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of this tool."""
    p = ToolArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops", type=float, help="compute budget C, FLOPs")
    p.add_argument("--params", type=float, help="N, parameters (with --tokens: evaluate a plan)")
    p.add_argument("--tokens", type=float, help="T, training tokens")
    p.add_argument("--gpus", type=int, help="budget from a cluster: number of GPUs")
    p.add_argument("--gpu", default="h100", choices=sorted(GPU_SPECS), help="device type (peak)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (overrides --gpu)")
    p.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilisation for --gpus")
    p.add_argument("--days", type=float, help="wall-clock days for --gpus")
    p.add_argument("--tokens-per-param", type=float, default=chinchilla.TOKENS_PER_PARAM,
                   help="ratio of the rule-of-thumb allocation (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(argv=None) -> dict:
    """Parse ``argv``, compute, print; returns the result dict.

    Raises:
        SystemExit: inconsistent flags (argparse error naming the fix).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("flops", "params", "tokens", "gpus", "peak_tflops", "mfu", "days",
                 "tokens_per_param"):
        value = getattr(args, flag)
        if value is not None and not value > 0:  # also NaN
            parser.error(f"--{flag.replace('_', '-')} must be > 0 (got {value:g})")
    out: dict = {}
    flops = args.flops
    if args.gpus is not None:
        if args.days is None:
            parser.error("--gpus needs --days (wall-clock budget)")
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(args.gpu, "bf16")
        flops = args.gpus * peak * args.mfu * args.days * SECONDS_PER_DAY
        out["budget_from_cluster"] = {"gpus": args.gpus, "peak_flops": peak, "mfu": args.mfu,
                                      "days": args.days}
    if args.params is not None or args.tokens is not None:
        if args.params is None or args.tokens is None:
            parser.error("--params and --tokens go together")
        out["plan"] = {"n_params": args.params, "tokens": args.tokens,
                       "flops": chinchilla.flops_for(args.params, args.tokens),
                       "tokens_per_param": args.tokens / args.params,
                       "loss": chinchilla.predicted_loss(args.params, args.tokens)}
        if flops is None:
            flops = out["plan"]["flops"]
    if flops is None:
        parser.error("give --flops, --params with --tokens, or --gpus with --days")
    out["flops"] = flops
    for key, res in (("approach3", chinchilla.compute_optimal(flops)),
                     ("tokens_per_param_rule", chinchilla.twenty_tokens_rule(
                         flops, args.tokens_per_param))):
        out[key] = {"n_params": res.n_params, "tokens": res.tokens,
                    "tokens_per_param": res.tokens_per_param, "loss": res.loss}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"compute budget C = {flops:.4g} FLOPs")
        if "plan" in out:
            pl = out["plan"]
            print(f"given plan: N = {pl['n_params']:.4g}, T = {pl['tokens']:.4g} tokens "
                  f"({pl['tokens_per_param']:.1f} tokens/param), 6NT = {pl['flops']:.4g} FLOPs, "
                  f"predicted loss {pl['loss']:.4f}")
        print(f"{'allocation':<34}{'N params':>12}{'T tokens':>12}{'T/N':>8}{'loss':>9}")
        for key, name in (("approach3", "Chinchilla approach 3 (eq. 4)"),
                          ("tokens_per_param_rule", f"{args.tokens_per_param:g} tokens/param")):
            r = out[key]
            print(f"{name:<34}{r['n_params']:>12.4g}{r['tokens']:>12.4g}"
                  f"{r['tokens_per_param']:>8.1f}{r['loss']:>9.4f}")
    return out


if __name__ == "__main__":
    run()
