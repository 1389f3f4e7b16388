"""Ring attention over the context-parallel group: causal, document-masked, GQA, forward and backward.

Each CP rank holds the queries, keys and values of its ``s / CP`` tokens in the load-balanced
layout of ``parallel/context_parallel.py`` (chunks ``i`` and ``2 CP - 1 - i`` of ``2 CP``). The
ring (Liu et al. 2023, "Ring Attention with Blockwise Transformers"): in ``CP`` steps every rank
computes attention of its queries against one key/value block and passes that block to the next
rank (``isend`` to ``r + 1``, ``irecv`` from ``r - 1``, overlapped with the block's compute), so
after ``CP - 1`` transfers it has seen all keys. Partial results merge with the log-sum-exp rule
(Milakov & Gimelshein 2018; FlashAttention's online softmax): for two partial outputs ``o_a, o_b``
with row log-sum-exps ``l_a, l_b``,

    l = log(exp(l_a) + exp(l_b)),   o = exp(l_a - l) o_a + exp(l_b - l) o_b.

Backward (FlashAttention-2's recomputation, Dao 2023, alg. 2): from the saved output ``O`` and its
log-sum-exp ``L``, each block recomputes ``P = exp(S - L)`` and adds ``dV += P^T dO``,
``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ += dS K scale``, ``dK += dS^T Q scale``. Keys and
values travel the ring again, and with them fp32 ``dK / dV`` accumulators; one last transfer brings
every accumulator home, so each rank ends with the gradients of its own keys and values.

Masks come from GLOBAL positions and document ids: a query at global position ``p`` in document
``D`` sees the keys at positions ``<= p`` of ``D``, whichever rank holds them, so a packed document
spanning two ranks' chunks attends exactly as if whole. Chunk pairs entirely above the diagonal
are skipped (half of all pairs), which is what balances the work.

Communication per layer and rank (the planner's formula, ``planning/memory.py``): forward
``(CP - 1)`` transfers of K and V, ``2 b (s / CP) (g / TP) d`` elements each; backward the same
``(CP - 1)`` K/V transfers plus ``CP`` transfers of the fp32 dK/dV accumulators.

Everything is torch ops (CPU and CUDA; the point-to-point ops work on gloo and NCCL); each block's
scores are computed in fp32 on one ``[b, hk, rep, c, c]`` tile, ``c = s / (2 CP)``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_lite.parallel.context_parallel import context_parallel_chunk_ids

_doc_cache: list = []  # [cu_seqlens tensor, (version, b, s), doc ids [b, s]]: one per step's batch


def _document_ids(cu_seqlens: torch.Tensor | None, b: int, s: int, device) -> torch.Tensor | None:
    """Document index of every token of the whole sequence, ``[b, s]`` int32, or None (no docs).

    Raises:
        ValueError: ``cu_seqlens`` does not run from 0 to ``b * s`` strictly rising.
    """
    if cu_seqlens is None:
        return None
    if _doc_cache and _doc_cache[0] is cu_seqlens and _doc_cache[1] == (cu_seqlens._version, b, s):
        return _doc_cache[2]
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    if int(bounds[0]) != 0 or int(bounds[-1]) != b * s or bool((lengths <= 0).any()):
        raise ValueError(f"ring attention: cu_seqlens must rise strictly from 0 to b*s={b * s} "
                         f"(the whole sequence's boundaries, not one CP rank's); got "
                         f"{bounds[:8].tolist()}...")
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), lengths)
    doc = ids.view(b, s)
    _doc_cache[:] = [cu_seqlens, (cu_seqlens._version, b, s), doc]
    return doc


class _Ring:
    """Ring geometry of one call: CP size/rank, peers, chunk size and the document ids."""

    def __init__(self, group, b: int, s_local: int, cu_seqlens, device):
        self.group = group
        self.cp = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if s_local % 2:
            raise ValueError(f"ring attention: local sequence {s_local} must hold two equal chunks")
        self.c = s_local // 2
        self.device = device
        if self.cp > 1:
            ranks = dist.get_process_group_ranks(group)
            self.next, self.prev = ranks[(self.rank + 1) % self.cp], ranks[(self.rank - 1) % self.cp]
        self.doc = _document_ids(cu_seqlens, b, s_local * self.cp, device)

    def chunks(self, cp_rank: int) -> tuple[int, int]:
        return context_parallel_chunk_ids(self.cp, cp_rank)

    def mask(self, qc: int, kc: int) -> torch.Tensor | None | bool:
        """Mask of query chunk ``qc`` vs key chunk ``kc``: False (skip the pair: all masked),
        None (nothing masked), or a bool ``[b, 1, 1, c, c]`` tensor (True = may attend)."""
        if kc > qc:
            return False
        c = self.c
        m = None
        if self.doc is not None:
            dq, dk = self.doc[:, qc * c:(qc + 1) * c], self.doc[:, kc * c:(kc + 1) * c]
            m = dq[:, :, None] == dk[:, None, :]
        if kc == qc:
            causal = torch.ones(c, c, dtype=torch.bool, device=self.device).tril()
            m = causal if m is None else m & causal
        if m is None:
            return None
        return m.view(-1, 1, 1, c, c) if m.dim() == 3 else m.view(1, 1, 1, c, c)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Start sending ``send`` to the next rank and receiving ``recv`` from the previous one
        (``tag`` keeps the K/V and the dK/dV transfers of the backward apart on gloo)."""
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, tag=tag),
                                       dist.P2POp(dist.irecv, recv, self.prev, tag=tag)])


def _block_forward(q5, k, v, mask, scale):
    """One tile: q5 ``[b, c, hk, rep, d]`` fp32, k/v ``[b, c, hk, d]`` fp32 ->
    (out ``[b, c, hk, rep, d]``, lse ``[b, hk, rep, c]``; -inf rows where nothing is visible)."""
    scores = torch.einsum("bqgrd,bkgd->bgrqk", q5, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - _finite(lse).unsqueeze(-1))
    return torch.einsum("bgrqk,bkgd->bqgrd", p, v), lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    # A row with no visible key has lse = -inf; subtracting 0 instead keeps exp(-inf) = 0, not NaN.
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _merge(out, lse, out_b, lse_b):
    """Log-sum-exp merge of two partial results (module docstring)."""
    if out is None:
        return out_b, lse_b
    new = torch.logaddexp(lse, lse_b)
    safe = _finite(new)
    wa = torch.exp(lse - safe).permute(0, 3, 1, 2).unsqueeze(-1)   # [b, c, hk, rep, 1]
    wb = torch.exp(lse_b - safe).permute(0, 3, 1, 2).unsqueeze(-1)
    return out * wa + out_b * wb, new


def _forward(ring: _Ring, q5, k, v, scale):
    """Ring forward: (out ``[b, s_loc, hk, rep, d]`` fp32, lse ``[b, hk, rep, s_loc]``)."""
    c = ring.c
    q_chunks = ring.chunks(ring.rank)
    acc = [[None, None], [None, None]]  # per local query chunk: (out, lse)
    kv = torch.stack([k, v])
    buf = torch.empty_like(kv)
    for step in range(ring.cp):
        reqs = ring.exchange(kv, buf, 0) if step < ring.cp - 1 else []
        kvf = kv.float()
        for qi, qc in enumerate(q_chunks):
            for ki, kc in enumerate(ring.chunks((ring.rank - step) % ring.cp)):
                mask = ring.mask(qc, kc)
                if mask is False:
                    continue
                ks = slice(ki * c, (ki + 1) * c)
                o, l = _block_forward(q5[:, qi * c:(qi + 1) * c], kvf[0][:, ks], kvf[1][:, ks], mask, scale)
                acc[qi] = list(_merge(acc[qi][0], acc[qi][1], o, l))
        for r in reqs:
            r.wait()
        kv, buf = buf, kv
    out = torch.cat([acc[0][0], acc[1][0]], dim=1)
    lse = torch.cat([acc[0][1], acc[1][1]], dim=-1)
    return out, lse


def _block_backward(q5, k, v, do5, lse, delta, mask, scale):
    """Gradients of one tile (fp32): (dq5, dk, dv); ``delta = rowsum(dO * O)`` ``[b, hk, rep, c]``."""
    scores = torch.einsum("bqgrd,bkgd->bgrqk", q5, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.exp(scores - _finite(lse).unsqueeze(-1))
    dv = torch.einsum("bgrqk,bqgrd->bkgd", p, do5)
    dp = torch.einsum("bqgrd,bkgd->bgrqk", do5, v)
    ds = p * (dp - delta.unsqueeze(-1)) * scale
    return torch.einsum("bgrqk,bkgd->bqgrd", ds, k), torch.einsum("bgrqk,bqgrd->bkgd", ds, q5), dv


def _backward(ring: _Ring, q5, k, v, out5, lse, do5, scale):
    """Ring backward: (dq5 fp32, dk, dv fp32) of this rank's queries, keys and values."""
    c = ring.c
    q_chunks = ring.chunks(ring.rank)
    delta = (do5 * out5).sum(-1).permute(0, 2, 3, 1)  # [b, hk, rep, s_loc]
    dq = torch.zeros_like(q5)
    kv = torch.stack([k, v])
    kv_buf = torch.empty_like(kv)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    dkv_buf = torch.empty_like(dkv)
    for step in range(ring.cp):
        reqs = ring.exchange(kv, kv_buf, 0) if step < ring.cp - 1 else []
        kvf = kv.float()
        for qi, qc in enumerate(q_chunks):
            qs = slice(qi * c, (qi + 1) * c)
            for ki, kc in enumerate(ring.chunks((ring.rank - step) % ring.cp)):
                mask = ring.mask(qc, kc)
                if mask is False:
                    continue
                ks = slice(ki * c, (ki + 1) * c)
                g_q, g_k, g_v = _block_backward(q5[:, qs], kvf[0][:, ks], kvf[1][:, ks], do5[:, qs],
                                                lse[..., qs], delta[..., qs], mask, scale)
                dq[:, qs] += g_q
                dkv[0][:, ks] += g_k
                dkv[1][:, ks] += g_v
        if ring.cp > 1:  # the accumulator follows its K/V block; the last transfer brings it home
            reqs = list(reqs) + list(ring.exchange(dkv, dkv_buf, 1))
        for r in reqs:
            r.wait()
        if step < ring.cp - 1:
            kv, kv_buf = kv_buf, kv
        if ring.cp > 1:
            dkv, dkv_buf = dkv_buf, dkv
    return dq, dkv[0], dkv[1]


class RingAttention(torch.autograd.Function):
    """Autograd wrapper of the ring; see :func:`ring_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, group):
        b, s_loc, hq, d = q.shape
        hk = k.shape[2]
        ring = _Ring(group, b, s_loc, cu_seqlens, q.device)
        q5 = q.float().view(b, s_loc, hk, hq // hk, d)
        out5, lse = _forward(ring, q5, k.contiguous(), v.contiguous(), scale)
        out = out5.reshape(b, s_loc, hq, d).to(q.dtype)
        # The output is saved as returned (as flash-attn does): o_proj keeps it anyway, so the
        # backward's rowsum(dO * O) costs no extra activation memory.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        b, s_loc, hq, d = q.shape
        hk = k.shape[2]
        q5 = q.float().view(b, s_loc, hk, hq // hk, d)
        out5 = out.float().view(b, s_loc, hk, hq // hk, d)
        do5 = grad_out.float().reshape(b, s_loc, hk, hq // hk, d)
        dq, dk, dv = _backward(ctx.ring, q5, k.contiguous(), v.contiguous(), out5, lse, do5, ctx.scale)
        return (dq.reshape(b, s_loc, hq, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                   softmax_scale: float | None = None, group=None) -> torch.Tensor:
    """Causal, document-masked GQA attention of this CP rank's tokens against the whole sequence.

    Args:
        q: ``[b, s/CP, hq, d]`` queries of this rank's two chunks (load-balanced layout).
        k, v: ``[b, s/CP, hk, d]``, ``hq % hk == 0`` (query head j reads kv head j // (hq/hk)).
        cu_seqlens: ``[n+1]`` int document boundaries in the flattened ``b * s`` stream of the
            WHOLE sequence (every CP rank passes the same tensor), or None (one document per row).
        softmax_scale: multiplier on ``QK^T``; default ``1/sqrt(d)``.
        group: the context-parallel process group (None: CP = 1, plain local attention).

    Returns:
        ``[b, s/CP, hq, d]`` in q's dtype; differentiable in q, k and v.

    Raises:
        ValueError: bad shapes, odd local length, malformed cu_seqlens.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"ring attention expects q [b, s, hq, d], k/v [b, s, hk, d] with hq % hk == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return RingAttention.apply(q, k, v, cu_seqlens, scale, group)


def ring_bytes_per_layer(micro_batch: int, seq_length: int, cp: int, kv_heads_per_rank: int,
                         head_dim: int, bytes_per_element: int) -> dict[str, int]:
    """Bytes one rank sends around the ring per layer and micro-batch (formula in the module docstring).

    Returns:
        ``{"forward": (CP-1) * 2 b (s/CP) hk d * bytes, "backward": the same K/V transfers plus
        CP * 2 b (s/CP) hk d * 4 (fp32 dK/dV)}``; zeros at CP = 1.
    """
    if cp <= 1:
        return {"forward": 0, "backward": 0}
    block = 2 * micro_batch * (seq_length // cp) * kv_heads_per_rank * head_dim
    fwd = (cp - 1) * block * bytes_per_element
    return {"forward": fwd, "backward": fwd + cp * block * 4}
