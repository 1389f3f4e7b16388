"""Per-device memory estimate for one training rank: model states under ZeRO 0-3 and activations.

Everything here is plain arithmetic on integers (bytes), so it runs for a 13B model on a laptop.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", sections 3.1 and 5.1, figure 1): with mixed-precision Adam a
model of Ψ parameters holds 2Ψ bytes of 16-bit weights, 2Ψ bytes of 16-bit gradients and KΨ bytes of
optimizer state (K = 12: fp32 master weights, momentum, variance). Stage 1 divides the K term by the
data-parallel degree N_d, stage 2 also the gradients, stage 3 also the weights.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4 (eq. 1: s·b·h·(34 + 5·a·s/h) bytes per layer for GPT with 16-bit activations,
eq. 2-4 for tensor and sequence parallelism and selective recomputation). The GPT terms are rederived
for a LLaMA block; the adjustments are listed in :func:`activation_bytes_per_layer`.

:func:`peak_training_bytes` combines them at the point where a step peaks (gradients persistent
under ZeRO-1/2/3, transient under ZeRO-0). The figure is live tensor bytes, checked by
``bench/bench_memory.py`` against ``torch.cuda.max_memory_allocated`` on GPUs and against peak RSS
growth on CPU with glibc's mmap threshold fixed (its default dynamic threshold keeps freed
transient tensors resident: +12 % to +48 % RSS on the tiny preset, allocator policy rather than
training state). The caching allocator's slack on GPUs is the plan's separate overhead term.
"""

from __future__ import annotations

import dataclasses

GiB = 1024 ** 3

RECOMPUTE_CHOICES = ("none", "selective", "full")


def precision_bytes(precision: str) -> tuple[int, int, int]:
    """Bytes per parameter for (weights, gradients, optimizer states) with Adam/AdamW.

    Args:
        precision: ``"bf16"`` or ``"fp16"`` (mixed precision: 16-bit weights and gradients, fp32
            master copy + momentum + variance, K = 12 in the ZeRO paper) or ``"fp32"`` (fp32 weights
            and gradients, momentum + variance only, K = 8).

    Returns:
        ``(param_bytes, grad_bytes, optimizer_bytes)`` per parameter.

    Raises:
        ValueError: unknown precision.
    """
    if precision in ("bf16", "fp16"):
        return 2, 2, 12
    if precision == "fp32":
        return 4, 4, 8
    raise ValueError(f"precision must be one of bf16, fp16, fp32 (got {precision!r})")


@dataclasses.dataclass(frozen=True)
class ModelStateMemory:
    """Model-state bytes held by one rank (GPU) and the bytes offloaded to host memory.

    Attributes:
        weights, gradients, optimizer: device bytes.
        weights_host, optimizer_host: bytes kept in CPU memory by ZeRO-Offload / ZeRO-Infinity.
    """

    weights: int
    gradients: int
    optimizer: int
    weights_host: int = 0
    optimizer_host: int = 0

    @property
    def total(self) -> int:
        """Device bytes of weights + gradients + optimizer states."""
        return self.weights + self.gradients + self.optimizer


def model_state_memory(num_params: int, data_parallel_size: int, zero_stage: int,
                       precision: str = "bf16", offload_optimizer: bool = False,
                       offload_params: bool = False) -> ModelStateMemory:
    """Weights, gradients and optimizer states on one rank under a ZeRO stage.

    Formula (ZeRO paper, section 5.1 / figure 1), Ψ = ``num_params`` held by this rank before
    ZeRO partitioning (already divided by TP), N_d = ``data_parallel_size``, (p, g, K) from
    :func:`precision_bytes`:

    - stage 0: pΨ + gΨ + KΨ
    - stage 1 (P_os): pΨ + gΨ + KΨ/N_d
    - stage 2 (P_os+g): pΨ + (g + K)Ψ/N_d
    - stage 3 (P_os+g+p): (p + g + K)Ψ/N_d

    ``offload_optimizer`` (ZeRO-Offload, Ren et al. 2021) moves the K term of this rank's partition
    to host memory; ``offload_params`` (ZeRO-Infinity, stage 3 only) moves the 16-bit weight
    partition there too. Gradients stay counted on the device: DeepSpeed reduces them there before
    copying to the host, so this is the conservative figure. Partition sizes round up (ceil).

    Args:
        num_params: parameters on this rank before ZeRO (per-TP-rank shard count).
        data_parallel_size: N_d, ranks that ZeRO partitions over.
        zero_stage: 0, 1, 2 or 3.
        precision: see :func:`precision_bytes`.
        offload_optimizer: optimizer states on CPU (needs stage >= 1).
        offload_params: parameters on CPU (needs stage 3).

    Returns:
        :class:`ModelStateMemory` in bytes.

    Raises:
        ValueError: bad stage, a non-positive size, or an offload the stage does not support
            (DeepSpeed rejects the same combinations).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3 (got {zero_stage})")
    if num_params <= 0 or data_parallel_size <= 0:
        raise ValueError(f"num_params and data_parallel_size must be positive "
                         f"(got {num_params}, {data_parallel_size})")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("--offload-optimizer needs --zero-stage 1, 2 or 3")
    if offload_params and zero_stage != 3:
        raise ValueError("--offload-params needs --zero-stage 3")
    p, g, k = precision_bytes(precision)
    part = -(-num_params // data_parallel_size)  # ceil: the last rank's partition is padded
    weights = p * (part if zero_stage >= 3 else num_params)
    grads = g * (part if zero_stage >= 2 else num_params)
    optim = k * (part if zero_stage >= 1 else num_params)
    weights_host = optim_host = 0
    if offload_optimizer:
        optim_host, optim = optim, 0
    if offload_params:
        weights_host, weights = weights, 0
    return ModelStateMemory(weights, grads, optim, weights_host, optim_host)


def activation_bytes_per_layer(seq_length: int, micro_batch_size: int, hidden_size: int,
                               num_attention_heads: int, num_query_groups: int,
                               ffn_hidden_size: int, tensor_parallel_size: int = 1,
                               sequence_parallel: bool = False, flash_attention: bool = True,
                               recompute: str = "none", bytes_per_element: int = 2,
                               fused_norm: bool = False) -> int:
    """Activation bytes one LLaMA decoder layer keeps for its backward pass, on one TP rank.

    Starting point: Korthikanti et al. 2022, eq. 1, s·b·h·(34 + 5·a·s/h) bytes per GPT layer
    (16-bit tensors, 1-byte dropout masks). Adjustments for the LLaMA block, each term being a
    tensor autograd saves (s = seq_length, b = micro batch, h = hidden, a = heads,
    g = query groups, f = ffn hidden, p = ``bytes_per_element``, t = TP):

    - no dropout (LLaMA trains without it): the three masks (sbh + sbh + a·s²·b bytes) and the
      separate post-dropout attention probabilities are gone; the softmax output (p·a·s²·b) is
      stored once and serves both the softmax and the probs·V backward.
    - RMSNorm instead of LayerNorm: its input is still saved, 2 norms × p·sbh. An eager
      (HF-style, unfused) RMSNorm also saves its normalized input for the weight's gradient,
      computed in fp32: + 2 norms × 4·sbh unless ``fused_norm`` (a fused kernel keeps only the
      input and the per-token rstd).
    - GQA: K and V are h·g/a wide, so Q + K + V saved for the score and value matmuls cost
      p·sbh·(1 + 2g/a) instead of GPT's 3·p·sbh (MHA, g = a, gives the GPT term back). With
      fewer groups than TP ranks (g < t) every rank computes the K and V of its one group, so
      their per-rank share is 2·p·sbh/a, not 2·p·sbh·g/(a·t): g is replaced by max(g, t) below.
    - SwiGLU with an eager (unfused) implementation: the MLP input (p·sbh, shared by gate and up
      projections), the gate output (SiLU input), the SiLU output, the up output and their product
      (down-projection input): 4·p·sbf, replacing GPT's 16·p·sbh GeLU MLP.
    - RoPE saves only its cos/sin tables (shared, not per layer); the rotated Q and K are the
      tensors counted above.
    - flash attention (flash-attn, SDPA flash/memory-efficient kernels) keeps no s² matrix, only
      the fp32 log-sum-exp per query and head: 4·a·s·b bytes.

    Per layer without recompute: p·sbh·(4 + 2 + 2g/a) + 4·p·sbf + scores (+ 8·sbh eager norms),
    where the 4·p·sbh (norm inputs, QKV input, MLP input) and the norm terms are replicated over
    TP unless sequence parallelism splits them (Korthikanti eq. 2 vs 3) and everything else is
    split by t.
    ``recompute="selective"`` drops the score term, recomputing core attention (Korthikanti
    section 4.2, eq. 4);
    ``recompute="full"`` keeps only the layer input p·sbh (/t with SP); the recomputed layer's
    working set is added once by :func:`activation_memory`.

    Args:
        seq_length: s, tokens per sample.
        micro_batch_size: b, samples per micro-batch.
        hidden_size: h.
        num_attention_heads: a (whole model, not per rank).
        num_query_groups: g, K/V heads (g = a for MHA).
        ffn_hidden_size: f, SwiGLU intermediate size.
        tensor_parallel_size: t.
        sequence_parallel: whether norm/dropout-region activations are split over TP.
        flash_attention: a kernel that never stores the s×s score matrix.
        recompute: ``"none"``, ``"selective"`` or ``"full"``.
        bytes_per_element: 2 for bf16/fp16 activations, 4 for fp32.
        fused_norm: RMSNorm is a fused kernel (saves no normalized copy).

    Returns:
        Bytes per layer per TP rank (int, rounded up).

    Raises:
        ValueError: unknown recompute mode or non-positive sizes.
    """
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_CHOICES} (got {recompute!r})")
    s, b, h, a, g, f, t = (seq_length, micro_batch_size, hidden_size, num_attention_heads,
                           num_query_groups, ffn_hidden_size, tensor_parallel_size)
    if min(s, b, h, a, g, f, t) <= 0:
        raise ValueError("activation sizes must all be positive")
    p = bytes_per_element
    sbh = s * b * h
    if recompute == "full":
        return -(-p * sbh // (t if sequence_parallel else 1))
    replicated = 4 * p * sbh                                   # 2 norm inputs, QKV input, MLP input
    if not fused_norm:
        replicated += 2 * 4 * sbh                              # eager norms: fp32 normalized x
    # Q, K, V, attn out; SwiGLU tensors. K/V: g < t ranks each hold one whole group (max(g, t)).
    split = p * sbh * (2 + 2 * max(g, t) / a) + 4 * p * s * b * f
    if recompute == "selective":
        scores = 0                                             # core attention recomputed
    elif flash_attention:
        scores = 4 * a * s * b                                 # fp32 log-sum-exp
    else:
        scores = p * a * s * s * b                             # softmax output
    total = (replicated / (t if sequence_parallel else 1)) + (split + scores) / t
    return int(-(-total // 1))


@dataclasses.dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes on one rank for one micro-batch in flight.

    Attributes:
        per_layer: bytes one layer keeps (see :func:`activation_bytes_per_layer`).
        layers: ``per_layer × num_layers``.
        recompute_working: one layer's full activations rebuilt during backward (full recompute).
        output_layer: final-norm input, LM-head input and the fp32 logits/softmax of the loss.
        loss_logits: the part of ``output_layer`` that is logits buffers (all copies alive at
            the loss's peak); with the chunked loss, one chunk's plus the gradient buffers that
            path forms in the forward (see :func:`activation_memory`).
        attention_working: context parallelism: one layer's ring-attention working set at its
            backward peak (:func:`ring_attention_working_bytes`); 0 without CP.
        total: sum of the above.
    """

    per_layer: int
    layers: int
    recompute_working: int
    output_layer: int
    loss_logits: int = 0
    attention_working: int = 0

    @property
    def total(self) -> int:
        """Sum of all terms, bytes."""
        return self.layers + self.recompute_working + self.output_layer + self.attention_working


def ring_attention_working_bytes(seq_length: int, micro_batch_size: int, hidden_size: int,
                                 num_attention_heads: int, num_query_groups: int,
                                 tensor_parallel_size: int, context_parallel_size: int,
                                 bytes_per_element: int = 2) -> int:
    """Bytes the ring attention of ``layers/ring_attention.py`` allocates while one layer runs its
    backward (its peak; the forward needs less), on one rank. Freed after the layer.

    With s = seq_length, b, h, a, g, t = TP, CP, p = ``bytes_per_element``, d = h/a, the local
    sequence s/CP and the chunk c = s/(2 CP): one block tile's fp32 scores, probabilities, dP and
    dS, 4 x 4·b·(a/t)·c²; the K/V block and its receive buffer in p bytes, their fp32 copy and
    the fp32 dK/dV accumulator with its receive buffer, 2·b·(s/CP)·(g/t)·d·(2p + 3·4); the fp32
    Q, dQ, dO and O, 4 x 4·b·(s/CP)·(a/t)·d.

    Returns:
        bytes (int); 0 when CP = 1.
    """
    cp, t = context_parallel_size, tensor_parallel_size
    if cp <= 1:
        return 0
    b, d = micro_batch_size, hidden_size // num_attention_heads
    local, c = seq_length // cp, seq_length // (2 * cp)
    a_t, g_t = num_attention_heads // t, max(1, num_query_groups // t)
    tiles = 4 * 4 * b * a_t * c * c
    kv = 2 * b * local * g_t * d * (2 * bytes_per_element + 3 * 4)
    q_side = 4 * 4 * b * local * a_t * d
    return tiles + kv + q_side


def activation_memory(seq_length: int, micro_batch_size: int, hidden_size: int,
                      num_attention_heads: int, num_query_groups: int, ffn_hidden_size: int,
                      num_layers: int, padded_vocab_size: int, tensor_parallel_size: int = 1,
                      sequence_parallel: bool = False, flash_attention: bool = True,
                      recompute: str = "none", bytes_per_element: int = 2,
                      recompute_num_layers: int | None = None,
                      fused_norm: bool = False,
                      cross_entropy_chunk_tokens: int | None = None,
                      context_parallel_size: int = 1) -> ActivationMemory:
    """Activation memory of the whole model for one micro-batch on one TP rank.

    Layers as in :func:`activation_bytes_per_layer`. With full recompute the layer being
    recomputed holds its no-recompute activations once (Korthikanti et al. 2022, section 4:
    "2sbhL" stored plus one layer's working set). The output layer (Korthikanti section 4.3,
    adapted): final RMSNorm input and LM-head input, p·sbh each (+ 4·sbh for an eager norm's
    normalized copy). With sequence parallelism the final norm's input (and copy) is /t, but the
    LM head's input stays p·sbh: the final norm's output is all-gathered to the whole sequence
    before the head (``model/llama.py``), and the head's GEMM saves that gathered input (Megatron
    keeps the s/t slice and gathers again in backward; we keep the full one so the chunked loss
    can cut the gathered tokens). Then the logits at their peak: the LM head's fp32
    logits, which the vocab-parallel loss turns into its softmax/gradient buffer in place
    (megatron_lite/layers/cross_entropy.py, ``inplace=True``), 4·s·b·V/t bytes, and with 16-bit
    activations the head's 16-bit output beside its fp32 upcast (and the 16-bit gradient beside
    the fp32 one in backward), p·s·b·V/t more.

    With ``--cross-entropy-impl chunked`` (``cross_entropy_chunk_tokens`` = c, megatron_lite/layers/
    lm_head_loss.py) no full-size logits exist: the logits term is one chunk's,
    (4 + p_16)·min(c, s·b)·V/t, plus what that path forms in the forward instead of the backward:
    the hidden-state gradient p·s·b·h and, with 16-bit parameters, the fp32 head-gradient
    accumulator and one chunk's 16-bit partial product, (4 + p)·V/t·h (with fp32 parameters the
    accumulator becomes the head's gradient, already counted by the caller's head-gradient term).

    With ``recompute="full"`` and ``recompute_num_layers`` = N < L (Megatron's "block" method, the
    first N blocks checkpointed), the other L - N blocks keep their full activations.

    With context parallelism (``context_parallel_size`` CP > 1) every rank holds s/CP tokens of each
    sample, so every term above is taken at s/CP (activation memory divided by CP); ring
    attention saves only its output and the fp32 log-sum-exp and recomputes each block's scores
    in backward, so the score term is the flash one whatever ``flash_attention`` says; one
    layer's ring working set (:func:`ring_attention_working_bytes`) is added once.

    Args:
        num_layers: L.
        padded_vocab_size: V (padded, whole model).
        recompute_num_layers: blocks recomputed under full recompute (None: all).
        cross_entropy_chunk_tokens: tokens per chunk of ``--cross-entropy-impl chunked``; None:
            the default ``fused`` loss over full logits.
        context_parallel_size: CP (``--context-parallel-size``).
        Others: as in :func:`activation_bytes_per_layer`.

    Returns:
        :class:`ActivationMemory` in bytes.
    """
    cp = context_parallel_size
    ring = ring_attention_working_bytes(seq_length, micro_batch_size, hidden_size, num_attention_heads,
                                        num_query_groups, tensor_parallel_size, cp, bytes_per_element)
    if cp > 1:
        seq_length, flash_attention = seq_length // cp, True
    kw = dict(seq_length=seq_length, micro_batch_size=micro_batch_size, hidden_size=hidden_size,
              num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
              ffn_hidden_size=ffn_hidden_size, tensor_parallel_size=tensor_parallel_size,
              sequence_parallel=sequence_parallel, flash_attention=flash_attention,
              bytes_per_element=bytes_per_element, fused_norm=fused_norm)
    per_layer = activation_bytes_per_layer(recompute=recompute, **kw)
    layers = per_layer * num_layers
    working = 0
    if recompute == "full":
        full_layer = activation_bytes_per_layer(recompute="none", **kw)
        working = full_layer
        n = num_layers if recompute_num_layers is None else min(recompute_num_layers, num_layers)
        layers = per_layer * n + full_layer * (num_layers - n)
    t = tensor_parallel_size
    sb = seq_length * micro_batch_size
    norm_input = (bytes_per_element + (0 if fused_norm else 4)) * sb * hidden_size
    head_inputs = norm_input // (t if sequence_parallel else 1) + bytes_per_element * sb * hidden_size
    upcast_from = bytes_per_element if bytes_per_element < 4 else 0  # fp32: .float() is a no-op
    local_vocab = -(-padded_vocab_size // t)
    if cross_entropy_chunk_tokens is None:
        logits = (4 + upcast_from) * sb * local_vocab
    else:
        logits = ((4 + upcast_from) * min(cross_entropy_chunk_tokens, sb) * local_vocab
                  + bytes_per_element * sb * hidden_size
                  + (4 + bytes_per_element) * local_vocab * hidden_size * (upcast_from > 0))
    return ActivationMemory(per_layer, layers, working, head_inputs + logits, logits, ring)


def optimizer_step_working_bytes(largest_param_numel: int, fused: bool,
                                 state_bytes: int = 4) -> int:
    """Transient bytes of one AdamW step beside the states: torch's single-tensor AdamW
    (``torch/optim/adamw.py`` ``_single_tensor_adamw``, torch's CPU default) forms
    ``exp_avg_sq.sqrt()`` and its quotient by the bias correction as two temporaries the size of
    the parameter it is updating, so the largest parameter (the embedding or LM head, V·h/t)
    sets the peak; the fused kernel (``fused=True``, CUDA and CPU; what ``--optimizer adamw``
    uses) makes none. Measured on CPU for a 32000 x 512 fp32 parameter (62.5 MiB): peak RSS
    growth during the step 124.8 MiB single-tensor, 0.0 MiB fused.

    Args:
        largest_param_numel: elements of the largest parameter tensor on this rank.
        fused: torch's fused AdamW.
        state_bytes: bytes per optimizer-state element (4: fp32).

    Returns:
        Bytes.
    """
    return 0 if fused else 2 * state_bytes * largest_param_numel


def peak_training_bytes(states: ModelStateMemory, act: ActivationMemory,
                        gradients_persist: bool = True, head_gradient_bytes: int = 0,
                        optimizer_step_bytes: int = 0) -> int:
    """Peak device bytes of one training step: model states plus activations, where gradients
    either persist through the forward pass or exist only from the backward pass on.

    ``gradients_persist=True`` (conservative; DeepSpeed ZeRO-1/2/3 keep reduced gradient
    partitions in buffers across steps): W + G + O + activations, all at once.

    ``gradients_persist=False`` (``zero_grad(set_to_none=True)``: plain PyTorch, and DeepSpeed's
    ZeRO-0 engine, which sets every ``param.grad`` to None after the step): the forward pass runs
    without gradients and the backward pass swaps each layer's activations for its gradients, so
    the live bytes are largest at one of three points:

    - the start of backward, when the LM head's gradients appear while every activation (and
      the logits buffer, reused as its gradient) is still alive: W + O + head gradients +
      activations (the forward's peak, at the loss, is this without the head gradients);
    - the end of backward and the optimizer step (activations freed): W + O + G + the step's
      temporaries (:func:`optimizer_step_working_bytes`).

    Layer by layer in between, backward frees a layer's activations as it makes that layer's
    gradients, so the live bytes move monotonically between those two ends.

    Args:
        states: from :func:`model_state_memory` (device bytes).
        act: from :func:`activation_memory` (one micro-batch in flight).
        gradients_persist: see above.
        head_gradient_bytes: gradient bytes of the LM head and final norm on this rank
            (the first gradients backward makes); only used when gradients do not persist.
        optimizer_step_bytes: the optimizer step's temporaries (added to W + G + O).

    Returns:
        Bytes (excluding allocator slack and ZeRO-3 gather buffers, which callers add).
    """
    w, g, o = states.weights, states.gradients, states.optimizer
    if gradients_persist:
        return w + g + o + max(act.total, optimizer_step_bytes)
    return w + o + max(head_gradient_bytes + act.total, g + optimizer_step_bytes)


def zero3_working_bytes(layer_params: int, precision: str = "bf16") -> int:
    """Transient device bytes ZeRO-3 needs for gathered parameters and unreduced gradients.

    DeepSpeed stage 3 all-gathers a layer's 16-bit weights just before use and prefetches the
    next one, and a layer's full gradients exist until they are reduce-scattered. Estimate:
    two layers of gathered weights + one layer of gradients, (2p + g)·layer_params.

    Args:
        layer_params: parameters of one decoder layer on this TP rank.
        precision: see :func:`precision_bytes`.

    Returns:
        Bytes.
    """
    p, g, _ = precision_bytes(precision)
    return (2 * p + g) * layer_params


def largest_micro_batch(total_bytes_for, budget_bytes: int, limit: int = 4096) -> int:
    """Largest micro-batch size b with ``total_bytes_for(b) <= budget_bytes``.

    ``total_bytes_for`` must be non-decreasing in b (activations grow linearly with b), so a
    binary search is exact.

    Args:
        total_bytes_for: callable b -> per-device bytes.
        budget_bytes: device memory available, bytes.
        limit: upper bound searched (samples).

    Returns:
        The largest fitting b, or 0 when even b = 1 does not fit.
    """
    if total_bytes_for(1) > budget_bytes:
        return 0
    lo, hi = 1, limit
    if total_bytes_for(hi) <= budget_bytes:
        return hi
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        if total_bytes_for(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo
