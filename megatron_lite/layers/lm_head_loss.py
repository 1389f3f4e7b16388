"""The LM head and its vocab-parallel cross entropy, unchunked (``--cross-entropy-impl fused``) or
in chunks of tokens (``chunked``) so that no ``[b*s, V_pad/TP]`` logits tensor ever exists.

``fused`` (the default, today's path): one LM-head GEMM gives the fp32 logits ``[b, s, V_pad/TP]``,
then :func:`megatron_lite.layers.cross_entropy.vocab_parallel_cross_entropy` turns them in place
into its softmax and, in backward, its gradient. Peak: one fp32 logits buffer (plus the 16-bit
GEMM output beside its fp32 upcast under bf16/fp16).

``chunked``: the same arithmetic, ``chunk_size`` tokens at a time, inside one autograd Function
(the idea of Liger-Kernel's fused linear cross entropy, made vocab-parallel). For each chunk of
rows h_c ``[c, H]`` of the flattened hidden states:

    z   = h_c W_r^T (fp32; padded-vocab columns at the fp32 minimum)    [c, V_pad/TP]
    M   = all-reduce_max(max_j z)         T = all-reduce_sum(z_y - M)    (target on its owner rank)
    S   = all-reduce_sum(sum_j exp(z - M))
    loss = log S - T                      (0 where the label is ignore_index)

which is Megatron-LM's ``vocab_parallel_cross_entropy`` row by row, so the loss equals the
unchunked one to rounding. When gradients are wanted, the forward also forms the chunk's
d loss / d z = softmax - onehot(y) in the same buffer (Megatron reuses it the same way) and
contracts it at once into the hidden-state gradient ``[c, H]`` and the head-weight gradient
accumulator ``[V_pad/TP, H]`` (fp32), then frees it. The upstream gradient g_t of token t is not
known until backward, so backward scales: dh_t *= g_t row by row (exact), and dW = c·G +
sum over tokens with g_t != c of (g_t - c)(p_t - y_t) h_t^T, where c is the upstream gradient of
the first non-ignored token. In training every counted token has the same g_t (D / N, train_step)
and loss-masked ones 0, so only the loss-masked rows are recomputed (none without
``--eod-mask-loss``): the chunked path costs the fused path's three head GEMMs, not four. With
``precompute_grads=False`` the forward keeps only per-token statistics (M, S) and backward
recomputes every chunk's logits (one more head GEMM, smallest forward memory).

z-loss and label smoothing do not exist in this codebase (neither path has them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite.layers.cross_entropy import check_labels, reduce_over_tp, vocab_parallel_cross_entropy
from megatron_lite.layers.embedding import padded_logits_mask
from megatron_lite.parallel.mappings import copy_to_tensor_model_parallel_region
from megatron_lite.parallel.state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

CROSS_ENTROPY_IMPLS = ("fused", "chunked")
DEFAULT_CHUNK_TOKENS = 1024
_FMIN = torch.finfo(torch.float32).min


def _logits(h: torch.Tensor, weight: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``[c, V_pad/TP]`` logits of rows ``h``, padded columns at the fp32 minimum (exp -> 0)."""
    z = F.linear(h, weight).float()
    return z.masked_fill_(pad, _FMIN) if pad is not None else z


def _softmax_grad_(expz: torch.Tensor, sumexp: torch.Tensor, local_labels: torch.Tensor,
                   not_here: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """In place: exp(z - M) -> (softmax - onehot(y)) * mult, row by row (the fused path's
    backward formula, ``cross_entropy.py``); ``mult`` is 0 on ignored rows."""
    expz.mul_((mult / sumexp).unsqueeze(-1))
    hit = (~not_here).to(expz.dtype)
    return expz.scatter_add_(-1, local_labels.unsqueeze(-1), (-hit * mult).unsqueeze(-1))


def _add_weight_grad(gw: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """gw (fp32 ``[V_pad/TP, H]``) += g^T h; a 16-bit product is formed in its dtype first (the
    accumulator stays fp32 so many chunks do not round the sum at 16 bits)."""
    if g.dtype == gw.dtype:
        gw.addmm_(g.t(), h)
    else:
        gw.add_(g.t() @ h)


def _grad_rows(ctx, rows, mult: torch.Tensor, gw: torch.Tensor | None, dh: torch.Tensor | None) -> None:
    """Recompute the logits of ``rows`` (a slice or an index tensor) and add their gradient,
    scaled per row by ``mult``, into ``gw`` and write it into ``dh[rows]`` (when not None)."""
    hidden, weight = ctx.saved_tensors
    h = hidden[rows]
    z = _logits(h, weight, ctx.pad).sub_(ctx.zmax[rows].unsqueeze(-1)).exp_()
    g = _softmax_grad_(z, ctx.sumexp[rows], ctx.local_labels[rows], ctx.not_here[rows], mult).to(h.dtype)
    del z
    if dh is not None:
        dh[rows] = g @ weight
    if gw is not None:
        _add_weight_grad(gw, g, h)


class _ChunkedLMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, vocab_size, chunk_size, precompute):
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        local_v = weight.shape[0]
        vocab = local_v * tp if vocab_size is None else vocab_size
        check_labels(labels, vocab, ignore_index)
        start = rank * local_v
        pad = padded_logits_mask(local_v, vocab, hidden.device)
        not_here = (labels < start) | (labels >= start + local_v)  # includes ignore_index
        local_labels = (labels - start).masked_fill(not_here, 0)
        ignored = labels == ignore_index
        n = hidden.shape[0]
        loss, zmax, sumexp = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        need_h, need_w = ctx.needs_input_grad[0] and precompute, ctx.needs_input_grad[1] and precompute
        dh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        counted = (~ignored).to(torch.float32)
        for s0 in range(0, n, chunk_size):
            rows = slice(s0, min(s0 + chunk_size, n))
            z = _logits(hidden[rows], weight, pad)
            m = reduce_over_tp(z.amax(dim=-1), dist.ReduceOp.MAX)
            z.sub_(m.unsqueeze(-1))
            target = z.gather(-1, local_labels[rows].unsqueeze(-1)).squeeze(-1).masked_fill(not_here[rows], 0.0)
            reduce_over_tp(target, dist.ReduceOp.SUM)
            s = reduce_over_tp(z.exp_().sum(dim=-1), dist.ReduceOp.SUM)
            loss[rows] = (s.log() - target).masked_fill(ignored[rows], 0.0)
            zmax[rows], sumexp[rows] = m, s
            if need_h or need_w:  # d loss_t / d z for an upstream gradient of 1, contracted now
                g = _softmax_grad_(z, s, local_labels[rows], not_here[rows], counted[rows]).to(hidden.dtype)
                del z  # the fp32 chunk; g aliases it in fp32
                if dh is not None:
                    torch.matmul(g, weight, out=dh[rows])
                if gw is not None:
                    _add_weight_grad(gw, g, hidden[rows])
                del g
            else:
                del z
        ctx.save_for_backward(hidden, weight)
        ctx.pad, ctx.zmax, ctx.sumexp = pad, zmax, sumexp
        ctx.local_labels, ctx.not_here, ctx.ignored = local_labels, not_here, ignored
        ctx.dh, ctx.gw, ctx.precompute, ctx.chunk_size = dh, gw, precompute, chunk_size
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("chunked LM-head cross entropy: backward ran twice (retain_graph=True); "
                               "its gradient buffers are scaled in place; recompute the loss instead")
        ctx.backward_done = True
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gl = grad_loss.reshape(-1).float().masked_fill(ctx.ignored, 0.0)
        if ctx.precompute:
            dh, gw = ctx.dh, ctx.gw
            if need_h:
                dh.mul_(gl.to(dh.dtype).unsqueeze(-1))
            if need_w:
                # c: the upstream gradient of the first counted token; rows that differ from it
                # (loss-masked tokens, a per-sample weight) are corrected by recomputing them.
                first = (~ctx.ignored).to(torch.uint8).argmax()
                c = gl[first]
                gw.mul_(c)
                dev = ((gl != c) & ~ctx.ignored).nonzero().squeeze(1)
                for s0 in range(0, dev.numel(), ctx.chunk_size):
                    idx = dev[s0:s0 + ctx.chunk_size]
                    _grad_rows(ctx, idx, gl[idx] - c, gw, None)
        else:
            dh = torch.empty_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s0 in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(s0, min(s0 + ctx.chunk_size, hidden.shape[0]))
                _grad_rows(ctx, rows, gl[rows], gw, dh)
        ctx.dh = ctx.gw = None
        d_weight = None if gw is None else gw.to(weight.dtype)
        return (dh if need_h else None), d_weight, None, None, None, None, None


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          vocab_size: int | None = None, impl: str = "fused",
                          chunk_size: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = -100,
                          precompute_grads: bool = True, copy_input: bool = True) -> torch.Tensor:
    """Per-token loss of the vocab-parallel LM head: cross_entropy(hidden W^T, labels).

    Args:
        hidden: ``[..., H]`` final-norm output, replicated across TP (copied into the TP region
            here; backward all-reduces its gradient over TP).
        weight: ``[V_pad/TP, H]`` this rank's LM-head shard (the output layer's, or the embedding's
            when tied).
        labels: ``[...]`` int64 global token ids (the leading dims of ``hidden``), identical on all
            TP ranks; ``ignore_index`` gives loss 0 and gradient 0.
        vocab_size: true vocabulary V <= V_pad; padded-vocab columns get no probability.
        impl: ``"fused"`` (one head GEMM over all tokens, fp32 logits ``[..., V_pad/TP]``) or
            ``"chunked"`` (``chunk_size`` tokens at a time; see the module docstring).
        chunk_size: tokens per chunk (``chunked``), >= 1; the largest logits buffer is
            ``chunk_size x V_pad/TP`` fp32.
        precompute_grads: ``chunked`` only: form the gradients in the forward (default; the fused
            path's GEMM count) or recompute every chunk in backward (one head GEMM more).
        copy_input: copy ``hidden`` into the TP region (backward: all-reduce of its gradient);
            False when ``hidden`` comes from ``gather_from_sequence_parallel_region`` (sequence
            parallelism), whose backward already sums the ranks' partial gradients.

    Returns:
        fp32 per-token loss, shape of ``labels``.

    Raises:
        ValueError: shapes disagree, an unknown ``impl``, ``chunk_size`` < 1, or a label outside
            ``[0, V)`` that is not ``ignore_index``.
    """
    if impl not in CROSS_ENTROPY_IMPLS:
        raise ValueError(f"--cross-entropy-impl {impl!r} is not one of {list(CROSS_ENTROPY_IMPLS)}")
    h = copy_to_tensor_model_parallel_region(hidden) if copy_input else hidden
    if impl == "fused":  # parallel_lm_logits's arithmetic (its input already copied above)
        logits = _logits(h, weight, None if vocab_size is None else
                         padded_logits_mask(weight.shape[0], vocab_size, h.device))
        # inplace: the logits are this call's own fp32 LM-head output, read by nothing else.
        return vocab_parallel_cross_entropy(logits, labels, ignore_index, vocab_size=vocab_size, inplace=True)
    if chunk_size < 1:
        raise ValueError(f"--cross-entropy-chunk-size must be >= 1 (got {chunk_size})")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree; "
                         "expected hidden [..., H] and labels [...]")
    h2 = h.reshape(-1, h.shape[-1])
    # Under no_grad (evaluation) the Function's ctx still reports needs_input_grad: ask for the
    # loss only, so evaluation pays one head GEMM per chunk and keeps no gradient buffers.
    precompute = bool(precompute_grads) and torch.is_grad_enabled()
    loss = _ChunkedLMHeadCrossEntropy.apply(h2, weight, labels.reshape(-1), ignore_index, vocab_size,
                                            int(chunk_size), precompute)
    return loss.view(labels.shape)
