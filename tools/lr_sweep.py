#!/usr/bin/env python
"""Learning-rate sweep: short runs on a grid, a heatmap of their final validation loss and a CSV.

Example (CPU, the tiny model, 2 x 2 cells of 30 steps)::

    python tools/lr_sweep.py --out runs/lr_sweep --lr 1e-3,3e-3 --global-batch-tokens 1024,2048 \\
        -- --config configs/tiny.yaml --data-path data/train_text_document --train-iters 30 \\
           --eval-interval 30 --eval-iters 4 --device cpu

Everything after ``--`` is passed to every ``pretrain_llama.py`` run (a ``--config`` YAML and
any flags); each cell adds its grid values, ``--metrics-file OUT/<cell>/metrics.jsonl`` and
``--log-interval 1`` (unless given). The
runs need a validation split (``--eval-interval`` > 0): the final validation loss of each is
read from its metrics.jsonl. Axes: ``--lr`` plus at most one of ``--global-batch-tokens``,
``--global-batch-size``, ``--lr-warmup-iters``, ``--lr-warmup-tokens``, ``--lr-warmup-fraction``
(comma-separated values; the first axis given is the heatmap's x axis). ``--nproc-per-node N``
launches each run through torchrun. ``--print-only`` prints the commands (one per line, for a
scheduler) and runs nothing; ``--collect-only`` reads the cells of such a sweep afterwards.
Writes OUT/results.csv and OUT/heatmap.png (the value in each cell, the best cell outlined,
diverged and failed runs hatched and labelled); each run's console output is OUT/<cell>/log.txt.
A run is diverged when a loss is non-finite or its final validation loss is above
``--diverge-ratio`` x its first logged training loss.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.config.checks import check_output_path  # noqa: E402
from megatron_lite.eval import lr_sweep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --out DIR --lr V1,V2,... [AXIS V1,...] [options] "
                                      "-- PRETRAIN_FLAGS...")
    p.add_argument("--out", required=True, help="sweep folder (created): one sub-folder per cell")
    for axis, flag in lr_sweep.AXES.items():
        p.add_argument(flag, dest=axis, default=None, metavar="V1,V2,...",
                       help=f"grid values of {flag}")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes per run (> 1: launched through torchrun)")
    p.add_argument("--print-only", action="store_true", help="print the commands, run nothing")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing; read the cells' metrics.jsonl, write the CSV and heatmap")
    p.add_argument("--diverge-ratio", type=float, default=1.0,
                   help="final val loss above this x the first train loss = diverged (default 1.0)")
    return p


def parse(argv: list[str] | None):
    """Split ``argv`` at ``--``; returns (args, axes, base flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    base = []
    if "--" in argv:
        k = argv.index("--")
        argv, base = argv[:k], argv[k + 1:]
    args = build_parser().parse_args(argv)
    axes = {a: lr_sweep.parse_values(getattr(args, a), a) for a in lr_sweep.AXES
            if getattr(args, a) is not None}
    # The order on the command line decides the heatmap's x axis: --lr first unless given later.
    order = {a: min((i for i, x in enumerate(argv) if x.split("=", 1)[0] == f), default=0)
             for a, f in lr_sweep.AXES.items() if a in axes}
    axes = dict(sorted(axes.items(), key=lambda kv: order[kv[0]]))
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1 (got {args.nproc_per_node})")
    if args.diverge_ratio <= 0:
        raise ValueError(f"--diverge-ratio must be > 0 (got {args.diverge_ratio})")
    if args.print_only and args.collect_only:
        raise ValueError("--print-only and --collect-only exclude each other")
    lr_sweep.check_base_args(base, axes)
    check_output_path("--out", args.out, "dir")   # before any run is launched
    return args, axes, base


def main(argv: list[str] | None = None) -> int:
    """Run (or print) the sweep; returns 0, or 1 when no cell finished ``ok``."""
    args, axes, base = parse(argv)
    cells = lr_sweep.expand_grid(axes)
    script = os.path.join(ROOT, "pretrain_llama.py")
    if args.print_only:
        for cell in cells:
            print(shlex.join(lr_sweep.cell_command(cell, base, args.out, args.nproc_per_node, script)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    statuses = None if args.collect_only else \
        lr_sweep.run_cells(cells, base, args.out, args.nproc_per_node, script,
                           log=lambda s: print(s, flush=True))
    results, _ = lr_sweep.collect(cells, list(axes), args.out, statuses, args.diverge_ratio)
    for r in results:
        loss = "-" if r.final_val_loss is None else f"{r.final_val_loss:.4f}"
        print(f"{r.cell.name:40s} val_loss {loss:>8s}  {r.status}{'  <- best' if r.best else ''}")
    print(f"wrote {os.path.join(args.out, 'results.csv')} and {os.path.join(args.out, 'heatmap.png')}")
    return 0 if any(r.best for r in results) else 1


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("lr_sweep.py", main))
