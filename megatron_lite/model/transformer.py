"""LLaMA decoder block pieces: RMSNorm, GQA self-attention and the SwiGLU MLP, tensor-parallel.

Per-rank shapes with TP = t, H = hidden, nh heads, g KV groups, d head dim, H' FFN width:
qkv_proj ``[(nh + 2g) d / t, H]`` = this rank's ``[Q_r; K_r; V_r]`` blocks (one fused
column-parallel GEMM, Megatron-core's ``linear_qkv``), o_proj ``[H, nh*d/t]`` (row-parallel);
gate_up_proj ``[2 H'/t, H]`` = ``[Gate_r; Up_r]`` (fused, ``linear_fc1``), down_proj ``[H, H'/t]``.
Fusing reads the activation once instead of three (two) times and returns one input gradient
instead of summing several; HF's separate q/k/v and gate/up weights map onto the blocks in
``hf_adapter``. Rank r owns query heads ``[r*nh/t, (r+1)*nh/t)`` and exactly the KV groups they use,
so attention needs no communication: with g >= t (``validate``: g % t == 0) the g/t groups
``[r*g/t, (r+1)*g/t)``; with g < t (``validate``: t % g == 0; MQA is g = 1) the one group
``r // (t/g)``, whose K/V weights ``qkv_proj.kv_weight`` ``[2d, H]`` are replicated on the t/g ranks
sharing it and whose gradients are summed over those ranks in backward (``layers/qkv_linear.py``;
``qkv_proj.weight`` then holds the query rows ``[nh*d/t, H]`` only). Each block does one all-reduce
after o_proj and one after down_proj in forward (and one per column-parallel input in backward,
plus, for g < t, one small all-reduce of the ``[2d, H]`` K/V weight gradient over the sharing ranks).

With sequence parallelism (``config.sequence_parallel``, TP > 1; Korthikanti et al. 2022, sec.
4.2.2) the block's input and output, its norms, residual adds and dropout are this rank's
sequence slice ``[b, s/t, H]``; qkv_proj and gate_up_proj all-gather it along s (so attention
sees the whole sequence, packed-document masks and positions unchanged), o_proj and down_proj
reduce-scatter their outputs back to ``[b, s/t, H]`` in place of the all-reduces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_lite.layers.init import replicated_parameter
from megatron_lite.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_lite.layers.qkv_linear import KVReplicatedQKVLinear
from megatron_lite.ops.kernels import TORCH_KERNELS
from megatron_lite.parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_lite.parallel.random import get_rng_tracker
from megatron_lite.parallel.state import get_tensor_model_parallel_world_size


class RMSNorm(torch.nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019, eq. 4), statistics in fp32 and the
    normalised value cast back before the weight, exactly as HF ``LlamaRMSNorm``.

    Weight ``[H]`` replicated over TP (``tensor_model_parallel=False``, counted once in grad norms).

    ``sequence_parallel`` (TP > 1): x is this rank's sequence slice, so the weight's gradient here
    covers only s/TP tokens. The weight is marked ``sequence_parallel = True`` and enters the
    computation through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
    backward), so the gradient that reaches the parameter is already the sum over the TP group:
    identical on every TP rank, complete, and nothing is left for the optimizer, DeepSpeed's ZeRO
    stages or gradient accumulation to do (Megatron sums these gradients in
    ``finalize_model_grads`` instead; the result is the same).
    ``kernels``: the ``--fused-kernels`` implementation (``model.compile.use_fused_kernels``).
    """

    kernels = TORCH_KERNELS

    def __init__(self, hidden_size: int, eps: float, *, params_dtype=torch.float32, device=None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = bool(sequence_parallel) and get_tensor_model_parallel_world_size() > 1
        self.weight = replicated_parameter((hidden_size,), 1.0, dtype=params_dtype, device=device)
        self.weight.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[b, s, H]`` (``[b, s/TP, H]`` with SP) -> same shape in x's dtype (times the weight's
        promotion); backward by hand (``megatron_lite.ops.swiglu_rmsnorm.rms_norm``)."""
        weight = copy_to_tensor_model_parallel_region(self.weight) if self.sequence_parallel else self.weight
        return self.kernels.rms_norm(x, weight, self.eps)


class SelfAttention(torch.nn.Module):
    """Causal GQA self-attention with RoPE; q/k/v column-parallel, o row-parallel, no biases.

    Args:
        config: ``ModelConfig`` (validated for this TP degree).
        device: parameter device.
    """

    kernels = TORCH_KERNELS  # --fused-kernels: RoPE from a library when it has one

    def __init__(self, config, *, device=None):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        h, d = config.hidden_size, config.head_dim
        self.config = config
        self.heads = config.num_attention_heads // tp
        self.head_dim = d
        dtype, std = config.torch_dtype, config.init_method_std
        out_std = std / math.sqrt(2.0 * config.num_layers)
        nh, g = config.num_attention_heads, config.num_query_groups
        if g >= tp:   # each rank owns g/tp whole KV groups
            self.kv_heads = g // tp
            sizes = [nh * d, g * d, g * d]
            self.qkv_proj = ColumnParallelLinear(h, sum(sizes), output_sizes=sizes, params_dtype=dtype,
                                                 device=device, init_std=std, sequence_parallel=config.sequence_parallel)
            self.local_sizes = [n // tp for n in sizes]
        else:         # g < tp: one KV group per rank, replicated on the tp/g ranks that read it
            self.kv_heads = 1
            self.qkv_proj = KVReplicatedQKVLinear(h, nh, g, d, params_dtype=dtype, device=device, init_std=std,
                                                  sequence_parallel=config.sequence_parallel)
            self.local_sizes = self.qkv_proj.local_sizes
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, h, input_is_parallel=True,
                                        init_std=out_std, params_dtype=dtype, device=device,
                                        sequence_parallel=config.sequence_parallel)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend: str) -> torch.Tensor:
        """x ``[b, s, H]``; cos/sin ``[b, s, d]`` fp32; returns ``[b, s, H]`` (summed over TP)."""
        from megatron_lite.model.attention import attention_forward
        from megatron_lite.model.rope import apply_rotary_pos_emb

        qkv = self.qkv_proj(x)  # [b, s, ...]: with SP the GEMM all-gathered x's sequence slices
        b, s = qkv.shape[:2]
        q, k, v = qkv.split(self.local_sizes, dim=-1)
        q = q.view(b, s, self.heads, self.head_dim)  # views of the fused output; RoPE copies q, k
        k = k.view(b, s, self.kv_heads, self.head_dim)
        v = v.view(b, s, self.kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, fused=not self.config.no_fused_rope, impl=self.kernels.rope)
        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            # Korthikanti et al. 2022 ("Reducing Activation Recomputation"), sec. 5: keep the cheap
            # linear layers' activations, recompute only the O(s^2) core attention in backward.
            out = checkpoint(attention_forward, q, k, v, cu_seqlens, max_seqlen, backend, use_reentrant=False)
        else:
            out = attention_forward(q, k, v, cu_seqlens, max_seqlen, backend)
        return self.o_proj(out.reshape(b, s, self.heads * self.head_dim))


class SwiGLUMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6);
    gate and up fused in one column-parallel GEMM, down row-parallel with init std / sqrt(2 L)."""

    kernels = TORCH_KERNELS  # --fused-kernels

    def __init__(self, config, *, device=None):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        dtype, std = config.torch_dtype, config.init_method_std
        self.gate_up_proj = ColumnParallelLinear(h, 2 * f, output_sizes=[f, f], params_dtype=dtype, device=device,
                                                 init_std=std, sequence_parallel=config.sequence_parallel)
        self.down_proj = RowParallelLinear(f, h, input_is_parallel=True, params_dtype=dtype, device=device,
                                           init_std=std / math.sqrt(2.0 * config.num_layers),
                                           sequence_parallel=config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[b, s, H]`` -> ``[b, s, H]`` (``[b, s/TP, H]`` in and out with SP); the
        ``[b, s, H'/TP]`` intermediate stays on this rank."""
        # swiglu: gate/up gradients written into one buffer (no cat in backward), see ops/.
        return self.down_proj(self.kernels.swiglu(self.gate_up_proj(x)))


class TransformerLayer(torch.nn.Module):
    """Pre-norm LLaMA block: h += drop(attn(norm(h))); h += drop(mlp(norm(h))).

    Hidden dropout runs on the default RNG stream, which is identical on all TP ranks, so the
    replicated residual stream stays identical across the TP group. With sequence parallelism each
    rank holds a different slice of the residual stream, so the dropout runs on the model-parallel
    stream (``get_rng_tracker().fork()``, seeded per TP rank), as in Megatron-LM.
    """

    def __init__(self, config, *, device=None):
        super().__init__()
        dtype, sp = config.torch_dtype, config.sequence_parallel
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = bool(sp) and get_tensor_model_parallel_world_size() > 1
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, params_dtype=dtype, device=device,
                                       sequence_parallel=sp)
        self.self_attn = SelfAttention(config, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_epsilon, params_dtype=dtype,
                                                device=device, sequence_parallel=sp)
        self.mlp = SwiGLUMLP(config, device=device)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.hidden_dropout == 0.0:
            return x
        if self.sequence_parallel:
            with get_rng_tracker().fork():  # a different slice per rank: a different mask per rank
                return F.dropout(x, self.hidden_dropout, True)
        return F.dropout(x, self.hidden_dropout, True)

    def forward(self, h, cos, sin, cu_seqlens, max_seqlen, backend: str) -> torch.Tensor:
        """h ``[b, s, H]`` -> ``[b, s, H]`` (``[b, s/TP, H]`` in and out with SP)."""
        a = self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens, max_seqlen, backend)
        h = h + self._dropout(a)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + self._dropout(m)
