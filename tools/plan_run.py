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
from megatron_lite.planning.plan import PlanInputs, make_plan  # noqa: E402
from megatron_lite.planning.time_cost import GPU_SPECS, peak_flops  # noqa: E402

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


def _deepspeed_notes(path: str | None, cfg) -> list[str]:
    """Numeric batch fields of a DeepSpeed JSON that disagree with A = GB_tok/(μ_tok·D).

    (Its ZeRO stage and offloads are already adopted into ``cfg.parallel`` by the training
    config's validation, ``config.deepspeed_json.reconcile_user_json``.)
    """
    if not path:
        return []
    from megatron_lite.config.deepspeed_json import read_json_with_comments

    ds, d, notes = read_json_with_comments(path), cfg.derived, []
    want = {"train_micro_batch_size_per_gpu": cfg.training.micro_batch_size,
            "gradient_accumulation_steps": d.num_micro_batches,
            "train_batch_size": d.global_batch_size}
    for key, value in want.items():
        got = ds.get(key)
        if isinstance(got, (int, float)) and got != value:
            notes.append(f"{path}: {key} = {got} disagrees with the definition "
                         f"A = GB_tok/(μ_tok·D) (this plan: {value}); set it to \"auto\"")
    return notes


def _recompute(model) -> str:
    gran = model.recompute_granularity
    return {"full": "full", "selective": "selective"}.get(gran or "", "none")


def target_precision(cfg, gpu: str) -> tuple[str, str]:
    """The precision a run of ``cfg`` trains with on the target device ``--gpu``, and a note.

    ``--bf16/--fp16/--fp32`` (flag or YAML) win; otherwise the training default for the target,
    bf16 on a GPU and fp32 on CPU (``config/derive.py``), never the precision
    ``derive_and_check`` resolved for the machine the planner happens to run on.
    """
    tr = cfg.training
    if tr.bf16 or tr.fp16 or tr.fp32:
        prec = "bf16" if tr.bf16 else "fp16" if tr.fp16 else "fp32"
        note = f"precision {prec}: given (--{prec})"
        if gpu != "cpu" and prec == "fp32":
            note += ("; memory and peak FLOP/s are planned for fp32 weights/activations and the "
                     "TF32 peak (GPU runs normally use bf16)")
        if gpu == "cpu" and prec == "fp16":
            note += "; training refuses --fp16 on CPU (DeepSpeed has no fp16 CPU path)"
        return prec, note
    if gpu == "cpu":
        return "fp32", ("precision fp32: the training default on CPU (bf16 is ~30x slower "
                        "there); --bf16 to plan bf16")
    return "bf16", (f"precision bf16: the training default on a GPU (--gpu {gpu}); --fp32 or "
                    f"--fp16 to plan another")


def inputs_from_config(cfg, args) -> tuple[PlanInputs, list[str]]:
    """Build :class:`PlanInputs` from a finalized RunConfig and the planner flags (precision:
    :func:`target_precision` for ``--gpu``; its note comes first in the returned notes)."""
    from megatron_lite.model.counting import flops_per_token, num_parameters

    m, d = cfg.model, cfg.derived
    precision, precision_note = target_precision(cfg, args.gpu)
    if not d.padded_vocab_size:
        raise ValueError("the vocabulary size is unknown: pass --vocab-size (e.g. 32000) or set "
                         "model.vocab_size in the YAML; the planner needs no tokenizer")
    non_emb, total = num_parameters(m)
    # counting.py uses the true vocab; memory holds the padded embedding (and LM head) rows
    padded = total + (d.padded_vocab_size - m.vocab_size) * m.hidden_size * (
        1 if m.tie_word_embeddings else 2)
    notes = [precision_note] + _deepspeed_notes(cfg.parallel.deepspeed_config, cfg)
    par = cfg.parallel
    gpu = args.gpu
    spec = GPU_SPECS.get(gpu, {})
    if args.device_memory_gb is not None:
        mem = int(args.device_memory_gb * memory.GiB)
    elif gpu == "cpu":
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        notes.append(f"device memory: this machine's RAM ({mem / memory.GiB:.1f} GiB); pass "
                     f"--device-memory-gb to plan another CPU host")
    else:
        mem = spec["memory_bytes"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_flops(gpu, precision) if gpu != "cpu" else None)
    overhead = args.memory_overhead_gb if args.memory_overhead_gb is not None else (
        0.0 if gpu == "cpu" else 2.0)
    backend = m.attention_backend or "auto"
    groups = m.num_query_groups or m.num_attention_heads
    inp = PlanInputs(
        hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_query_groups=groups,
        ffn_hidden_size=m.ffn_hidden_size, padded_vocab_size=d.padded_vocab_size,
        seq_length=m.seq_length, n_params_total=total, n_params_non_embedding=non_emb,
        n_params_padded=padded,
        flops_per_token=flops_per_token(m, m.seq_length), num_gpus=d.world_size,
        micro_batch_size=cfg.training.micro_batch_size,
        global_batch_tokens=d.global_batch_tokens, train_tokens=d.train_tokens,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        zero_stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
        offload_params=par.offload_params,
        precision=precision, recompute=_recompute(m),
        recompute_num_layers=m.recompute_num_layers,
        flash_attention=backend != "eager",
        gpu=gpu, device_memory_bytes=mem, peak_flops=peak,
        memory_overhead_bytes=int(overhead * memory.GiB), tokens_per_sec=args.tokens_per_sec,
        mfu=None if args.tokens_per_sec else args.mfu, price_gpu_hour=args.price_gpu_hour,
        price_kwh=args.price_kwh, pue=args.pue,
        gpu_power_kw=args.gpu_power_kw if args.gpu_power_kw is not None else
        spec.get("power_kw", 0.0 if gpu == "cpu" else 0.7),
        cost_other=args.other_cost)
    return inp, notes


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
        ("GPUs = D x TP x PP", f"{p['num_gpus']} = {p['dp']} x {p['tp']} x {p['pp']}"),
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
