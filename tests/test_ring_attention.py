"""Context parallelism: the rank layout of parallel/state.py, the load-balanced split, and ring
attention (layers/ring_attention.py) against full document-masked causal attention."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite import parallel as ps
from megatron_lite.layers.ring_attention import ring_attention, ring_bytes_per_layer
from megatron_lite.model.attention import attention_forward
from megatron_lite.parallel.context_parallel import (context_parallel_positions,
                                                     split_batch_for_context_parallel)
from tests.dist_utils import spawn


def _random_cu_seqlens(gen, b: int, s: int) -> torch.Tensor:
    """Random document boundaries: every row start plus a few random cuts (some documents cross
    the CP chunk boundaries, some chunks hold several documents)."""
    cuts = {0, b * s}
    for row in range(b):
        cuts.add(row * s)
        for x in torch.randint(1, s, (3,), generator=gen).tolist():
            cuts.add(row * s + x)
    return torch.tensor(sorted(cuts), dtype=torch.int32)


def _case(seed: int, b=2, s=16, hq=4, hk=2, d=8, docs=True):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, s, hq, d, generator=gen), torch.randn(b, s, hk, d, generator=gen)
    v, w = torch.randn(b, s, hk, d, generator=gen), torch.randn(b, s, hq, d, generator=gen)
    cu = _random_cu_seqlens(gen, b, s) if docs else None
    return q, k, v, w, cu


def _full_attention(q, k, v, cu):
    """softmax(QK^T / sqrt(d) + document-causal mask) V written out (HF repeat_kv for GQA)."""
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
    if cu is not None:
        doc = torch.bucketize(torch.arange(b * s), cu[1:].long(), right=True).view(b, s)
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def _reference(q, k, v, w, cu):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = _full_attention(q, k, v, cu)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _check_ring(q, k, v, w, cu, cp, rank, group):
    ref_out, ref_dq, ref_dk, ref_dv = _reference(q, k, v, w, cu)
    idx = context_parallel_positions(q.shape[1], cp, rank)
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, cu, group=group)
    (out * w[:, idx]).sum().backward()
    for got, want, name in ((out, ref_out, "out"), (ql.grad, ref_dq, "dq"), (kl.grad, ref_dk, "dk"),
                            (vl.grad, ref_dv, "dv")):
        torch.testing.assert_close(got, want[:, idx], rtol=1e-5, atol=1e-5, msg=f"CP={cp} rank {rank} {name}")


def test_layout_and_split_single_process():
    assert context_parallel_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert context_parallel_positions(16, 4, 3).tolist() == [6, 7, 8, 9]
    tokens = torch.arange(16).view(2, 8)
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, 8),
             "cu_seqlens": torch.tensor([0, 5, 8, 16], dtype=torch.int32)}
    part = split_batch_for_context_parallel(batch, cp_size=2, cp_rank=1)
    assert part["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["labels"].tolist() == [[3, 4, 5, 6], [11, 12, 13, 14]]
    assert part["position_ids"].tolist() == [[2, 3, 4, 5], [2, 3, 4, 5]]
    assert part["cu_seqlens"] is batch["cu_seqlens"]  # the whole sequence's documents
    assert split_batch_for_context_parallel(batch) is batch  # CP = 1 when not initialized
    try:
        context_parallel_positions(12, 4, 0)
    except ValueError as e:
        assert "--seq-length 12" in str(e) and "--context-parallel-size" in str(e)
    else:
        raise AssertionError("12 tokens cannot be cut in 8 chunks")
    # bytes: (CP-1) * 2 b (s/CP) hk d * bytes forward; + CP * 2 b (s/CP) hk d * 4 backward
    assert ring_bytes_per_layer(1, 32768, 4, 1, 128, 2) == {
        "forward": 3 * 2 * 8192 * 128 * 2, "backward": 3 * 2 * 8192 * 128 * 2 + 4 * 2 * 8192 * 128 * 4}


def test_reference_is_the_models_eager_attention():
    for seed, docs in ((0, True), (1, False)):
        q, k, v, _, cu = _case(seed, docs=docs)
        torch.testing.assert_close(_full_attention(q, k, v, cu), attention_forward(q, k, v, cu, None, "eager"))


def test_ring_cp1_equals_full_attention():
    for seed, docs in ((0, True), (1, False)):
        _check_ring(*_case(seed, docs=docs), cp=1, rank=0, group=None)


def _dist_body(rank, world):
    # Layout TP=2 x CP=2 (x DP=1 here): r = (dp*CP + cp)*TP + tp.
    ps.initialize_model_parallel(2, context_parallel_size=2)
    assert (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()) == (rank % 2, rank // 2)
    assert dist.get_process_group_ranks(ps.get_context_parallel_group()) == [rank % 2, rank % 2 + 2]
    assert ps.get_data_parallel_world_size() == 1 and ps.get_data_parallel_world_size(with_context_parallel=True) == 2
    assert dist.get_process_group_ranks(ps.get_data_parallel_group(with_context_parallel=True)) == [rank % 2, rank % 2 + 2]
    ps.destroy_model_parallel()
    # TP=1 x CP=2 x DP=2: the CP group is adjacent ranks, DP strides over CP.
    ps.initialize_model_parallel(1, context_parallel_size=2)
    assert dist.get_process_group_ranks(ps.get_data_parallel_group()) == [rank % 2, rank % 2 + 2]
    assert ps.get_data_parallel_rank() == rank // 2 and ps.get_data_parallel_rank(with_context_parallel=True) == rank
    for seed in range(3):
        _check_ring(*_case(10 + seed, docs=seed != 2), cp=2, rank=ps.get_context_parallel_rank(),
                    group=ps.get_context_parallel_group())
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, context_parallel_size=4)
    for seed in range(3):  # MHA, GQA and MQA, with and without documents
        hk = (4, 2, 1)[seed]
        _check_ring(*_case(20 + seed, s=32, hk=hk, docs=seed != 1), cp=4, rank=ps.get_context_parallel_rank(),
                    group=ps.get_context_parallel_group())


def test_ring_attention_cp2_cp4_equals_full_attention():
    spawn(_dist_body, 4)
