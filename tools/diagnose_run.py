#!/usr/bin/env python
"""Run doctor: read a run's metrics.jsonl, spike captures and config, and print what looks wrong.

Example::

    python tools/diagnose_run.py runs/quickstart/ckpt
    python tools/diagnose_run.py runs/quickstart/ckpt/metrics.jsonl --json --clip-grad 1.0

Each finding names its evidence (steps, values) and the usual remedy: loss spikes (with the
captured samples), divergence, grad-norm growth, loss rising during warmup, no progress after
warmup, plateau, skipped steps, grad clipping on most steps, data-loading stall, throughput drop
against the run's own median, validation loss rising while the train loss falls (blend and per
corpus), one corpus lagging the others. The checks and their thresholds are described in
megatron_lite/analysis/doctor.py; every threshold is a flag below (default in brackets).

Exit status: 0 healthy, 1 warnings, 2 critical findings (or a bad input, with one error line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.analysis.doctor import (Thresholds, diagnose, exit_status,  # noqa: E402
                                           format_report, report_dict)
from megatron_lite.analysis.run_data import load_run  # noqa: E402

HELP = {
    "spike_sigma": "loss spike: robust standard deviations above the previous records' median",
    "spike_window": "loss spike: previous train records the median is taken over",
    "max_spikes": "this many spikes or more is critical",
    "divergence_rise": "divergence: relative rise of the loss above its lowest point after warmup",
    "grad_norm_growth": "grad-norm growth: last/first quarter median ratio after warmup",
    "warmup_rise": "loss rising during warmup: relative rise above the first logged loss",
    "min_progress": "no progress: least relative fall of the loss from warmup's end to the end",
    "plateau_fraction": "plateau: share of the post-warmup records examined at the end",
    "plateau_min_drop": "plateau: least relative fall between the halves of that tail",
    "max_skipped_fraction": "skipped steps: largest tolerated share of the steps",
    "clip_fraction": "grad clipping: largest tolerated share of post-warmup steps above the clip",
    "data_wait_share": "data stall: largest tolerated share of the step time spent waiting",
    "throughput_drop": "throughput drop: relative fall below the run's median tokens/s",
    "eval_rise": "eval loss rising: relative rise above the lowest validation loss",
    "corpus_gap": "corpus divergence: relative change worse than the others' median by this",
    "clip_grad": "clipping threshold (default: the run config's --clip-grad)",
    "warmup_steps": "warmup length in steps (default: the run config's, else the LR's peak)",
}


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run folder (--save) or metrics.jsonl path")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    for f in dataclasses.fields(Thresholds):
        kind = int if f.name in ("spike_window", "max_spikes", "warmup_steps") else float
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       help=f"{HELP[f.name]} [{f.default}]")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    th = Thresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Thresholds)})
    run = load_run(args.run)
    findings = diagnose(run, th)
    if args.json:
        print(json.dumps(report_dict(run, findings), indent=1))
    else:
        print(format_report(run, findings))
    return exit_status(findings)


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("diagnose_run.py", main))
