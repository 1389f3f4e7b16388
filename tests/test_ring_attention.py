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
    ps.initialize_model_parallel(2)  # CP = 1: the DP x CP group is the DP group itself
    assert ps.get_data_parallel_group(with_context_parallel=True) is ps.get_data_parallel_group()
    assert ps.get_context_parallel_world_size() == 1 and ps.get_data_parallel_world_size() == 2
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


def _cfg(*extra: str, world: int = 4):
    from megatron_lite.config import parse_args

    return parse_args(["--model-size", "tiny", "--vocab-size", "256", "--train-iters", "2", "--device", "cpu",
                       "--micro-batch-size", "1", "--seq-length", "64", *extra], world_size=world)


def test_flag_errors_plan_lines_and_planner():
    import pytest

    from megatron_lite.config.plan_text import format_plan
    from megatron_lite.errors import ConfigError
    from megatron_lite.planning import memory
    from megatron_lite.planning.plan import PlanInputs, make_plan

    for extra, world, message in (
            (["--context-parallel-size", "3"], 4, r"^--context-parallel-size 3 x --tensor-model-parallel-size 1 "
                                                   r"must divide the world size 4 \(world = TP x CP x D\)"),
            (["--context-parallel-size", "4", "--seq-length", "60"], 4,
             r"^--context-parallel-size 4: --seq-length 60 is not divisible by 2 x CP = 8"),
            (["--context-parallel-size", "2", "--attention-backend", "flex"], 2,
             r"^--attention-backend flex cannot run with --context-parallel-size 2: .* use --attention-backend "
             r"auto, sdpa, eager$"),
            (["--context-parallel-size", "2", "--noise-scale-interval", "1"], 2,
             r"^--noise-scale-interval is not supported with --context-parallel-size 2")):
        with pytest.raises(ConfigError, match=message):
            _cfg(*extra, world=world)
    cfg = _cfg("--context-parallel-size", "2", "--tp", "2", "--global-batch-size", "4", "--fp32", world=8)
    assert (cfg.derived.data_parallel_size, cfg.derived.num_micro_batches) == (2, 2)
    text = format_plan(cfg)
    assert "world size              : 8  (TP 2 x CP 2 x D 2, PP 1)" in text
    assert "context parallel CP     : 2  (32 of each sample's 64 tokens per rank: chunks i and 3-i of 4" in text
    # tiny: 2 KV groups / TP 2 = 1 head of 32 per rank; fp32: (2-1)*2*1*32*1*32*4 B forward
    fwd, bwd = 1 * 2 * 32 * 32 * 4, 1 * 2 * 32 * 32 * 4 + 2 * 2 * 32 * 32 * 4
    assert (f"{fwd / 2 ** 20:.1f} MiB forward, {bwd / 2 ** 20:.1f} MiB backward") in text
    assert "context parallel" not in format_plan(_cfg("--tp", "2"))
    # planner: activations are those of s/CP tokens with the flash score term, plus the ring's
    # working set (tiles 4*4*b*(a/t)*c^2, K/V 2*b*(s/CP)*(g/t)*d*(2p+12), Q side 4*4*b*(s/CP)*(a/t)*d)
    kw = dict(micro_batch_size=1, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
              ffn_hidden_size=11008, num_layers=32, padded_vocab_size=32768, tensor_parallel_size=8)
    cp4 = memory.activation_memory(32768, context_parallel_size=4, flash_attention=False, **kw)
    local = memory.activation_memory(8192, flash_attention=True, **kw)
    ring = 4 * 4 * 1 * 4 * 4096 ** 2 + 2 * 1 * 8192 * 1 * 128 * (2 * 2 + 12) + 4 * 4 * 1 * 8192 * 4 * 128
    assert cp4.attention_working == ring and cp4.total == local.total + ring
    inp = PlanInputs(hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
                     ffn_hidden_size=11008, padded_vocab_size=32768, seq_length=32768,
                     n_params_total=5_933_109_248, n_params_non_embedding=5_670_965_248, flops_per_token=8.6e10,
                     num_gpus=64, micro_batch_size=1, global_batch_tokens=4194304, train_tokens=4194304 * 10,
                     tensor_model_parallel_size=8, context_parallel_size=4, zero_stage=1, recompute="full",
                     peak_flops=989e12, mfu=0.45)
    plan = make_plan(inp)
    kv_block = 2 * 1 * 8192 * 1 * 128  # elements of one K+V block per rank
    assert (plan["dp"], plan["cp"], plan["grad_accum_steps"]) == (2, 4, 64)
    assert plan["ring_bytes_per_layer_forward"] == 3 * kv_block * 2
    assert plan["ring_bytes_per_layer_backward"] == 3 * kv_block * 2 + 4 * kv_block * 4
    assert plan["ring_bytes_per_step"] == 32 * 64 * (2 * 3 * kv_block * 2 + 3 * kv_block * 2 + 4 * kv_block * 4)
    no_cp = make_plan(PlanInputs(**{**inp.__dict__, "context_parallel_size": 1}))
    assert no_cp["dp"] == 8 and no_cp["ring_bytes_per_step"] == 0
    # ZeRO-1 partitions over D x CP = 8 either way: the same optimizer bytes
    assert plan["memory_optimizer_bytes"] == no_cp["memory_optimizer_bytes"]
    assert plan["memory_activations_bytes"] < no_cp["memory_activations_bytes"] / 2
