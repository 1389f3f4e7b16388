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
import json
import os
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from megatron_lite import parallel as ps
from megatron_lite.model.compile import compile_transformer_blocks
from megatron_lite.model.llama import LlamaModel
from megatron_lite.model.model_config import ModelConfig
from megatron_lite.training.callbacks.base import Callback
from tests.dist_utils import read_metrics, run_torchrun, spawn

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


def _unpacked_batch(step: int):
    """The batch without --reset-attention-mask: cu_seqlens = the row starts only."""
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(200 + step))
    pos = torch.arange(S).expand(B, S)
    return tokens, pos, torch.arange(0, B * S + 1, S, dtype=torch.int32), S


def _train(model, steps=STEPS, after_first=None, batch=_packed_batch) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(steps):
        tokens, pos, cu, max_len = batch(step)
        labels = torch.roll(tokens, -1, dims=1)
        loss = model(tokens, position_ids=pos, cu_seqlens=cu, max_seqlen=max_len, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0 and after_first is not None:
            after_first()
    return losses


def _compare(config: ModelConfig, backend: str, batch=_packed_batch, packed_documents=True) -> None:
    """Eager vs compiled losses for 5 steps; no compilation after step 1 (asserted exactly)."""
    torch.manual_seed(0)
    eager = LlamaModel(config)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compile_transformer_blocks(compiled, backend, packed_documents=packed_documents)
    frames_after_first = []

    def freeze():
        frames_after_first.append(counters["frames"]["total"])
        torch._dynamo.config.error_on_recompile = True

    try:
        got = _train(compiled, after_first=freeze, batch=batch)
    finally:
        torch._dynamo.config.error_on_recompile = False
    want = _train(eager, batch=batch)
    assert frames_after_first[0] > 0, "nothing was compiled"
    assert counters["frames"]["total"] == frames_after_first[0], dict(counters["frames"])
    for step, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-5), (step, got, want)


def test_compiled_blocks_match_eager_inductor_tp1():
    _compare(_config(), "inductor")


def test_row_starts_only_keep_attention_in_the_graph():
    """Without --reset-attention-mask (packed_documents=False) the row-start cu_seqlens is dropped
    before the blocks: no graph break at all at TP=1, same losses, no recompile."""
    _compare(_config(), "aot_eager", batch=_unpacked_batch, packed_documents=False)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def _tp2_worker(rank, world):
    ps.initialize_model_parallel(2)
    for recompute in (None, "full", "selective"):
        _compare(_config(recompute_granularity=recompute), "aot_eager")
    _compare(_config(sequence_parallel=True), "aot_eager")   # SP's all-gather/reduce-scatter break the graph too


def test_compiled_blocks_match_eager_tp2_recompute_sp():
    spawn(_tp2_worker, 2)


# ----------------------------------------------------------------------------- through pretrain
# ZeRO 1 and 2 partition only the optimizer state and gradients (the forward and backward the
# compiled blocks run are ZeRO-0's); ZeRO-3 adds the parameter-gathering hooks around every module.
ZERO_STAGES = (0, 3)


class _RecompileGuard(Callback):
    """After step 1 any recompilation raises; records the compiled-frame counts."""

    def __init__(self, out: dict):
        self.out = out

    def on_step_end(self, trainer, step, result):
        if step == 1:
            self.out["frames_after_1"] = counters["frames"]["total"]
            torch._dynamo.config.error_on_recompile = True

    def on_train_end(self, trainer):
        torch._dynamo.config.error_on_recompile = False
        self.out["frames_at_end"] = counters["frames"]["total"]


def _driver(root: str) -> None:
    """torchrun body (2 ranks, D=2): eager ZeRO-0, then --compile at ZeRO 0 and 3, 5 steps each."""
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain
    from tests.test_training import COMMON

    results = {}
    base = COMMON + ["--data-path", os.path.join(root, "data"), "--train-iters", "5"]
    runs = [("eager", ["--zero-stage", "0"])] + [
        (f"z{z}", ["--zero-stage", str(z), "--compile", "--compile-backend", "aot_eager"]) for z in ZERO_STAGES]
    for name, extra in runs:
        torch._dynamo.reset()
        counters.clear()
        out = results[name] = {}
        cfg = parse_args(base + extra + ["--metrics-file", os.path.join(root, name + ".jsonl")])
        pretrain(cfg, callbacks=[_RecompileGuard(out)])
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)


@pytest.mark.slow
def test_compile_through_pretrain_zero_0_and_3(tmp_path):
    from tests.test_training import make_dataset

    make_dataset(str(tmp_path / "data"))
    run_torchrun(__file__, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    want = read_metrics(str(tmp_path / "eager.jsonl"))
    assert results["eager"]["frames_at_end"] == 0          # nothing compiled without --compile
    for z in ZERO_STAGES:
        r = results[f"z{z}"]
        assert r["frames_after_1"] > 0 and r["frames_at_end"] == r["frames_after_1"], (z, r)
        got = read_metrics(str(tmp_path / f"z{z}.jsonl"))
        for step in range(1, 6):
            assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), (z, step)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _driver(sys.argv[1])
