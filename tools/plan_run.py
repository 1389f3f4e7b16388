#!/usr/bin/env python
"""Plan a run before spending the cluster: FLOPs, steps, days, ¥, and per-GPU memory with a verdict.

Takes the same config as ``pretrain_llama.py`` (``--config run.yaml`` and any model / parallel /
batch flag, e.g. ``--model-size 7b --num-query-groups 32 --vocab-size 32000``: no tokenizer or data
needed) plus the planner's own flags::

    python tools/plan_run.py --config configs/pretrain_7b_4k.yaml --gpus 64 --gpu h100 --mfu 0.45 \\
        --price-gpu-hour 15 --price-kwh 0.8 --pue 1.3 --gpu-power-kw 0.7 [--json]

The plan is for the target ``--gpu``, not the machine the tool runs on: precision is
``--bf16/--fp16/--fp32`` when given, else the target's training default (bf16 on a GPU, fp32 on
cpu), and a note says which was used. Prints a table (or one JSON object with ``--json``); exit status 0 whether or not the run fits
(the verdict is in the output: FITS / DOES NOT FIT, and ``"fits"`` in JSON), 2 on a bad config.
Formulas: ``megatron_lite.planning`` (ZeRO paper for model states, Korthikanti et al. 2022 for
activations, 6·N·T and the exact per-token count for compute, the recipe's cost formulas).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how

from megatron_lite.planning import memory  # noqa: E402
from megatron_lite.planning import run_config  # noqa: E402
from megatron_lite.planning.plan import PlanInputs, make_plan  # noqa: E402
from megatron_lite.planning.time_cost import GPU_SPECS  # noqa: E402

DEFAULT_TRAIN_TOKENS = 10 ** 12  # the recipe's T_tokens when the config gives no run length


def planner_parser() -> argparse.ArgumentParser:
    """The planner's own flags (everything else is passed to the run-config parser)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --device is a run flag
    g = p.add_argument_group("planner")
    g.add_argument("--gpus", type=int, default=None,
                   help="number of devices (world size); default $WORLD_SIZE or 1")
    g.add_argument("--gpu", default="h100", choices=sorted(GPU_SPECS) + ["cpu"],
                   help="target device type: memory, peak FLOP/s, power and precision "
                        "defaults (bf16 on a GPU, fp32 on cpu, unless --bf16/--fp16/--fp32)")
    g.add_argument("--device-memory-gb", type=float, default=None,
                   help="device memory in GiB (overrides --gpu; for --gpu cpu: host RAM)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak TFLOP/s per device at the run's precision (overrides --gpu)")
    g.add_argument("--tokens-per-sec", type=float, default=None,
                   help="measured cluster throughput, tokens/s (overrides --mfu)")
    g.add_argument("--mfu", type=float, default=0.45,
                   help="model FLOPs utilisation assumed when --tokens-per-sec is not given")
    g.add_argument("--price-gpu-hour", type=float, default=0.0,
                   help="price of one GPU-hour in ¥ (yuan; give another currency's price and "
                        "read the report's ¥ figures in it)")
    g.add_argument("--price-kwh", type=float, default=0.0, help="price of one kWh in ¥ (yuan)")
    g.add_argument("--pue", type=float, default=1.3, help="data-centre PUE (>= 1)")
    g.add_argument("--gpu-power-kw", type=float, default=None,
                   help="average power per GPU incl. server share, kW (default by --gpu, H100 0.7)")
    g.add_argument("--other-cost", type=float, default=0.0,
                   help="other costs (storage, network, staff), ¥, added to the TCO")
    g.add_argument("--memory-overhead-gb", type=float, default=None,
                   help="fixed per-device overhead (CUDA context, NCCL, allocator), GiB "
                        "(default 2 on GPU, 0 on CPU)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g.add_argument("-h", "--help", action="store_true", help="show this help and the run flags")
    return p


def inputs_from_config(cfg, args) -> tuple[PlanInputs, list[str]]:
    """:func:`megatron_lite.planning.run_config.inputs_from_config` (kept here for importers)."""
    return run_config.inputs_from_config(cfg, args)


def plan_from_argv(argv: list[str]) -> dict:
    """Parse planner + run flags and return the plan dict (what ``--json`` prints).

    Raises:
        megatron_lite.config.ConfigError / ValueError: bad config, with the fix in the message.
    """
    from megatron_lite.config import parse_args

    args, rest = planner_parser().parse_known_args(argv)
    if args.gpus is not None and args.gpus < 1:  # 0 would fall back to $WORLD_SIZE below
        raise ValueError(f"--gpus must be >= 1 (got {args.gpus})")
    gpus = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    defaulted = []
    try:
        cfg = parse_args(rest, world_size=gpus)
    except ValueError as e:
        if "--train-iters" not in str(e) or "--train-tokens" in rest:
            raise
        # No run length in the config: plan the recipe's 1T tokens and say so.
        cfg = parse_args(rest + ["--train-tokens", str(DEFAULT_TRAIN_TOKENS)], world_size=gpus)
        defaulted.append(f"no --train-tokens/--train-iters given: planned the recipe's "
                         f"T_tokens = {DEFAULT_TRAIN_TOKENS:.0e}")
    inp, notes = inputs_from_config(cfg, args)
    notes = defaulted + notes
    out = make_plan(inp)
    out["notes"] = notes + out["notes"]
    out["config"] = cfg.config_file
    return out


def _gib(x: float) -> str:
    return f"{x / memory.GiB:9.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.2f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} hours"
    return f"{seconds:.0f} s"


def _ring_rows(p: dict) -> list:
    """Context parallelism's ring traffic per rank (none at CP = 1)."""
    if p.get("cp", 1) == 1:
        return []
    mib = 2 ** 20
    return [("ring K/V sent per layer", f"{p['ring_bytes_per_layer_forward'] / mib:,.1f} MiB forward, "
                                        f"{p['ring_bytes_per_layer_backward'] / mib:,.1f} MiB backward "
                                        f"(per rank and micro-batch; sequence / CP per rank)"),
            ("ring sent per step", f"{p['ring_bytes_per_step'] / 2 ** 30:,.2f} GiB per rank")]


def format_table(p: dict) -> str:
    """Human-readable plan (the same numbers as the JSON)."""
    rows = [
        ("config", p.get("config") or "(flags)"),
        ("N_params total / non-embedding", f"{p['n_params_total']:,} / "
                                           f"{p['n_params_non_embedding']:,}"),
        ("FLOPs/token exact (6N)", f"{p['flops_per_token']:.4g} ({p['flops_per_token_6n']:.4g})"),
        ("T_tokens", f"{p['tokens_train']:.4g} ({p['tokens_per_param']:.0f} tokens/param; "
                     f"Chinchilla L(N, T) = {p['chinchilla_predicted_loss']:.3f})"),
        ("FLOPs_train exact (6·N·T)", f"{p['flops_train_exact']:.4g} ({p['flops_train']:.4g})"),
        ("GPUs = D x TP x PP", f"{p['num_gpus']} = {p['dp']} x {p['tp']} x {p['pp']}")
        if p.get("cp", 1) == 1 else
        ("GPUs = D x CP x TP x PP", f"{p['num_gpus']} = {p['dp']} x {p['cp']} x {p['tp']} x {p['pp']}"),
        *_ring_rows(p),
        ("μ_batch / μ_tok", f"{p['micro_batch_size']} samples / {p['micro_batch_tokens']:,} tokens"),
        ("A = GB_tok/(μ_tok·D)", f"{p['grad_accum_steps']}"),
        ("GB_tok (samples)", f"{p['global_batch_tokens']:,} ({p['global_batch_size']})"),
        ("steps", f"{p['steps']:,}"),
        ("tokens/s (per GPU)", f"{p['tokens_per_sec']:,.0f} ({p['tokens_per_sec_per_gpu']:,.0f})"
         + (f", MFU {p['mfu']:.1%}" if "mfu" in p else "")),
        ("wall clock", f"{_duration(p['seconds'])} (recipe's 8·C·P/(GPUs·FLOP/s): "
                       f"{_duration(p['days_recipe_formula'] * 86400)})"),
        ("GPU-hours", f"{p['gpu_hours']:,.0f}"),
        ("¥ GPU", f"{p['cost_gpu']:,.0f} (at ¥{p['price_gpu_hour']:g}/GPU·h)"),
        ("energy", f"{p['energy_kwh']:,.0f} kWh (PUE {p['pue']:g}, {p['gpu_power_kw']:g} kW/GPU)"),
        ("¥ power", f"{p['cost_power']:,.0f} (at ¥{p['price_kwh']:g}/kWh)"),
        ("TCO ¥", f"{p['cost_total']:,.0f}"),
        ("memory/GPU", f"ZeRO-{p['zero_stage']}"
         + (" +offload-optimizer" if p["offload_optimizer"] else "")
         + (" +offload-params" if p["offload_params"] else "")
         + f", {p['precision']}, recompute {p['recompute']}, "
         + ("flash attention" if p["flash_attention"] else "no flash attention")),
        ("  weights", _gib(p["memory_weights_bytes"])),
        ("  gradients", _gib(p["memory_gradients_bytes"])
         + (" (through the step)" if p.get("memory_gradients_persist", True)
            else " (from backward on: total = W + O + max(act + head grads, G + step))")),
        ("  optimizer states", _gib(p["memory_optimizer_bytes"])),
        ("  ZeRO-3 gathered params", _gib(p["memory_zero3_working_bytes"])),
        ("  activations", _gib(p["memory_activations_bytes"])),
        ("  overhead", _gib(p["memory_overhead_bytes"])),
        ("  total / device", f"{_gib(p['memory_per_gpu_bytes'])} / "
                             f"{_gib(p['device_memory_bytes']).strip()}"),
        ("  host (offloaded)", _gib(p["memory_host_offload_bytes"])),
    ]
    for key, val in p["memory_activations_variants_bytes"].items():
        rc, fl = key.split("_")
        rows.append((f"  activations {rc:<9} {fl}", _gib(val)))
    rows.append(("verdict", ("FITS" if p["fits"] else "DOES NOT FIT")
                 + f"; largest micro-batch that fits: {p['max_micro_batch_size']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 planned, 2 bad config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = planner_parser().parse_known_args(argv)
    if args.help:
        planner_parser().print_help()
        from megatron_lite.config import build_parser

        print("\nrun flags (as pretrain_llama.py):")
        build_parser(prog="plan_run.py").print_help()
        return 0
    try:
        plan = plan_from_argv(argv)
    except ValueError as e:  # ConfigError is a ValueError
        print(f"plan_run.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
