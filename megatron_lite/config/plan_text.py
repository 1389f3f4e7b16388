"""The resolved plan of a finalized :class:`megatron_lite.config.RunConfig`: the lines rank 0
prints at start and ``--dry-run`` prints before exiting (layout, batch arithmetic, run length,
LR schedule, batch ramp-up, peak-LR derivation, optimizer, model size and FLOPs).
"""

from __future__ import annotations

from megatron_lite.config.batch_ramp import ramp_from_config
from megatron_lite.config.checks import train_device_type
from megatron_lite.config.lr_scaling import derivation_line, parse_reference
from megatron_lite.layers.ring_attention import ring_bytes_per_layer
from megatron_lite.model.counting import flops_per_token, num_parameters

MAX_RAMP_LINES = 12  # a longer ramp shows its first and last five stretches


def format_plan(cfg) -> str:
    """The resolved plan printed by rank 0 at start and by ``--dry-run`` (one item per line)."""
    return "\n".join(plan_lines(cfg))


def plan_lines(cfg) -> list[str]:
    """Human-readable resolved plan: layout, batch arithmetic, run length, model size, FLOPs."""
    d, tr, m = cfg.derived, cfg.training, cfg.model
    lines = [
        "---------------- resolved plan ----------------",
        f"world size              : {d.world_size}  (TP {cfg.parallel.tensor_model_parallel_size}"
        + (f" x CP {cp}" if (cp := cfg.parallel.context_parallel_size) > 1 else "")
        + f" x D {d.data_parallel_size}, PP 1)",
        *sequence_parallel_lines(cfg),
        *context_parallel_lines(cfg),
        *kv_replication_lines(cfg),
        f"ZeRO stage              : {cfg.parallel.zero_stage}"
        + (" +offload-optimizer" if cfg.parallel.offload_optimizer else "")
        + (" +offload-params" if cfg.parallel.offload_params else ""),
        f"precision               : {d.precision}" + (
            "" if tr.bf16 or tr.fp16 or tr.fp32 else
            "  (default: bf16 on GPU, fp32 on CPU where bf16 is ~30x slower; --bf16/--fp32)"
            + ("" if tr.device != "auto" else
               f"; resolved for this machine, --device auto = {train_device_type(tr)}")),
        f"seq length L_ctx        : {m.seq_length} tokens",
        *packing_lines(cfg),
        f"micro batch             : {tr.micro_batch_size} samples = mu_tok {d.micro_batch_tokens} "
        + (f"tokens per rank" if cfg.parallel.context_parallel_size == 1 else
           f"tokens per data-parallel replica ({d.micro_batch_tokens // cfg.parallel.context_parallel_size} "
           f"per rank: CP {cfg.parallel.context_parallel_size})"),
        f"grad accumulation A     : {d.num_micro_batches}  (= GB_tok / (mu_tok x D))",
        f"global batch            : {d.global_batch_size} samples = GB_tok {d.global_batch_tokens}"
        f" tokens",
        f"total steps             : {d.train_iters}  ({d.train_tokens} tokens)",
        f"lr schedule             : {cfg.schedule.lr_decay_style}, peak {cfg.optimizer.lr:g}, "
        f"min {cfg.optimizer.min_lr:g}, warmup {d.lr_warmup_iters} steps, decay to step "
        f"{d.lr_decay_iters}",
        *training_dynamics_lines(cfg),
        f"padded vocab / head_dim : {d.padded_vocab_size} / {d.head_dim}",
        cross_entropy_line(cfg),
        *speed_lines(cfg),
        *checkpoint_lines(cfg),
    ]
    non_emb, total = num_parameters(m)
    fpt = flops_per_token(m, m.seq_length)
    lines += [f"N_params                : {total:,} total, {non_emb:,} non-embedding",
              f"FLOPs per token         : {fpt:.4g} (training, fwd+bwd)",
              f"FLOPs total             : {fpt * d.train_tokens:.4g}",
              "-----------------------------------------------"]
    return lines


def kv_replication_lines(cfg) -> list[str]:
    """One plan line when there are fewer KV groups g than TP ranks t (none otherwise): each group's
    K/V weights live on the t/g ranks that read it (``layers/qkv_linear.py``), L·2dH·(1 − g/t) more
    parameters per rank than an even split."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    g = m.num_query_groups or m.num_attention_heads
    if g >= tp:
        return []
    extra = m.num_layers * 2 * m.head_dim * m.hidden_size * (tp - g) // tp
    return [f"KV groups               : {g} < TP {tp}: each group's K/V weights replicated on {tp // g} "
            f"TP ranks, gradients summed over them (+{extra:,} params per rank)"]


def sequence_parallel_lines(cfg) -> list[str]:
    """One plan line with ``--sequence-parallel`` (none without it: a default plan is unchanged)."""
    par = cfg.parallel
    if not par.sequence_parallel:
        return []
    tp, s = par.tensor_model_parallel_size, cfg.model.seq_length
    per_rank = s // (tp * par.context_parallel_size)
    return [f"sequence parallel       : on  (norms, residuals, dropout on {per_rank} of the sample's "
            f"tokens per TP rank; all-gather / reduce-scatter along the sequence replace the TP "
            f"all-reduces)"]


def packing_lines(cfg) -> list[str]:
    """One plan line for a packing mode other than the default ``concat`` (none for concat, so a
    default run's plan is unchanged)."""
    dc = cfg.data
    if dc.packing == "concat":
        return []
    if dc.packing == "none":
        how = "one document (or L_ctx+1 piece) per sample, padded with loss mask 0"
    elif dc.packing_fill:
        how = f"best-fit decreasing over {dc.packing_window} documents, free space filled by fragments"
    else:
        how = (f"best-fit decreasing over {dc.packing_window} documents, documents <= L_ctx+1 tokens "
               "never split, free space padded with loss mask 0")
    return [f"packing                 : {dc.packing}  ({how})"]


def cross_entropy_line(cfg) -> str:
    """The LM head + loss implementation and its largest logits buffer per rank (fp32, one
    micro-batch): ``fused`` mu_tok x V_pad/TP, ``chunked`` --cross-entropy-chunk-size x V_pad/TP."""
    m, d = cfg.model, cfg.derived
    local_vocab = d.padded_vocab_size // cfg.parallel.tensor_model_parallel_size
    tokens = d.micro_batch_tokens // cfg.parallel.context_parallel_size  # CP: a rank's s/CP tokens
    full = tokens * local_vocab * 4 / 2 ** 20
    if m.cross_entropy_impl != "chunked":
        return (f"LM head + loss          : fused  (fp32 logits {tokens} x {local_vocab}"
                f" = {full:.1f} MiB per rank; --cross-entropy-impl chunked avoids them)")
    c = min(m.cross_entropy_chunk_size, tokens)
    return (f"LM head + loss          : chunked, {m.cross_entropy_chunk_size} tokens per chunk  "
            f"(fp32 logits {c} x {local_vocab} = {c * local_vocab * 4 / 2 ** 20:.1f} MiB per rank "
            f"instead of {full:.1f} MiB)")


def speed_lines(cfg) -> list[str]:
    """One plan line with ``--compile`` or ``--fused-kernels`` other than torch (none otherwise, so
    a default run's plan is unchanged)."""
    tr = cfg.training
    if not tr.compile and tr.fused_kernels == "torch":
        return []
    kernels = {"torch": "ours", "liger": "Liger-Kernel RMSNorm/SwiGLU/RoPE",
               "apex": "apex RMSNorm, ours SwiGLU/RoPE"}[tr.fused_kernels]
    compiled = (f"torch.compile per block ({tr.compile_backend}; packed-document attention and TP "
                "collectives eager between graphs)" if tr.compile else "eager")
    return [f"kernels                 : {compiled}; --fused-kernels {tr.fused_kernels} ({kernels})"]


def context_parallel_lines(cfg) -> list[str]:
    """Two plan lines with ``--context-parallel-size`` > 1 (none at CP = 1: a default plan is
    unchanged): the chunks each rank holds, and the bytes its ring sends per layer and
    micro-batch (``layers.ring_attention.ring_bytes_per_layer``)."""
    par, m, d = cfg.parallel, cfg.model, cfg.derived
    cp, tp = par.context_parallel_size, par.tensor_model_parallel_size
    if cp == 1:
        return []
    s = m.seq_length
    kv_heads = max(1, (m.num_query_groups or m.num_attention_heads) // tp)
    ring = ring_bytes_per_layer(cfg.training.micro_batch_size, s, cp, kv_heads, d.head_dim,
                                4 if d.precision == "fp32" else 2)
    return [f"context parallel CP     : {cp}  ({s // cp} of each sample's {s} tokens per rank: chunks "
            f"i and {2 * cp - 1}-i of {2 * cp} (load-balanced causal); activations / CP; gradients "
            f"and ZeRO over D x CP = {d.data_parallel_size * cp} ranks)",
            f"ring attention          : K/V sent per layer and micro-batch per rank "
            f"{ring['forward'] / 2 ** 20:.1f} MiB forward, {ring['backward'] / 2 ** 20:.1f} MiB "
            f"backward (incl. fp32 dK/dV)"]


def training_dynamics_lines(cfg) -> list[str]:
    """Plan lines for the batch ramp-up, the LR-scaling derivation and the optimizer."""
    d, o, out = cfg.derived, cfg.optimizer, []
    ramp = ramp_from_config(cfg)
    if ramp is not None:
        out.append(f"batch ramp-up           : {ramp.start} -> {ramp.final} samples by "
                   f"{ramp.increment} over {ramp.rampup_samples} samples "
                   f"({ramp.steps_for(ramp.rampup_samples)} steps); LR schedule counted in samples")
        segs = ramp.describe(cfg.model.seq_length, cfg.training.micro_batch_size
                             * d.data_parallel_size)
        if len(segs) > MAX_RAMP_LINES:
            segs = segs[:5] + [f"  ... ({len(segs) - 10} more)"] + segs[-5:]
        out += segs
    if o.lr_scaling:
        ref = parse_reference(o.lr_reference)
        line = derivation_line(o.lr_scaling, ref, d.global_batch_tokens)
        out.append(f"peak lr from scaling    : {line}")
    out.append(f"optimizer               : {describe_optimizer(cfg)}")
    return out


def describe_optimizer(cfg) -> str:
    """One plan line: the optimizer and its hyper-parameters."""
    o, par = cfg.optimizer, cfg.parallel
    wd = f"wd {o.weight_decay:g} (matrices only)"
    if o.optimizer == "lion":
        lw = o.weight_decay if o.lion_weight_decay is None else o.lion_weight_decay
        return (f"lion (lion-pytorch) betas ({o.lion_beta1:g}, {o.lion_beta2:g}), wd {lw:g} "
                f"(matrices only)")
    if o.optimizer == "adafactor":
        note = "" if par.zero_stage == 0 else "; unfactored on ZeRO's flat partitions"
        return (f"adafactor (torch) relative step --lr, beta2_decay {o.adafactor_beta2_decay:g}, "
                f"eps2 {o.adafactor_eps2:g}, d {o.adafactor_d:g}, {wd}{note}")
    name = {"adamw": "adamw (torch" + (", fused)" if not par.offload_optimizer else ")"),
            "paged_adamw": "paged_adamw (bitsandbytes PagedAdamW)",
            "cpu_adam": "cpu_adam (DeepSpeedCPUAdam, ZeRO-Offload)"}[o.optimizer]
    return f"{name} betas ({o.adam_beta1:g}, {o.adam_beta2:g}), eps {o.adam_eps:g}, {wd}"


def checkpoint_lines(cfg) -> list[str]:
    """The plan line of checkpointing (with ``--save``): interval, synchronous or
    ``--async-save``, and how ``--load`` checks what it resumes."""
    ck = cfg.checkpoint
    if not ck.save:
        return []
    when = ", ".join(([f"every {ck.save_interval} steps"] if ck.save_interval else [])
                     + (["after the last step"] if ck.save_on_exit else [])) \
        or "only at --exit-interval or an exit signal"
    how = ("async (host copy at the step boundary, written by a background thread)"
           if ck.async_save else "sync")
    load = ("sizes only (--no-verify-checkpoint)" if ck.no_verify_checkpoint
            else "sizes + checksums")
    fallback = "error" if ck.no_checkpoint_fallback else "previous valid one"
    return [f"checkpoints             : {when}, {how}; --load checks {load}, "
            f"damaged newest -> {fallback}"]
