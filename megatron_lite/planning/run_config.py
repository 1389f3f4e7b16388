"""A plan (:func:`megatron_lite.planning.plan.make_plan`) of a finalized training config: what
``tools/plan_run.py`` prints and the memory verdict ``--dry-run`` ends with.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from megatron_lite.config.deepspeed_json import read_json_with_comments
from megatron_lite.model.counting import flops_per_token, num_parameters
from megatron_lite.planning import memory
from megatron_lite.planning.plan import PlanInputs, make_plan
from megatron_lite.planning.time_cost import GPU_SPECS, peak_flops

# The planner flags' defaults (tools/plan_run.py), for callers that give only some of them.
PLANNER_DEFAULTS = dict(gpu="h100", device_memory_gb=None, peak_tflops=None, tokens_per_sec=None,
                        mfu=0.45, price_gpu_hour=0.0, price_kwh=0.0, pue=1.3, gpu_power_kw=None,
                        other_cost=0.0, memory_overhead_gb=None)


def deepspeed_notes(path: str | None, cfg) -> list[str]:
    """Numeric batch fields of a DeepSpeed JSON that disagree with A = GB_tok/(μ_tok·D).

    (Its ZeRO stage and offloads are already adopted into ``cfg.parallel`` by the training
    config's validation, ``config.deepspeed_json.reconcile_user_json``.)
    """
    if not path:
        return []
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


def recompute_kind(model) -> str:
    """The planner's activation-recomputation kind of a ModelConfig: "full", "selective" or
    "none" (``--recompute-granularity`` unset)."""
    gran = model.recompute_granularity
    return {"full": "full", "selective": "selective"}.get(gran or "", "none")


def target_precision(cfg, gpu: str) -> tuple[str, str]:
    """The precision a run of ``cfg`` trains with on the target device ``gpu``, and a note.

    ``--bf16/--fp16/--fp32`` (flag or YAML) win; otherwise the training default for the target,
    bf16 on a GPU and fp32 on CPU (``config/derive.py``), never the precision that
    ``finalize`` resolved for the machine the planner happens to run on.
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
    """Build :class:`PlanInputs` from a finalized RunConfig and the planner flags (``args``: the
    attributes of :data:`PLANNER_DEFAULTS`, e.g. ``tools/plan_run.py``'s parsed flags). The
    precision is :func:`target_precision` for ``args.gpu``; its note comes first in the notes.

    Raises:
        ValueError: the vocabulary size is unknown.
    """

    m, d = cfg.model, cfg.derived
    precision, precision_note = target_precision(cfg, args.gpu)
    if not d.padded_vocab_size:
        raise ValueError("the vocabulary size is unknown: pass --vocab-size (e.g. 32000) or set "
                         "model.vocab_size in the YAML; the planner needs no tokenizer")
    non_emb, total = num_parameters(m)
    # counting.py uses the true vocab; memory holds the padded embedding (and LM head) rows
    padded = total + (d.padded_vocab_size - m.vocab_size) * m.hidden_size * (
        1 if m.tie_word_embeddings else 2)
    notes = [precision_note] + deepspeed_notes(cfg.parallel.deepspeed_config, cfg)
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
        num_attention_heads=m.num_attention_heads, num_query_groups=groups, head_dim=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size, padded_vocab_size=d.padded_vocab_size,
        seq_length=m.seq_length, n_params_total=total, n_params_non_embedding=non_emb,
        n_params_padded=padded,
        flops_per_token=flops_per_token(m, m.seq_length), num_gpus=d.world_size,
        micro_batch_size=cfg.training.micro_batch_size,
        global_batch_tokens=d.global_batch_tokens, train_tokens=d.train_tokens,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        zero_stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
        offload_params=par.offload_params,
        precision=precision, recompute=recompute_kind(m),
        recompute_num_layers=m.recompute_num_layers,
        flash_attention=backend != "eager",
        cross_entropy_chunk_tokens=(m.cross_entropy_chunk_size if m.cross_entropy_impl == "chunked"
                                    else None),
        gpu=gpu, device_memory_bytes=mem, peak_flops=peak,
        memory_overhead_bytes=int(overhead * memory.GiB), tokens_per_sec=args.tokens_per_sec,
        mfu=None if args.tokens_per_sec else args.mfu, price_gpu_hour=args.price_gpu_hour,
        price_kwh=args.price_kwh, pue=args.pue,
        gpu_power_kw=args.gpu_power_kw if args.gpu_power_kw is not None else
        spec.get("power_kw", 0.0 if gpu == "cpu" else 0.7),
        cost_other=args.other_cost)
    return inp, notes


def memory_verdict(cfg, gpu: str, device_memory_gb: float | None = None) -> str:
    """One line: the planner's per-device memory estimate of ``cfg`` on ``gpu`` and its verdict,
    e.g. ``"planned memory per device on h100: 61.3 GiB of 80.0 GiB: FITS"`` (what
    ``tools/plan_run.py --gpu GPU`` reports for the same flags).

    Raises:
        ValueError: the plan cannot be made (unknown vocabulary size, bad batch arithmetic).
    """
    args = SimpleNamespace(**{**PLANNER_DEFAULTS, "gpu": gpu,
                              "device_memory_gb": device_memory_gb,
                              # throughput plays no part in memory; a CPU has no peak to assume
                              "tokens_per_sec": 1.0 if gpu == "cpu" else None})
    inp, _ = inputs_from_config(cfg, args)
    p = make_plan(inp)
    have = "host RAM" if gpu == "cpu" else "device memory"
    verdict = "FITS" if p["fits"] else (
        f"DOES NOT FIT (largest micro-batch that fits: {p['max_micro_batch_size']})"
        if p["max_micro_batch_size"] else "DOES NOT FIT (not even micro-batch 1)")
    return (f"planned memory per device on {gpu}: {_size(p['memory_per_gpu_bytes'])} of "
            f"{_size(p['device_memory_bytes'])} {have}: {verdict}")


def _size(n: int) -> str:
    return f"{n / memory.GiB:.1f} GiB" if n >= memory.GiB else f"{n / 2 ** 20:.0f} MiB"
