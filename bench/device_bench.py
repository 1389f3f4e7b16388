#!/usr/bin/env python
"""The measurement half of bench/device_check.sh: training throughput, MFU and peak memory of
the real training entry point (``pretrain_llama.py``) under each speed option, one subprocess
per variant, on synthetic packed data.

GPU (default): the ``1b`` preset, seq 4096, bf16, ZeRO-0, TP=1, micro-batch 1, vocab 32000.
``--cpu-dry-run``: the same steps with the ``tiny`` preset, seq 128, fp32 on the CPU; variants that
need CUDA are listed as skipped with the reason. Variants:

  eager            --attention-backend sdpa (the baseline every ratio is taken against)
  compile          + --compile
  attn-<backend>   --attention-backend flash | flex | eager (each one this machine can run)
  fused-<impl>     --fused-kernels liger | apex (when importable on CUDA)
  chunked-ce       --cross-entropy-impl chunked

A variant that the training config refuses (an unknown flag on an older checkout, a backend that
cannot run here) is reported with the refusal line, not dropped. Per variant: median over the
steps after ``--warmup`` of tokens/s per device, TFLOP/s per device and MFU (as the training log
computes them, ``megatron_lite.training.metrics``), the peak memory the log reports
(``torch.cuda.max_memory_allocated`` on CUDA, the process's max RSS on CPU), and the planner's
per-device estimate for the same flags (``planning.run_config``), with their ratio.

    python bench/device_bench.py --out /tmp/dc            # on a GPU machine
    python bench/device_bench.py --out /tmp/dc --cpu-dry-run
Writes ``<out>/device_bench.json`` (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_lite.config import ConfigError, parse_args as parse_run_args  # noqa: E402
from megatron_lite.data.indexed import IndexedDatasetBuilder  # noqa: E402
from megatron_lite.planning.plan import make_plan  # noqa: E402
from megatron_lite.planning.run_config import PLANNER_DEFAULTS, inputs_from_config  # noqa: E402
from megatron_lite.utils import atomic_write_text  # noqa: E402

VOCAB = 32000
GPU_SHAPE = ["--model-size", "1b", "--seq-length", "4096", "--micro-batch-size", "1", "--bf16"]
CPU_SHAPE = ["--model-size", "tiny", "--seq-length", "128", "--micro-batch-size", "2", "--device", "cpu"]


def variants(cuda: bool) -> list[tuple[str, list[str], str | None]]:
    """(name, extra flags, reason to skip or None) for every variant of the module docstring."""
    from megatron_lite.model.attention import flash_attn_available, flex_attention_available

    def need_cuda(mod: str | None = None) -> str | None:
        if not cuda:
            return "needs CUDA (GPU step skipped in --cpu-dry-run)"
        if mod is not None:
            try:
                __import__(mod)
            except ImportError as e:
                return f"{mod} not importable ({e.__class__.__name__}: {e})"
        return None

    out = [("eager", ["--attention-backend", "sdpa"], None),
           ("compile", ["--attention-backend", "sdpa", "--compile"], None),
           ("attn-flash", ["--attention-backend", "flash"],
            need_cuda() or (None if flash_attn_available() else "flash_attn not importable")),
           ("attn-flex", ["--attention-backend", "flex"],
            need_cuda() or (None if flex_attention_available() else "torch has no flex_attention")),
           ("attn-eager", ["--attention-backend", "eager"], None),
           ("fused-liger", ["--attention-backend", "sdpa", "--fused-kernels", "liger"], need_cuda("liger_kernel")),
           ("fused-apex", ["--attention-backend", "sdpa", "--fused-kernels", "apex"], need_cuda("apex")),
           ("chunked-ce", ["--attention-backend", "sdpa", "--cross-entropy-impl", "chunked"], None)]
    return out


def make_data(prefix: str, tokens: int, seed: int = 1234) -> None:
    """Random documents (lengths 200..3000 tokens, uniform) of ids in [1, VOCAB) ending in EOD 0,
    ``tokens`` in all, as one Megatron .bin/.idx pair at ``prefix``."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    n = 0
    while n < tokens:
        doc = rng.integers(1, VOCAB, size=int(rng.integers(200, 3000)), dtype=np.int32)
        doc[-1] = 0
        builder.add_document(doc, [len(doc)])
        n += len(doc)
    builder.finalize(prefix + ".idx")


def common_flags(args, data_prefix: str) -> list[str]:
    shape = CPU_SHAPE if args.cpu_dry_run else GPU_SHAPE
    return shape + ["--vocab-size", str(VOCAB), "--zero-stage", "0", "--tp", "1", "--global-batch-size",
                    shape[shape.index("--micro-batch-size") + 1], "--train-iters", str(args.steps),
                    "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "1", "--log-interval", "1",
                    "--eval-interval", "0", "--data-path", data_prefix, "--seed", "1234"]


def planner_bytes(flags: list[str], gpu: str | None) -> int | None:
    """The planner's per-device memory estimate for these training flags (None if it cannot plan)."""
    try:
        cfg = parse_run_args(flags, world_size=1)
        pargs = SimpleNamespace(**{**PLANNER_DEFAULTS, "gpu": gpu or "cpu",
                                   "tokens_per_sec": 1.0 if gpu is None else None})
        inp, _ = inputs_from_config(cfg, pargs)
        return int(make_plan(inp)["memory_per_gpu_bytes"])
    except (ConfigError, ValueError, KeyError, SystemExit):
        return None


def gpu_kind() -> str | None:
    """The planner's GPU name for the visible device (h100/h200/a100), None on CPU or unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    for kind in ("h200", "h100", "a100"):
        if kind in name:
            return kind
    return None


def run_variant(name: str, flags: list[str], out: str, warmup: int, timeout: int) -> dict:
    """Train with ``flags`` in a subprocess; the medians of its metrics.jsonl after ``warmup``."""
    metrics = os.path.join(out, f"{name}.metrics.jsonl")
    log = os.path.join(out, f"{name}.log")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_llama.py"), *flags, "--metrics-file", metrics]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"name": name, "status": f"timed out after {timeout} s (log: {log})"}
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(log) as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
        last = next((ln for ln in reversed(lines) if "rror" in ln or "refus" in ln), lines[-1] if lines else "")
        return {"name": name, "status": f"failed (exit {rc}): {last[:200]}", "log": log}
    recs = [json.loads(ln) for ln in open(metrics) if ln.strip()]
    train = [r for r in recs if r.get("type") == "train" and r["step"] > warmup]
    if not train:
        return {"name": name, "status": f"no train records after step {warmup} (log: {log})"}

    def med(key):
        vals = [r[key] for r in train if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {"name": name, "status": "ok", "wall_s": wall, "steps_measured": len(train),
            "tokens_per_sec_per_device": med("tokens_per_sec_per_device"),
            "tflops_per_device": med("tflops_per_device"), "mfu": med("mfu"),
            "step_time_s": med("step_time_s"),
            "peak_memory_bytes": max(int(r.get("peak_memory_bytes") or 0) for r in train),
            "loss_last": train[-1]["loss"]}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["name"] == "eager" and r["status"] == "ok"), None)
    head = f"{'variant':<12} {'tok/s/dev':>10} {'x eager':>8} {'TFLOP/s':>8} {'MFU':>6} " \
           f"{'peak mem':>10} {'planned':>10} {'meas/plan':>9}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<12} {'-':>10} {'-':>8} {'-':>8} {'-':>6} {'-':>10} {'-':>10} {'-':>9}  "
                         f"{r['status']}")
            continue
        tps = r["tokens_per_sec_per_device"]
        ratio = f"{tps / base['tokens_per_sec_per_device']:.2f}" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        plan = r.get("planned_bytes")
        mem = r["peak_memory_bytes"]
        lines.append(f"{r['name']:<12} {tps:>10.0f} {ratio:>8} {r['tflops_per_device']:>8.3g} {mfu:>6} "
                     f"{mem / 2**30:>9.2f}G {(plan / 2**30 if plan else float('nan')):>9.2f}G "
                     f"{(mem / plan if plan else float('nan')):>9.2f}  ok")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for data, per-variant logs and device_bench.json")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU; CUDA-only variants skipped")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (default 12 GPU, 4 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default 4 GPU, 2 CPU)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        print("device_bench: no CUDA device visible; rerun with --cpu-dry-run", file=sys.stderr)
        return 2
    args.steps = args.steps or (12 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (4 if cuda else 2)
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, "data", "synthetic_text_document")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    seq = 128 if args.cpu_dry_run else 4096
    make_data(prefix, tokens=int(1.5 * (args.steps + 2) * 2 * (seq + 1)) + 20000)
    flags = common_flags(args, prefix)
    gpu = gpu_kind()
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for name, extra, skip in variants(cuda):
        if only and name not in only:
            continue
        if skip:
            rows.append({"name": name, "status": f"skipped: {skip}"})
        else:
            row = run_variant(name, flags + extra, args.out, args.warmup, args.timeout)
            row["planned_bytes"] = planner_bytes(flags + extra, gpu if cuda else None)
            rows.append(row)
        print(f"device_bench: {name}: {rows[-1]['status']}", flush=True)
    text = table(rows)
    print(text)
    device = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    atomic_write_text(os.path.join(args.out, "device_bench.json"),
                      json.dumps({"device": device, "torch": torch.__version__, "flags": flags,
                                  "rows": rows, "table": text}, indent=1) + "\n")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
