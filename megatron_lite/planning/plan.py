"""One run's plan: batch arithmetic, FLOPs, time, cost and per-device memory, as a flat dict.

The inputs are plain numbers (:class:`PlanInputs`) so the plan can be made from a YAML run config
(``tools/plan_run.py``), from flags, or in tests. Batch arithmetic uses the recipe's definitions
(symbol table): D = GPUs / (TP·PP), μ_tok = μ_batch · L_ctx, A = GB_tok / (μ_tok · D).
"""

from __future__ import annotations

import dataclasses
import math

from megatron_lite.layers.ring_attention import ring_bytes_per_layer
from megatron_lite.planning import chinchilla, memory, time_cost


@dataclasses.dataclass
class PlanInputs:
    """Everything a plan needs. Sizes in tokens/samples/bytes; FLOPs per token from counting.py.

    Model: ``hidden_size`` h, ``num_layers`` L, ``num_attention_heads`` a, ``num_query_groups`` g,
    ``ffn_hidden_size`` f, ``padded_vocab_size`` V, ``seq_length`` L_ctx, parameter counts and
    ``flops_per_token`` (training, fwd + bwd). Run: GPUs, TP, PP, micro batch (samples),
    ``global_batch_tokens`` GB_tok, ``train_tokens`` T, ZeRO stage and offloads, precision,
    recompute (none|selective|full), flash attention, ``cross_entropy_chunk_tokens`` (tokens per
    chunk of ``--cross-entropy-impl chunked``; None: fused). Device: memory and peak FLOP/s.
    Cost: measured tokens/s or MFU, prices (¥), PUE, kW per GPU.
    """

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    padded_vocab_size: int
    seq_length: int
    n_params_total: int
    n_params_non_embedding: int
    flops_per_token: float
    num_gpus: int
    micro_batch_size: int
    global_batch_tokens: int
    train_tokens: float
    n_params_padded: int | None = None  # total incl. vocab padding (allocated); None: total
    head_dim: int | None = None  # d (--kv-channels); None: hidden_size / num_attention_heads
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1  # CP (--context-parallel-size): GPUs = D x CP x TP x PP
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "bf16"
    recompute: str = "none"
    recompute_num_layers: int | None = None
    flash_attention: bool = True
    cross_entropy_chunk_tokens: int | None = None  # --cross-entropy-impl chunked; None: fused
    gpu: str = "h100"
    device_memory_bytes: int = 80 * memory.GiB
    peak_flops: float | None = None
    memory_overhead_bytes: int = 0
    gradients_persist: bool | None = None  # None: True unless ZeRO-0 (see peak_training_bytes)
    tokens_per_sec: float | None = None
    mfu: float | None = None
    price_gpu_hour: float = 0.0
    price_kwh: float = 0.0
    pue: float = 1.3
    gpu_power_kw: float = 0.7
    cost_other: float = 0.0


def params_per_tp_rank(n_total: int, hidden_size: int, num_layers: int, tp: int,
                       num_query_groups: int | None = None, head_dim: int | None = None) -> int:
    """Parameters one TP rank holds: all matrices split by TP, the 2L + 1 RMSNorm weights replicated,
    and, with fewer KV groups g than TP ranks t, one whole KV group per rank.

    With g < t each rank keeps its group's K and V rows (``layers/qkv_linear.py``), 2·d·H per layer,
    replicated on the t/g ranks sharing the group, instead of a 1/t share of the 2·g·d·H K/V rows:
    Ψ = ceil((N − (2L+1)H − 2LgdH) / t) + (2L+1)H + 2LdH. For g >= t (or g not given) the K/V rows
    split evenly and Ψ = ceil((N − (2L+1)H) / t) + (2L+1)H.

    Args:
        n_total: total parameters (counting.num_parameters), padded vocab included.
        num_query_groups: g (None: no KV replication considered).
        head_dim: d (needed with ``num_query_groups``).
    """
    replicated = (2 * num_layers + 1) * hidden_size
    if num_query_groups is None or num_query_groups >= tp:
        return -(-(n_total - replicated) // tp) + replicated
    kv_total = num_layers * 2 * num_query_groups * head_dim * hidden_size
    kv_rank = num_layers * 2 * head_dim * hidden_size
    return -(-(n_total - replicated - kv_total) // tp) + replicated + kv_rank


def batch_arithmetic(num_gpus: int, tp: int, pp: int, micro_batch_size: int, seq_length: int,
                     global_batch_tokens: int, cp: int = 1) -> dict:
    """D, μ_tok, A and the global batch in samples, by the recipe's definitions; with context
    parallelism the CP ranks of a replica share its samples, so D = GPUs/(TP·PP·CP).

    Returns:
        dict with ``dp`` (D = GPUs/(TP·PP·CP)), ``micro_batch_tokens`` (μ_tok),
        ``grad_accum_steps`` (A = GB_tok/(μ_tok·D)), ``global_batch_size`` (samples) and
        ``recipe_table_grad_accum_steps`` (GB_tok/(μ_tok·GPUs), the chapter-11 table's reading).

    Raises:
        ValueError: GPUs not divisible by TP·PP, or GB_tok not a multiple of μ_tok·D (the message
            gives the nearest valid GB_tok).
    """
    if min(num_gpus, tp, pp, cp, micro_batch_size, seq_length, global_batch_tokens) <= 0:
        raise ValueError("GPUs, TP, PP, CP, micro batch, seq length and GB_tok must be positive")
    if num_gpus % (tp * pp * cp):
        raise ValueError(f"--gpus {num_gpus} is not divisible by TP·PP·CP = {tp}·{pp}·{cp}; "
                         f"use a multiple of {tp * pp * cp} GPUs")
    dp = num_gpus // (tp * pp * cp)
    mu_tok = micro_batch_size * seq_length
    per_step = mu_tok * dp
    if global_batch_tokens % per_step:
        lo = max(per_step, global_batch_tokens // per_step * per_step)
        raise ValueError(
            f"GB_tok {global_batch_tokens} is not a multiple of μ_tok·D = {mu_tok}·{dp} = {per_step} "
            f"tokens; set --global-batch-tokens {lo} or {lo + per_step}, or change "
            f"--micro-batch-size / --tp")
    return {"dp": dp, "micro_batch_tokens": mu_tok,
            "grad_accum_steps": global_batch_tokens // per_step,
            "global_batch_size": global_batch_tokens // seq_length,
            "recipe_table_grad_accum_steps": global_batch_tokens / (mu_tok * num_gpus)}


def _activations(inp: PlanInputs, micro_batch: int, recompute: str, flash: bool):
    return memory.activation_memory(
        inp.seq_length, micro_batch, inp.hidden_size, inp.num_attention_heads,
        inp.num_query_groups, inp.ffn_hidden_size, inp.num_layers, inp.padded_vocab_size,
        inp.tensor_model_parallel_size, inp.sequence_parallel, flash, recompute,
        2 if inp.precision in ("bf16", "fp16") else 4, inp.recompute_num_layers,
        fused_norm=True,  # our RMSNorm saves x and rstd only (ops/swiglu_rmsnorm.py)
        cross_entropy_chunk_tokens=inp.cross_entropy_chunk_tokens,
        context_parallel_size=inp.context_parallel_size)


def ring_communication(inp: PlanInputs, grad_accum_steps: int) -> dict:
    """Bytes one rank sends around the context-parallel ring (``layers/ring_attention.py``).

    Per layer and micro-batch (Liu et al. 2023, ring attention: CP - 1 hops of each K/V block;
    the backward of Megatron-core / TransformerEngine's causal CP also passes dK/dV): forward
    (CP-1)·2·b·(s/CP)·(g'/TP)·d·p, backward the same K/V hops plus CP hops of the fp32 dK/dV,
    CP·2·b·(s/CP)·(g'/TP)·d·4, with g'/TP = max(1, g/TP) KV heads per rank. Per step: L·A times
    (forward + backward), plus one more forward with recomputation (full or selective re-runs
    the ring's forward).
    """
    cp, t = inp.context_parallel_size, inp.tensor_model_parallel_size
    d = inp.head_dim or inp.hidden_size // inp.num_attention_heads
    per_layer = ring_bytes_per_layer(inp.micro_batch_size, inp.seq_length, cp,
                                     max(1, inp.num_query_groups // t), d,
                                     2 if inp.precision in ("bf16", "fp16") else 4)
    forwards = 2 if inp.recompute in ("full", "selective") else 1
    return {"cp": cp, "ring_bytes_per_layer_forward": per_layer["forward"],
            "ring_bytes_per_layer_backward": per_layer["backward"],
            "ring_bytes_per_step": inp.num_layers * grad_accum_steps
            * (forwards * per_layer["forward"] + per_layer["backward"])}


def make_plan(inp: PlanInputs) -> dict:
    """The full plan as a flat, JSON-serialisable dict.

    Keys (units): model ``n_params_total``, ``n_params_non_embedding``, ``flops_per_token``
    (exact, counting.py) and ``flops_per_token_6n``; batch ``dp``, ``tp``, ``pp``,
    ``micro_batch_tokens``, ``grad_accum_steps`` (A), ``global_batch_tokens`` (GB_tok),
    ``global_batch_size`` (samples), ``recipe_table_grad_accum_steps``; run ``steps``,
    ``tokens_train``, ``tokens_per_param``, ``chinchilla_predicted_loss``, ``flops_train``
    (6·N_params·T), ``flops_train_exact``, ``tokens_per_sec``,
    ``mfu``, ``seconds``, ``days``, ``days_recipe_formula``, ``gpu_hours``; money ``cost_gpu``,
    ``energy_kwh``, ``cost_power``, ``cost_other``, ``cost_total`` (¥); memory (bytes per device)
    ``memory_weights_bytes``, ``memory_gradients_bytes``, ``memory_optimizer_bytes``,
    ``memory_zero3_working_bytes``, ``memory_activations_bytes``,
    ``memory_activations_variants_bytes`` (recompute × flash), ``memory_overhead_bytes``,
    ``memory_gradients_persist`` (see ``memory.peak_training_bytes``),
    ``memory_per_gpu_bytes``, ``memory_host_offload_bytes``, ``device_memory_bytes``, ``fits``,
    ``max_micro_batch_size``; context parallelism ``cp``, ``ring_bytes_per_layer_forward``,
    ``ring_bytes_per_layer_backward``, ``ring_bytes_per_step`` (:func:`ring_communication`; 0 at
    CP = 1); ``notes`` (list of sentences).

    Raises:
        ValueError: inconsistent batch arithmetic, ZeRO/offload combination or cost inputs.
    """
    t, pp = inp.tensor_model_parallel_size, inp.pipeline_model_parallel_size
    out: dict = {"gpu": inp.gpu, "num_gpus": inp.num_gpus, "tp": t, "pp": pp,
                 "n_params_total": inp.n_params_total,
                 "n_params_non_embedding": inp.n_params_non_embedding,
                 "flops_per_token": inp.flops_per_token,
                 "flops_per_token_6n": 6.0 * inp.n_params_non_embedding,
                 "seq_length": inp.seq_length, "micro_batch_size": inp.micro_batch_size}
    out.update(batch_arithmetic(inp.num_gpus, t, pp, inp.micro_batch_size, inp.seq_length,
                                inp.global_batch_tokens, inp.context_parallel_size))
    out.update(ring_communication(inp, out["grad_accum_steps"]))
    out["global_batch_tokens"] = inp.global_batch_tokens
    notes = []
    if out["recipe_table_grad_accum_steps"] != out["grad_accum_steps"]:
        notes.append(
            f"A = GB_tok/(μ_tok·D) = {inp.global_batch_tokens}/({out['micro_batch_tokens']}·"
            f"{out['dp']}) = {out['grad_accum_steps']} with D = GPUs/(TP·PP"
            f"{'·CP' if inp.context_parallel_size > 1 else ''}) = {out['dp']}; the "
            f"recipe's chapter-11 table divides by all {inp.num_gpus} GPUs and would give "
            f"{out['recipe_table_grad_accum_steps']:g}. This plan uses the definition.")
    steps = math.ceil(inp.train_tokens / inp.global_batch_tokens)
    out.update(steps=steps, tokens_train=float(inp.train_tokens))
    if steps * inp.global_batch_tokens != inp.train_tokens:
        notes.append(f"T_tokens {inp.train_tokens:.6g} is not a whole number of global batches; "
                     f"{steps} steps train {steps * inp.global_batch_tokens:.6g} tokens")
    # Chinchilla view of the same run (Hoffmann et al. count all parameters): the data/params
    # ratio against their ~20, and the approach-3 loss (on their data: compare runs, not datasets).
    out["tokens_per_param"] = inp.train_tokens / inp.n_params_total
    out["chinchilla_predicted_loss"] = chinchilla.predicted_loss(inp.n_params_total,
                                                                 inp.train_tokens)
    # Compute: the recipe's 6·N·T with N = non-embedding N_params, and the exact per-token count.
    out["flops_train"] = time_cost.flops_train_6nt(inp.n_params_non_embedding, inp.train_tokens)
    out["flops_train_exact"] = inp.flops_per_token * inp.train_tokens
    tps = time_cost.tokens_per_second(inp.flops_per_token, inp.num_gpus, inp.peak_flops, inp.mfu,
                                      inp.tokens_per_sec)
    out["tokens_per_sec"] = tps
    out["tokens_per_sec_per_gpu"] = tps / inp.num_gpus
    if inp.peak_flops:
        out["peak_flops_per_gpu"] = inp.peak_flops
        out["mfu"] = tps * inp.flops_per_token / (inp.num_gpus * inp.peak_flops)
    # The recipe's own estimate T = 8·C·P / (GPUs · achieved FLOP/s) (6 without recompute), with
    # P = total parameters and the achieved FLOP/s per GPU implied by the throughput above.
    achieved = tps * inp.flops_per_token / inp.num_gpus
    out["days_recipe_formula"] = time_cost.recipe_training_seconds(
        inp.n_params_total, inp.train_tokens, inp.num_gpus, achieved,
        recompute=inp.recompute == "full") / time_cost.SECONDS_PER_DAY
    cost = time_cost.run_cost(inp.train_tokens, tps, inp.num_gpus, inp.price_gpu_hour,
                              inp.price_kwh, inp.pue, inp.gpu_power_kw, inp.cost_other)
    out.update(dataclasses.asdict(cost))
    out.update(price_gpu_hour=inp.price_gpu_hour, price_kwh=inp.price_kwh, pue=inp.pue,
               gpu_power_kw=inp.gpu_power_kw)
    out.update(_memory_section(inp))
    if not out["fits"]:
        notes.append("DOES NOT FIT: " + (
            f"largest micro-batch that fits is {out['max_micro_batch_size']}"
            if out["max_micro_batch_size"] else
            "not even micro-batch 1 fits; raise --zero-stage/--tp, enable recompute or offload"))
    out["notes"] = notes
    return out


def _memory_section(inp: PlanInputs) -> dict:
    """Per-device bytes: states (ZeRO), activations (chosen + all variants), verdict."""
    t = inp.tensor_model_parallel_size
    dp = inp.num_gpus // (t * inp.pipeline_model_parallel_size)
    head_dim = inp.head_dim or inp.hidden_size // inp.num_attention_heads
    psi = params_per_tp_rank(inp.n_params_padded or inp.n_params_total, inp.hidden_size,
                             inp.num_layers, t, inp.num_query_groups, head_dim)
    states = memory.model_state_memory(psi, dp, inp.zero_stage, inp.precision,
                                       inp.offload_optimizer, inp.offload_params)
    # one decoder layer (non-embedding minus the final norm, over L); its 2 norms are replicated
    layer_params = (inp.n_params_non_embedding - inp.hidden_size) // inp.num_layers
    layer_rank = params_per_tp_rank(layer_params + inp.hidden_size, inp.hidden_size, 1, t,
                                    inp.num_query_groups, head_dim) - inp.hidden_size
    working = memory.zero3_working_bytes(layer_rank, inp.precision) if inp.zero_stage == 3 else 0
    fixed = working + inp.memory_overhead_bytes
    # ZeRO-0: DeepSpeed's engine sets param.grad = None after each step, so gradients exist only
    # from the backward on; ZeRO-1/2/3 keep gradient partitions in buffers (counted throughout).
    persist = inp.zero_stage != 0 if inp.gradients_persist is None else inp.gradients_persist
    precision_grad = memory.precision_bytes(inp.precision)[1]
    # LM head = half the embedding-type parameters (input embedding + untied output layer)
    head = max(0, (inp.n_params_padded or inp.n_params_total) - inp.n_params_non_embedding) // 2
    head_grad = precision_grad * (-(-head // t) + inp.hidden_size)  # LM head slice + final norm
    # our AdamW is torch's fused kernel on CUDA and CPU alike: no temporaries (the ZeRO-0 case
    # is the only one where a step would see whole tensors; offload steps in DeepSpeed's CPU Adam)
    step = memory.optimizer_step_working_bytes(-(-head // t), fused=True) \
        if inp.zero_stage == 0 and not inp.offload_optimizer else 0

    def total_for(b: int) -> int:
        a = _activations(inp, b, inp.recompute, inp.flash_attention)
        return fixed + memory.peak_training_bytes(states, a, persist, head_grad, step)

    act = _activations(inp, inp.micro_batch_size, inp.recompute, inp.flash_attention)
    variants = {}
    for rc in memory.RECOMPUTE_CHOICES:
        for flash in (True, False):
            variants[f"{rc}_{'flash' if flash else 'noflash'}"] = \
                _activations(inp, inp.micro_batch_size, rc, flash).total
    total = total_for(inp.micro_batch_size)
    return {
        "zero_stage": inp.zero_stage, "offload_optimizer": inp.offload_optimizer,
        "offload_params": inp.offload_params, "precision": inp.precision,
        "recompute": inp.recompute, "flash_attention": inp.flash_attention,
        "params_per_gpu": psi,
        "memory_weights_bytes": states.weights, "memory_gradients_bytes": states.gradients,
        "memory_optimizer_bytes": states.optimizer,
        "memory_host_offload_bytes": states.weights_host + states.optimizer_host,
        "memory_zero3_working_bytes": working,
        "memory_activations_bytes": act.total,
        "memory_activations_per_layer_bytes": act.per_layer,
        "memory_activations_variants_bytes": variants,
        "memory_overhead_bytes": inp.memory_overhead_bytes,
        "memory_gradients_persist": persist,
        "memory_per_gpu_bytes": total,
        "device_memory_bytes": inp.device_memory_bytes,
        "fits": total <= inp.device_memory_bytes,
        "max_micro_batch_size": memory.largest_micro_batch(total_for, inp.device_memory_bytes),
    }
