"""TP process groups, autograd collectives, RNG tracker and the TP layers against dense references.

Single-process checks run directly; multi-process ones run in ONE spawn of 4 gloo processes
(TP = 2 x DP = 2) that performs every check, to keep the suite fast on 2 cores.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite import parallel as ps
from megatron_lite.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  parallel_lm_logits, vocab_parallel_cross_entropy)
from megatron_lite.parallel import mpu
from megatron_lite.parallel.mappings import (copy_to_tensor_model_parallel_region,
                                             gather_from_tensor_model_parallel_region,
                                             reduce_from_tensor_model_parallel_region,
                                             scatter_to_tensor_model_parallel_region)
from megatron_lite.parallel.random import get_rng_tracker, model_parallel_manual_seed


from tests.dist_utils import spawn  # noqa: E402


# ----------------------------------------------------------------------------- single process
def test_getters_without_process_group():
    assert not ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_tensor_model_parallel_rank() == 0
    assert ps.get_data_parallel_world_size() == 1 and ps.get_data_parallel_rank() == 0
    assert ps.get_tensor_model_parallel_group() is None
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_data_parallel_rank() == 0
    with pytest.raises(RuntimeError, match="init_process_group"):
        ps.initialize_model_parallel(1)
    with pytest.raises(ValueError, match="pipeline"):
        ps.initialize_model_parallel(1, pipeline_model_parallel_size=2)


def test_cross_entropy_matches_torch_and_ignores():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, 17, (3, 5))
    labels[0, :2] = -100
    labels[2, 4] = -100
    ours = vocab_parallel_cross_entropy(logits, labels)
    ref = F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1), reduction="none").reshape(3, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    assert ours.dtype == torch.float32 and float(ours[0, 0].detach()) == 0.0
    w = torch.rand(3, 5)
    g_ours, = torch.autograd.grad((ours * w).sum(), logits)
    g_ref, = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)
    assert torch.all(g_ours[0, 0] == 0)
    again = vocab_parallel_cross_entropy(logits, labels).sum()
    torch.autograd.grad(again, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(again, logits)


def test_cross_entropy_padding_excluded_and_bad_labels_raise():
    torch.manual_seed(1)
    v, v_pad = 10, 16
    logits = torch.randn(2, 4, v)
    labels = torch.randint(0, v, (2, 4))
    ref = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").reshape(2, 4)
    padded = torch.cat([logits, torch.full((2, 4, v_pad - v), 80.0)], -1).requires_grad_()
    ours = vocab_parallel_cross_entropy(padded, labels, vocab_size=v)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    g, = torch.autograd.grad(ours.sum(), padded)
    assert torch.all(g[..., v:] == 0)
    bad = labels.clone()
    bad[1, 2] = v  # a padded id is not a valid label
    with pytest.raises(ValueError, match=r"label 10 at index \[1, 2\] is outside \[0, 10\)"):
        vocab_parallel_cross_entropy(padded, bad, vocab_size=v)
    bad[1, 2] = -5
    with pytest.raises(ValueError, match="outside"):
        vocab_parallel_cross_entropy(padded, bad, vocab_size=v)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(padded, labels[:, :3])


def test_lm_logits_mask_padded_columns():
    h = torch.randn(2, 3, 8)
    w = torch.randn(12, 8)
    out = parallel_lm_logits(h, w, vocab_size=9)
    torch.testing.assert_close(out[..., :9], h @ w[:9].T)
    assert torch.all(out[..., 9:] == torch.finfo(torch.float32).min)
    assert out.dtype == torch.float32


def test_layers_single_process_and_meta():
    torch.manual_seed(3)
    col = ColumnParallelLinear(8, 6, init_std=0.5)
    x = torch.randn(2, 8)
    torch.testing.assert_close(col(x), x @ col.weight.T)
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
    row = RowParallelLinear(6, 4)
    assert row.weight.partition_dim == 1
    # init contract: one seed from the default stream, then N(0, std^2) from a dedicated generator
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    expect = torch.empty(6, 8).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(col.weight.detach(), expect)
    emb = VocabParallelEmbedding(16, 4, num_real_embeddings=13)
    assert torch.all(emb.weight[13:] == 0) and torch.all(emb.weight[:13] != 0)
    meta = ColumnParallelLinear(4096, 11008, device="meta")
    assert meta.weight.is_meta and meta.weight.shape == (11008, 4096)
    with torch.device("meta"):
        assert RowParallelLinear(8, 4).weight.is_meta


# ----------------------------------------------------------------------------- 4 processes
def _check_groups(rank, world):
    tp, dp = 2, world // 2
    assert ps.get_tensor_model_parallel_world_size() == tp and ps.get_data_parallel_world_size() == dp
    assert ps.get_tensor_model_parallel_rank() == rank % tp and ps.get_data_parallel_rank() == rank // tp
    assert ps.get_tensor_model_parallel_src_rank() == rank // tp * tp
    assert (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()) == (rank % tp, rank // tp)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    assert t.item() == {0: 1, 1: 1, 2: 5, 3: 5}[rank]  # TP groups [0,1], [2,3]
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mpu.get_data_parallel_group())
    assert t.item() == {0: 2, 2: 2, 1: 4, 3: 4}[rank]  # DP groups [0,2], [1,3]
    with pytest.raises(RuntimeError, match="already"):
        ps.initialize_model_parallel(2)


def _check_mappings(rank):
    r = rank % 2
    x = torch.arange(8.0).reshape(2, 4).requires_grad_()
    # copy: fwd identity, bwd sum of the two ranks' grads
    y = copy_to_tensor_model_parallel_region(x)
    g, = torch.autograd.grad(y, x, torch.full_like(y, r + 1.0))
    assert torch.equal(y, x) and torch.all(g == 3.0)
    # reduce: fwd sum, bwd identity
    y = reduce_from_tensor_model_parallel_region(x * (r + 1))
    assert torch.equal(y, x * 3)
    g, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.all(g == r + 1)
    # scatter: this rank's half of the last dim; bwd all-gathers
    y = scatter_to_tensor_model_parallel_region(x)
    assert torch.equal(y, x[:, 2 * r:2 * r + 2])
    g, = torch.autograd.grad(y, x, torch.full_like(y, 7.0))
    assert torch.all(g == 7.0)
    # gather: concat in rank order; bwd keeps this rank's slice
    part = (x[:, :2] + 10 * r)
    y = gather_from_tensor_model_parallel_region(part)
    assert torch.equal(y, torch.cat([x[:, :2], x[:, :2] + 10], -1))
    g, = torch.autograd.grad(y, x, torch.arange(8.0).reshape(2, 4))
    assert torch.equal(g[:, :2], torch.arange(8.0).reshape(2, 4)[:, 2 * r:2 * r + 2])


def _check_layers(rank):
    r = rank % 2
    torch.manual_seed(11)  # same data on all ranks, as the data loader guarantees inside a TP group
    x = torch.randn(3, 5, 8)
    gy = torch.randn(3, 5, 6)
    # reference weights: what a TP=1 layer draws from the same seed
    ps_state = ps.state._INITIALIZED, ps.state._TP_SIZE
    ps.state._INITIALIZED = False
    torch.manual_seed(5)
    full_col = ColumnParallelLinear(8, 6).weight.detach()
    full_row = RowParallelLinear(6, 8).weight.detach()
    full_emb = VocabParallelEmbedding(12, 4, num_real_embeddings=11).weight.detach()
    ps.state._INITIALIZED, ps.state._TP_SIZE = ps_state
    torch.manual_seed(5)
    for gather in (False, True):
        torch.manual_seed(5)
        col = ColumnParallelLinear(8, 6, gather_output=gather)
        assert col.weight.shape == (3, 8) and torch.equal(col.weight.detach(), full_col[3 * r:3 * r + 3])
        xi = x.clone().requires_grad_()
        y = col(xi)
        ref = x @ full_col.T
        torch.testing.assert_close(y, ref if gather else ref[..., 3 * r:3 * r + 3])
        y.backward(gy if gather else gy[..., 3 * r:3 * r + 3])
        torch.testing.assert_close(xi.grad, gy @ full_col, rtol=1e-5, atol=1e-6)  # summed over TP
        torch.testing.assert_close(col.weight.grad, (gy.reshape(-1, 6).T @ x.reshape(-1, 8))[3 * r:3 * r + 3],
                                   rtol=1e-5, atol=1e-6)
    # fused column-parallel (q/k/v style): blocks of 4 and 2 rows, each split over TP on its own
    ps.state._INITIALIZED = False
    torch.manual_seed(6)
    blk_a = ColumnParallelLinear(8, 4).weight.detach()
    blk_b = ColumnParallelLinear(8, 2).weight.detach()
    ps.state._INITIALIZED = True
    torch.manual_seed(6)
    fused = ColumnParallelLinear(8, 6, output_sizes=[4, 2])
    expect = torch.cat([blk_a[2 * r:2 * r + 2], blk_b[r:r + 1]])
    assert fused.weight.partition_sizes == [4, 2] and torch.equal(fused.weight.detach(), expect)
    ya, yb = fused(x).split([2, 1], dim=-1)
    torch.testing.assert_close(ya, (x @ blk_a.T)[..., 2 * r:2 * r + 2])
    torch.testing.assert_close(yb, (x @ blk_b.T)[..., r:r + 1])
    with pytest.raises(ValueError, match="cannot gather_output"):
        ColumnParallelLinear(8, 6, output_sizes=[4, 2], gather_output=True)
    gz = torch.randn(3, 5, 8)
    h = torch.randn(3, 5, 6)
    for parallel_in in (True, False):
        torch.manual_seed(5)
        ColumnParallelLinear(8, 6)  # keep the same draw order as the reference
        row = RowParallelLinear(6, 8, input_is_parallel=parallel_in)
        assert torch.equal(row.weight.detach(), full_row[:, 3 * r:3 * r + 3])
        hi = (h[..., 3 * r:3 * r + 3] if parallel_in else h).clone().requires_grad_()
        z = row(hi)
        torch.testing.assert_close(z, h @ full_row.T, rtol=1e-5, atol=1e-6)
        z.backward(gz)
        full_gh = gz @ full_row
        torch.testing.assert_close(hi.grad, full_gh[..., 3 * r:3 * r + 3] if parallel_in else full_gh,
                                   rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    ColumnParallelLinear(8, 6)
    RowParallelLinear(6, 8)
    emb = VocabParallelEmbedding(12, 4, num_real_embeddings=11)
    assert emb.weight.shape == (6, 4) and torch.equal(emb.weight.detach(), full_emb[6 * r:6 * r + 6])
    tokens = torch.tensor([[0, 5, 6, 10], [11, 3, 7, 7]])
    out = emb(tokens)
    torch.testing.assert_close(out, F.embedding(tokens, full_emb))
    out.backward(torch.ones_like(out))
    counts = torch.bincount(tokens.reshape(-1), minlength=12).float()[6 * r:6 * r + 6]
    torch.testing.assert_close(emb.weight.grad, counts[:, None].expand(6, 4))
    # vocab-parallel cross entropy (V=13 real of V_pad=16) against the dense loss
    torch.manual_seed(21)
    full = torch.randn(2, 7, 16)
    labels = torch.randint(0, 13, (2, 7))
    labels[1, 3] = -100
    shard = full[..., 8 * r:8 * r + 8].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, labels, vocab_size=13)
    dense = full[..., :13].clone().requires_grad_()
    ref = F.cross_entropy(dense.reshape(-1, 13), labels.reshape(-1), reduction="none").reshape(2, 7)
    torch.testing.assert_close(loss, ref, rtol=0, atol=2e-6)
    loss.sum().backward()
    ref.sum().backward()
    g_full = torch.cat([dense.grad, torch.zeros(2, 7, 3)], -1)
    torch.testing.assert_close(shard.grad, g_full[..., 8 * r:8 * r + 8], rtol=0, atol=1e-6)
    bad = labels.clone()
    bad[0, 0] = 13
    with pytest.raises(ValueError, match="outside"):
        vocab_parallel_cross_entropy(shard.detach(), bad, vocab_size=13)


def _check_rng(rank):
    model_parallel_manual_seed(123)
    default = torch.rand(4)
    with get_rng_tracker().fork():
        tp_stream = torch.rand(4)
    after = torch.rand(4)
    allg = [torch.empty(12) for _ in range(4)]
    dist.all_gather(allg, torch.cat([default, tp_stream, after]))
    # default stream identical everywhere and unaffected by the fork; TP stream differs per TP rank
    # but is the same for equal TP ranks (so DP replicas of a shard drop the same elements).
    for other in allg:
        assert torch.equal(other[:4], default) and torch.equal(other[8:], after)
    assert not torch.equal(allg[0][4:8], allg[1][4:8])
    assert torch.equal(allg[0][4:8], allg[2][4:8]) and torch.equal(allg[1][4:8], allg[3][4:8])
    torch.manual_seed(123)
    torch.rand(4)
    assert torch.equal(torch.rand(4), after)


def _worker(rank, world):
    with pytest.raises(ValueError, match="not divisible by --tensor-model-parallel-size 3"):
        ps.initialize_model_parallel(3)
    ps.initialize_model_parallel(2)
    _check_groups(rank, world)
    _check_mappings(rank)
    _check_layers(rank)
    _check_rng(rank)


def test_tp2_dp2_groups_mappings_layers_rng():
    spawn(_worker, 4)


def _deepspeed_worker(rank, world, stage, ref_norm, ref_loss):
    import deepspeed

    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads these
    # DeepSpeed JIT-builds an optional shared-memory allreduce op on CPU under a lock in
    # ~/.cache/torch_extensions; another Python environment sharing that cache rebuilds it and
    # holds the lock for minutes. The op is irrelevant to this check (gloo does the collectives).
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    ps.initialize_model_parallel(2)
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig(model_size="tiny", vocab_size=1000, num_layers=1))
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           # threshold 0: partition even tiny parameters, so ZeRO-3 really gathers them over DP
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
           "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, mpu=mpu, model_parameters=model.parameters())
    loss = engine(tokens, labels=tokens).mean()
    engine.backward(loss)
    engine.step()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert float(engine.get_global_grad_norm()) == pytest.approx(ref_norm, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage,world", [(1, 2), (3, 4)])
def test_deepspeed_grad_norm_counts_replicated_params_once(stage, world):
    """DeepSpeed given ``mpu`` reports the TP=1 loss and grad norm for a TP=2 LlamaModel: ZeRO-1 at
    DP=1, ZeRO-3 at DP=2 (both DP ranks see the same batch, so the DP average is the single-rank grad)."""
    pytest.importorskip("deepspeed")
    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel

    torch.manual_seed(0)
    ref = LlamaModel(ModelConfig(model_size="tiny", vocab_size=1000, num_layers=1))
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = ref(tokens, labels=tokens).mean()
    loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters())).item()
    spawn(_deepspeed_worker, world, stage, norm, loss.item())
