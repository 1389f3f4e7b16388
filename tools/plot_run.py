#!/usr/bin/env python
"""Figures of one or several training runs from their metrics.jsonl (PNG or SVG, no display).

Example::

    python tools/plot_run.py runs/quickstart/ckpt --out runs/quickstart/plots
    python tools/plot_run.py runs/a/ckpt runs/b/ckpt --smooth 0.9 --format svg --out cmp/

RUN is a run folder (the ``--save`` folder, or any folder holding ``metrics.jsonl``) or a
metrics.jsonl path; the clipping threshold comes from the run's resolved config (the newest
checkpoint's run_config.json, else run_info.json). Several runs are overlaid with a legend.
Figures: loss (spikes and skipped steps marked), loss_loglog (against tokens), perplexity (per
corpus when logged), lr, grad_norm (with --clip-grad), throughput, mfu, step_time (stacked
breakdown), batch_size — see megatron_lite/analysis/plots.py. Prints the paths written.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.analysis.plots import build_figures, write_figures  # noqa: E402
from megatron_lite.analysis.run_data import load_run  # noqa: E402
from megatron_lite.config.checks import check_output_path  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder or metrics.jsonl path")
    p.add_argument("--out", required=True, help="folder for the figures (created)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="EMA weight in [0, 1) for the noisy curves (0: raw; 0.9 is strong)")
    p.add_argument("--format", default="png", choices=["png", "svg"], help="file format")
    p.add_argument("--labels", default=None,
                   help="comma-separated legend names, one per RUN (default: folder names)")
    return p


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)
    check_output_path("--out", args.out, "dir")   # before reading the runs and drawing
    labels = args.labels.split(",") if args.labels else [None] * len(args.runs)
    names = [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if not args.labels and len(set(names)) < len(names):  # runs/a/ckpt, runs/b/ckpt
        labels = [os.path.normpath(r) for r in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    runs = [load_run(path, name) for path, name in zip(args.runs, labels)]
    paths = write_figures(build_figures(runs, args.smooth), args.out, args.format)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("plot_run.py", main))
