"""--compile (issue 17 #1): compiled blocks give eager's losses on packed documents, compile once.

Each case trains two copies of one tiny model for 5 SGD steps on packed batches whose document
layout (number and lengths of documents) changes every step: one eager, one with
``compile_transformer_blocks``. Losses must agree within 1e-5 relative, and after the first step
dynamo must compile nothing more: ``torch._dynamo.config.error_on_recompile`` turns any recompile
into an exception, and the count of compiled frames (``torch._dynamo.utils.counters``) must not
move after step 1.

The TP=1 case uses the default inductor backend (generated C++, the path users get); the TP=2 gloo
cases (plain, full and selective recomputation) use ``aot_eager`` (the same traced graphs and
autograd, no code generation: inductor's C++ builds would cost minutes on 2 cores).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from megatron_lite import parallel as ps
from megatron_lite.model.compile import compile_transformer_blocks
from megatron_lite.model.llama import LlamaModel
from megatron_lite.model.model_config import ModelConfig
from tests.dist_utils import spawn

V, S, B, STEPS = 96, 32, 2, 5


def _config(**kw) -> ModelConfig:
    # One block: each block module is compiled on its own (its first call), so more blocks only
    # repeat the same work; the recompile and equality checks do not need them.
    c = ModelConfig(vocab_size=V, seq_length=S, hidden_size=32, num_layers=1, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=64, **kw)
    c.resolve()
    return c


def _packed_batch(step: int):
    """tokens, position_ids, cu_seqlens, max_seqlen of a packed [B, S] batch; step k has k+1
    documents per row at seeded cut points, so every step has a new layout and cu_seqlens length."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, V, (B, S), generator=g)
    cuts = sorted(torch.randperm(S - 1, generator=g)[:step].add(1).tolist())
    starts = [0] + cuts
    pos = torch.zeros(B, S, dtype=torch.long)
    cu = []
    for row in range(B):
        for st, e in zip(starts, starts[1:] + [S]):
            pos[row, st:e] = torch.arange(e - st)
        cu += [row * S + st for st in starts]
    cu.append(B * S)
    lengths = [e - st for st, e in zip(starts, starts[1:] + [S])]
    return tokens, pos, torch.tensor(cu, dtype=torch.int32), max(lengths)


def _train(model, steps=STEPS, after_first=None) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(steps):
        tokens, pos, cu, max_len = _packed_batch(step)
        labels = torch.roll(tokens, -1, dims=1)
        loss = model(tokens, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0 and after_first is not None:
            after_first()
    return losses


def _compare(config: ModelConfig, backend: str) -> None:
    """Eager vs compiled losses for 5 steps; no compilation after step 1 (asserted exactly)."""
    torch.manual_seed(0)
    eager = LlamaModel(config)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compile_transformer_blocks(compiled, backend)
    frames_after_first = []

    def freeze():
        frames_after_first.append(counters["frames"]["total"])
        torch._dynamo.config.error_on_recompile = True

    try:
        got = _train(compiled, after_first=freeze)
    finally:
        torch._dynamo.config.error_on_recompile = False
    want = _train(eager)
    assert frames_after_first[0] > 0, "nothing was compiled"
    assert counters["frames"]["total"] == frames_after_first[0], dict(counters["frames"])
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-5), (step, got, want)


def test_compiled_blocks_match_eager_inductor_tp1():
    _compare(_config(), "inductor")


def _tp2_worker(rank, world):
    ps.initialize_model_parallel(2)
    for recompute in (None, "full", "selective"):
        _compare(_config(recompute_granularity=recompute), "aot_eager")


def test_compiled_blocks_match_eager_tp2_recompute():
    spawn(_tp2_worker, 2)
