"""``--cross-entropy-impl chunked`` (megatron_lite/layers/lm_head_loss.py) against the unchunked
(``fused``) LM head + vocab-parallel cross entropy: loss, head-weight gradient and hidden-state
gradient equal to fp32 rounding (relative L2 error <= 1e-6) at TP = 1, 2 and 4 (one launch of 4
gloo processes: groups TP=1 x4, TP=2 x2, TP=4), with a chunk size that does not divide the token
count, ignored labels, padded vocabulary, per-token upstream gradients (loss-masked tokens), tied
and untied heads; and at model level: a few AdamW steps give the same losses."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite import parallel as ps  # noqa: E402
from megatron_lite.layers.lm_head_loss import lm_head_cross_entropy  # noqa: E402
from megatron_lite.model.llama import LlamaModel  # noqa: E402
from megatron_lite.model.model_config import ModelConfig  # noqa: E402
from tests.dist_utils import read_metrics, run_torchrun, spawn  # noqa: E402

H, V, V_PAD, B, S = 24, 61, 64, 3, 11  # 33 tokens; V_pad = 64 splits 64/32/16 over TP = 1/2/4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _case(tp_rank: int, tp: int, impl: str, chunk: int, precompute: bool = True):
    """Loss and gradients of this TP rank's shard; the full-vocabulary inputs are seeded alike on
    every rank, so each rank takes its rows of the same dense head weight."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V_PAD, H, generator=g) * 0.3
    weight[V:] = 0.0  # padded rows, zero as the model initialises them
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3] = labels[2, 10] = labels[1, 0] = -100
    upstream = torch.ones(B, S) * 0.37  # D/N of train_step ...
    upstream[1, 5] = upstream[2, 2] = 0.0  # ... and loss-masked tokens
    local = V_PAD // tp
    h = hidden.clone().requires_grad_()
    w = weight[tp_rank * local:(tp_rank + 1) * local].clone().requires_grad_()
    loss = lm_head_cross_entropy(h, w, labels, vocab_size=V, impl=impl, chunk_size=chunk,
                                 precompute_grads=precompute)
    (loss * upstream).sum().backward()
    return loss.detach(), w.grad, h.grad


def _check_exact(rank: int, world: int) -> None:
    ps.destroy_model_parallel()
    dense = _case(0, 1, "fused", 0)  # no TP group: the whole vocabulary on one rank
    for tp in (1, 2, 4):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tp)
        r = ps.get_tensor_model_parallel_rank()
        ref = _case(r, tp, "fused", 0)
        rows = slice(r * V_PAD // tp, (r + 1) * V_PAD // tp)
        for chunk, precompute in ((5, True), (5, False), (33, True), (1000, True), (1, False)):
            got = _case(r, tp, "chunked", chunk, precompute)
            errs = [_rel(a, b) for a, b in zip(got, ref)]
            assert max(errs) <= 1e-6, (tp, chunk, precompute, errs)
            # and TP-independent: this rank's rows of the one-rank head gradient
            errs = [_rel(got[0], dense[0]), _rel(got[1], dense[1][rows]), _rel(got[2], dense[2])]
            assert max(errs) <= 1e-6, (tp, chunk, precompute, "vs TP=1", errs)
            assert float(got[0][0, 3]) == 0.0 and float(got[0][1, 0]) == 0.0  # ignored labels: 0
            assert not got[1][V - rows.start:].any() if rows.stop > V else True  # padded rows: no grad
    dist.barrier()


def test_chunked_equals_fused_tp1_tp2_tp4():
    spawn(_check_exact, 4)


def test_chunked_single_process_edges():
    ps.destroy_model_parallel()
    ref = _case(0, 1, "fused", 0)
    got = _case(0, 1, "chunked", 4)
    assert max(_rel(a, b) for a, b in zip(got, ref)) <= 1e-6
    # no_grad: the loss only (no gradient buffers), equal values
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 9, H, generator=g), torch.randn(V_PAD, H, generator=g)
    labels = torch.randint(0, V, (2, 9), generator=g)
    with torch.no_grad():
        a = lm_head_cross_entropy(hidden, weight, labels, vocab_size=V, impl="chunked", chunk_size=4)
        b = lm_head_cross_entropy(hidden, weight, labels, vocab_size=V, impl="fused")
    assert _rel(a, b) <= 1e-6
    with pytest.raises(ValueError, match="outside"):
        bad = labels.clone()
        bad[0, 0] = V
        lm_head_cross_entropy(hidden, weight, bad, vocab_size=V, impl="chunked")
    with pytest.raises(ValueError, match="--cross-entropy-chunk-size must be >= 1"):
        lm_head_cross_entropy(hidden, weight, labels, impl="chunked", chunk_size=0)
    with pytest.raises(ValueError, match="--cross-entropy-impl 'liger'"):
        lm_head_cross_entropy(hidden, weight, labels, impl="liger")
    # retain_graph: a second backward would scale the stored buffers twice, so it refuses
    w = weight.clone().requires_grad_()
    loss = lm_head_cross_entropy(hidden, w, labels, impl="chunked", chunk_size=4).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bf16_within_the_fused_paths_rounding():
    """16-bit head: both impls are at bf16 rounding of an fp64 reference, chunked no worse than
    1.5x fused (its weight gradient is accumulated over chunks in fp32, then rounded once)."""
    ps.destroy_model_parallel()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 50, H, generator=g).bfloat16()
    weight = (torch.randn(V_PAD, H, generator=g) * 0.1).bfloat16()
    labels = torch.randint(0, V, (4, 50), generator=g)
    labels[0, :5] = -100
    upstream = torch.full((4, 50), 0.01)
    upstream[1, 3] = 0.0

    def run(impl, dtype=None, precompute=True):
        h = (hidden if dtype is None else hidden.to(dtype)).clone().requires_grad_()
        w = (weight if dtype is None else weight.to(dtype)).clone().requires_grad_()
        loss = lm_head_cross_entropy(h, w, labels, vocab_size=V, impl=impl, chunk_size=33,
                                     precompute_grads=precompute)
        (loss * upstream).sum().backward()
        assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
        return loss.detach(), h.grad, w.grad

    ref = run("fused", torch.float64)
    err = {k: [_rel(a, b) for a, b in zip(out, ref)] for k, out in
           (("fused", run("fused")), ("chunked", run("chunked")), ("recompute", run("chunked", None, False)))}
    for k in ("chunked", "recompute"):
        for e, f in zip(err[k], err["fused"]):
            assert e <= 1.5 * f + 1e-6, (k, err)


def _train(impl: str, tie: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(11)
    cfg = ModelConfig(model_size="tiny", num_layers=2, vocab_size=301, seq_length=24,
                      tie_word_embeddings=tie, cross_entropy_impl=impl, cross_entropy_chunk_size=10,
                      attention_backend="sdpa")
    model = LlamaModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 301, (2, 24), generator=g)
        labels = torch.randint(0, 301, (2, 24), generator=g)
        labels[0, :3] = -100
        mask = (torch.rand(2, 24, generator=g) > 0.1).float()  # loss-masked tokens, as train_step
        opt.zero_grad(set_to_none=True)
        per_token = model(tokens, labels=labels)
        loss = (per_token * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tie", [False, True])
def test_model_training_steps_equal(tie):
    ps.destroy_model_parallel()
    fused, chunked = _train("fused", tie), _train("chunked", tie)
    for a, b in zip(fused, chunked):
        assert abs(a - b) <= 1e-6 * abs(a), (fused, chunked)


def test_planner_logits_term_exact():
    from megatron_lite.planning import memory

    kw = dict(seq_length=256, micro_batch_size=2, hidden_size=128, num_attention_heads=4,
              num_query_groups=2, ffn_hidden_size=352, num_layers=2, padded_vocab_size=4096,
              tensor_parallel_size=2)
    sb, local_v, h = 512, 2048, 128
    fused = memory.activation_memory(**kw, bytes_per_element=4)
    assert fused.loss_logits == 4 * sb * local_v  # one fp32 [s*b, V/t] buffer, reused as its grad
    c32 = memory.activation_memory(**kw, bytes_per_element=4, cross_entropy_chunk_tokens=100)
    # one chunk's fp32 logits + the hidden-state gradient formed in the forward
    assert c32.loss_logits == 4 * 100 * local_v + 4 * sb * h
    assert c32.output_layer - c32.loss_logits == fused.output_layer - fused.loss_logits
    c16 = memory.activation_memory(**kw, bytes_per_element=2, cross_entropy_chunk_tokens=100)
    # + the 16-bit GEMM output beside its upcast; fp32 weight-grad accumulator + 16-bit product
    assert c16.loss_logits == 6 * 100 * local_v + 2 * sb * h + 6 * local_v * h
    big = memory.activation_memory(**kw, bytes_per_element=4, cross_entropy_chunk_tokens=10 ** 6)
    assert big.loss_logits == 4 * sb * local_v + 4 * sb * h  # a chunk never exceeds the tokens


def test_flags_plan_line_and_one_line_errors():
    from megatron_lite.config import ConfigError, format_plan, parse_args

    base = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64", "--train-iters", "10",
            "--device", "cpu"]
    cfg = parse_args(base)
    assert (cfg.model.cross_entropy_impl, cfg.model.cross_entropy_chunk_size) == ("fused", 1024)
    assert "LM head + loss          : fused  (fp32 logits 64 x 256 = 0.1 MiB per rank" in format_plan(cfg)
    cfg = parse_args(base + ["--cross-entropy-impl", "chunked", "--cross-entropy-chunk-size", "16"])
    assert ("LM head + loss          : chunked, 16 tokens per chunk  (fp32 logits 16 x 256 = 0.0 MiB "
            "per rank instead of 0.1 MiB)") in format_plan(cfg)
    with pytest.raises(ConfigError, match=r"^--cross-entropy-chunk-size must be >= 1 \(got 0\)$"):
        parse_args(base + ["--cross-entropy-chunk-size", "0"])
    with pytest.raises(ConfigError, match="--cross-entropy-impl: invalid choice: 'liger'"):
        parse_args(base + ["--cross-entropy-impl", "liger"])


# ----------------------------------------------------------------------------- end to end
def e2e_runs(root: str) -> dict:
    """name -> argv: the training loop (DeepSpeed, 2 gloo ranks) fused vs chunked at TP=2 ZeRO-1
    and at D=2 ZeRO-3, with loss-masked EOD tokens and a periodic evaluation (the no-grad path)."""
    from tests.test_training import COMMON

    base = COMMON + ["--data-path", os.path.join(root, "data"), "--train-iters", "4",
                     "--eod-mask-loss", "--split", "90,10,0", "--eval-interval", "2", "--eval-iters", "1"]
    runs = {}
    for layout in (["--tp", "2", "--zero-stage", "1"], ["--zero-stage", "3"]):
        for impl in ("fused", "chunked"):
            name = f"{'tp2' if '--tp' in layout else 'z3'}_{impl}"
            runs[name] = base + layout + ["--cross-entropy-impl", impl, "--cross-entropy-chunk-size", "48",
                                          "--metrics-file", os.path.join(root, name + ".jsonl")]
    return runs


def _e2e_driver(root: str) -> None:
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    for argv in e2e_runs(root).values():
        pretrain(parse_args(argv))


@pytest.mark.slow
def test_training_loop_chunked_equals_fused(tmp_path):
    from tests.test_training import make_dataset

    make_dataset(str(tmp_path / "data"))
    run_torchrun(__file__, str(tmp_path))
    for layout in ("tp2", "z3"):
        a = read_metrics(str(tmp_path / f"{layout}_fused.jsonl"))
        b = read_metrics(str(tmp_path / f"{layout}_chunked.jsonl"))
        assert sorted(a) == sorted(b) == [1, 2, 3, 4]
        for s in a:
            assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=0), (layout, s)
            assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-5), (layout, s)
        with open(tmp_path / f"{layout}_fused.jsonl") as f:
            va = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
        with open(tmp_path / f"{layout}_chunked.jsonl") as f:
            vb = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
        assert len(va) == len(vb) >= 2 and vb == pytest.approx(va, rel=1e-6)


if __name__ == "__main__":
    _e2e_driver(sys.argv[1])
