"""Tests for megatron_lite.eval: stream perplexity (plain and sliding) against a brute-force
computation with an independent toy model, window plans by hand, evaluate() token weighting over
micro-batches and DP ranks, and the eval_ppl CLI."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.eval import (EvalConfig, build_stream, evaluate, plan_windows,
                                stream_perplexity)

V, D = 11, 5


class CtxMeanLM(torch.nn.Module):
    """Toy causal LM whose prediction depends on the WHOLE window prefix (so a wrong window
    start or a leak from later tokens changes the result): logits_i = mean(E[x_0..x_i]) @ W +
    B[x_i]. fp64, so the brute force can be compared to 1e-12."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = torch.nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64))
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g, dtype=torch.float64))
        self.B = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))

    def forward(self, tokens, position_ids=None, cu_seqlens=None, max_seqlen=None, labels=None):
        e = self.E[tokens]
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=e.dtype)[None, :, None]
        logits = (e.cumsum(1) / steps) @ self.W + self.B[tokens]
        if labels is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                               reduction="none")


def brute_force_nll(model, stream, L, S):
    """Independent numpy computation: target j is scored once, by the window starting at
    p_j = S * max(0, ceil((j - L) / S)), with context stream[p_j:j]."""
    E, W, B = (p.detach().numpy() for p in (model.E, model.W, model.B))
    total = 0.0
    for j in range(1, len(stream)):
        p = S * max(0, -(-(j - L) // S))
        assert p < j <= p + L
        h = E[stream[p:j]].mean(0)
        logit = h @ W + B[stream[j - 1]]
        total += np.logaddexp.reduce(logit) - logit[stream[j]]
    return total / (len(stream) - 1)


def test_plan_windows_by_hand():
    assert plan_windows(10, 4) == [(0, 4, 0), (4, 4, 0), (8, 1, 0)]
    assert plan_windows(10, 4, 2) == [(0, 4, 0), (2, 4, 2), (4, 4, 2), (6, 3, 2)]
    assert plan_windows(10, 20) == [(0, 9, 0)]
    assert plan_windows(2, 4, 1) == [(0, 1, 0)]
    for n, L, S in [(50, 8, 8), (50, 8, 3), (50, 8, 1), (33, 7, 5), (9, 8, 8)]:
        assert sum(length - first for _, length, first in plan_windows(n, L, S)) == n - 1
    with pytest.raises(ValueError, match="--stride"):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError, match="no target"):
        plan_windows(1, 4)


@pytest.mark.parametrize("n,L,S,mbs", [(50, 8, 8, 1), (50, 8, 8, 3), (50, 8, 3, 2),
                                        (50, 8, 1, 4), (33, 7, 5, 3), (20, 64, None, 2)])
def test_stream_perplexity_matches_brute_force(n, L, S, mbs):
    model = CtxMeanLM()
    stream = np.random.default_rng(n + L).integers(0, V, size=n)
    out = stream_perplexity(lambda t, l: model(t, labels=l), stream, L, S, micro_batch_size=mbs)
    expected = brute_force_nll(model, stream, L, S or L)
    assert out["tokens"] == n - 1
    assert out["nll"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out["ppl"] == pytest.approx(math.exp(expected), rel=1e-12)


def test_sliding_differs_from_plain_and_stream_from_dataset(tmp_path):
    # Documents written in order through the Megatron .bin/.idx builder, EOD (=0) appended.
    docs = [[3, 4, 5, 0], [6, 7, 0], [8, 9, 10, 1, 2, 0], [4, 4, 0]]
    b = IndexedDatasetBuilder(str(tmp_path / "d.bin"), dtype=np.int32)
    for d in docs:
        b.add_document(d)
    b.finalize(str(tmp_path / "d.idx"))
    ds = IndexedDataset(str(tmp_path / "d"))
    full = build_stream(ds)
    assert full.tolist() == sum(docs, [])
    assert build_stream(ds, max_tokens=9).tolist() == sum(docs, [])[:9]
    with pytest.raises(ValueError, match="--max-tokens"):
        build_stream(ds, max_tokens=1)
    model = CtxMeanLM(seed=3)
    f = lambda t, l: model(t, labels=l)  # noqa: E731
    plain = stream_perplexity(f, full, 5)
    sliding = stream_perplexity(f, full, 5, 2)
    assert plain["tokens"] == sliding["tokens"] == len(full) - 1 == 15
    assert plain["nll"] == pytest.approx(brute_force_nll(model, full, 5, 5), rel=1e-12)
    assert sliding["nll"] == pytest.approx(brute_force_nll(model, full, 5, 2), rel=1e-12)
    assert abs(plain["nll"] - sliding["nll"]) > 1e-6  # the context really differs


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank, world, port, q):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        model = CtxMeanLM()
        stream = np.random.default_rng(7).integers(0, V, size=41)
        ppl = stream_perplexity(lambda t, l: model(t, labels=l), stream, 6, 4,
                                micro_batch_size=2, dp_rank=rank, dp_size=world)
        # evaluate(): rank r sees r + 1 micro-batches, so the token mean differs from the mean
        # of per-rank means.
        g = torch.Generator().manual_seed(100 + rank)
        batches = []
        for _ in range(rank + 1):
            tokens = torch.randint(0, V, (2, 6), generator=g)
            mask = (torch.rand(2, 6, generator=g) > 0.3).float()
            batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                            "loss_mask": mask})
        ev = evaluate(model, iter(batches), eval_iters=5)
        q.put((rank, ppl, ev))
    finally:
        torch.distributed.destroy_process_group()


def _evaluate_reference(model):
    loss, tokens = 0.0, 0.0
    for rank in range(2):
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(rank + 1):
            t = torch.randint(0, V, (2, 6), generator=g)
            m = (torch.rand(2, 6, generator=g) > 0.3).double()
            logits = model(t).detach()
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, torch.roll(t, -1, 1)[..., None])[..., 0]
            loss += float((nll * m).sum())
            tokens += float(m.sum())
    return loss / tokens, tokens


def test_dp_split_equals_single_process():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (a, b)) for r, a, b in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model = CtxMeanLM()
    stream = np.random.default_rng(7).integers(0, V, size=41)
    single = stream_perplexity(lambda t, l: model(t, labels=l), stream, 6, 4)
    ref_loss, ref_tokens = _evaluate_reference(model)
    for r in range(2):
        ppl, ev = results[r]
        assert ppl["tokens"] == 40 == single["tokens"]
        assert ppl["nll"] == pytest.approx(single["nll"], rel=1e-12)
        assert ev["tokens"] == ref_tokens
        assert ev["val_loss"] == pytest.approx(ref_loss, rel=1e-12)
        assert ev["val_ppl"] == pytest.approx(math.exp(ref_loss), rel=1e-12)


def test_evaluate_single_process_restores_mode():
    model = CtxMeanLM()
    model.train()
    t = torch.tensor([[1, 2, 3, 4]])
    batch = {"tokens": t, "labels": torch.tensor([[2, 3, 4, -100]]),
             "loss_mask": torch.tensor([[1.0, 0.0, 1.0, 0.0]])}
    out = evaluate(model, iter([batch, batch]), eval_iters=2)
    logits = model(t).detach()
    nll = torch.logsumexp(logits, -1)[0, :3] - logits[0, [0, 1, 2], [2, 3, 4]]
    assert out["tokens"] == 4 and model.training
    assert out["val_loss"] == pytest.approx(float(nll[0] + nll[2]) / 2, rel=1e-12)
    with pytest.warns(UserWarning, match="ran out after 1 of 3"):
        assert evaluate(model, iter([batch]), eval_iters=3)["tokens"] == 2
    zero = dict(batch, loss_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="no loss tokens"):
        evaluate(model, iter([zero]), eval_iters=1)
    with pytest.raises(ValueError, match="--eval-interval"):
        EvalConfig(eval_interval=-1)
