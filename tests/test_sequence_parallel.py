"""Sequence parallelism (``--sequence-parallel``, issue 16 #1).

Fast checks run in the pytest process: the flag's one-line errors, the plan line, checkpoint
compatibility across the flag, the padding fallback's arithmetic at TP = 1.

Everything multi-process runs in ONE torchrun launch of 4 gloo processes (this file as a script):

- model level, at TP = 2 and TP = 4, against TP = 1 references computed in the pytest process
  (init is TP-independent, so the weights are the same): per-token losses and the gradients of
  every RMSNorm weight (replicated, fed by sequence shards, summed over TP by the norm's
  copy-to-TP-region), for a plain batch, packed documents (cu_seqlens, reset positions) with full
  recompute, tied embeddings and YaRN, and selective recompute with eager attention; logits of a
  sequence whose length TP does not divide (the padded path generation uses); SP hidden dropout
  under full recompute gives the gradients of the same dropout without recompute (the recompute
  replays the model-parallel RNG stream);
- training (DeepSpeed, fp32, accumulation A = 2): per-step losses and global grad norms with SP
  equal those without (relative 1e-6) at TP = 2 (D = 2) with ZeRO-1 and ZeRO-3 and at TP = 4
  (D = 1, ZeRO-1); a checkpoint saved with SP resumes without it (ZeRO-1) and one saved without SP
  resumes with it (ZeRO-3), continuing the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

if __name__ == "__main__":  # torchrun launch: make `tests` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.dist_utils import read_metrics, run_torchrun  # noqa: E402

SEQ, VOCAB = 32, 256
RTOL = 1e-6


# ----------------------------------------------------------------------------- shared model cases
def case_config(name: str, sp: bool):
    """The ModelConfig of model-level case ``name`` (tiny width, MHA so TP = 4 divides the groups)."""
    from megatron_lite.model.model_config import ModelConfig

    kw = dict(model_size="tiny", vocab_size=VOCAB, num_query_groups=4, seq_length=SEQ,
              max_position_embeddings=SEQ, sequence_parallel=sp)
    if name == "packed":
        kw.update(recompute_granularity="full", tie_word_embeddings=True, rope_scaling_type="yarn",
                  rope_scaling_factor=2.0, max_position_embeddings=2 * SEQ,
                  rope_original_max_position_embeddings=SEQ // 2)
    elif name == "selective":
        kw.update(recompute_granularity="selective", attention_backend="eager")
    return ModelConfig(**kw)


def case_batch(name: str) -> dict:
    """Inputs of case ``name``: tokens/labels [2, SEQ]; packed: 5 documents across the 2 rows."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels[0, :3] = -100
    batch = {"tokens": tokens, "labels": labels}
    if name == "packed":
        starts = [0, 9, 20, SEQ, SEQ + 13]     # documents cross the TP slice boundaries
        bounds = starts + [2 * SEQ]
        pos = torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:])]).view(2, SEQ)
        batch.update(position_ids=pos, cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                     max_seqlen=max(e - s for s, e in zip(bounds[:-1], bounds[1:])))
    return batch


CASES = ("plain", "packed", "selective")


def run_case(name: str, sp: bool) -> dict:
    """Build case ``name`` (seed 0) at the current TP, one forward/backward of the summed loss.

    Returns: per-token loss [2, SEQ] and {norm parameter name: grad} (replicated, full [H])."""
    from megatron_lite.model.llama import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(case_config(name, sp)).train()
    b = case_batch(name)
    loss = model(b["tokens"], b.get("position_ids"), b.get("cu_seqlens"), b.get("max_seqlen"), b["labels"])
    loss.sum().backward()
    norms = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    return {"loss": loss.detach(), "norm_grads": norms}


def odd_length_logits(sp: bool) -> torch.Tensor:
    """Full-vocabulary logits [2, 29, V] of the plain case's model on 29 tokens (TP divides no 29)."""
    from megatron_lite import parallel
    from megatron_lite.model.llama import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(case_config("plain", sp)).eval()
    with torch.no_grad():
        local = model(case_batch("plain")["tokens"][:, :29])
        return parallel.gather_from_tensor_model_parallel_region(local)[..., :VOCAB]


def tp1_references() -> dict:
    """TP = 1 results of every case (no process group: TP = 1 everywhere)."""
    out = {name: run_case(name, False) for name in CASES}
    out["odd_logits"] = odd_length_logits(False)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3g}")


def saved_activation_bytes(sp: bool) -> int:
    """Bytes of the distinct storages autograd saves in the plain case's forward (no parameters)."""
    from megatron_lite.model.llama import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(case_config("plain", sp)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    b = case_batch("plain")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(b["tokens"], labels=b["labels"])
    return sum(seen.values())


def planner_sp_saving(tp: int) -> float:
    """The planner's activation bytes without SP minus with SP for the plain case (fp32, fused norm)."""
    from megatron_lite.planning import memory

    cfg = case_config("plain", False).validate(tp)
    est = [memory.activation_memory(SEQ, 2, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
                                    cfg.ffn_hidden_size, cfg.num_layers, cfg.padded_vocab_size(tp), tp, sp,
                                    bytes_per_element=4, fused_norm=True).total for sp in (False, True)]
    return est[0] - est[1]


def nccl_reduce_scatter_path(tp: int) -> None:
    """The NCCL branch of ``reduce_scatter_along_sequence`` (sequence-major copy, dim-0
    ``reduce_scatter_tensor``) gives gloo's values; gloo has no reduce_scatter_tensor, so a stand-in
    built from all_reduce plays NCCL's part (the layout logic is what is tested)."""
    import torch.distributed as dist

    from megatron_lite.parallel import mappings
    from megatron_lite.parallel.state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank

    x = torch.randn(3, 4 * tp, 5, generator=torch.Generator().manual_seed(get_tensor_model_parallel_rank()))
    want = mappings.reduce_scatter_along_sequence(x)

    def reduce_scatter_tensor(out, inp, group=None):
        full = inp.clone()
        dist.all_reduce(full, group=group)
        out.copy_(full.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)])

    saved = mappings.dist.get_backend, mappings.dist.reduce_scatter_tensor
    mappings.dist.get_backend, mappings.dist.reduce_scatter_tensor = lambda group=None: "nccl", reduce_scatter_tensor
    try:
        got = mappings.reduce_scatter_along_sequence(x)
    finally:
        mappings.dist.get_backend, mappings.dist.reduce_scatter_tensor = saved
    assert get_tensor_model_parallel_group() is not None
    _close(got, want, f"tp{tp} NCCL-path reduce-scatter layout", rtol=0, atol=1e-6)


def model_checks(ref: dict, tp: int) -> list[str]:
    """Run at TP = ``tp`` (groups built by the caller); returns the names of the checks passed."""
    from megatron_lite.parallel.random import model_parallel_manual_seed

    nccl_reduce_scatter_path(tp)
    done = [f"tp{tp}:nccl_path"]
    for name in CASES:
        got = run_case(name, True)
        _close(got["loss"], ref[name]["loss"], f"tp{tp} {name} per-token loss with SP")
        for pname, g in ref[name]["norm_grads"].items():
            _close(got["norm_grads"][pname], g, f"tp{tp} {name} grad of {pname} with SP")
        done.append(f"tp{tp}:{name}")
    _close(odd_length_logits(True), ref["odd_logits"], f"tp{tp} odd-length logits with SP")
    done.append(f"tp{tp}:odd_length")
    # The planner's SP saving is what SP saves: (4 L + 1) p s b h (1 - 1/t) (norm inputs, QKV and MLP
    # inputs of every layer, the final norm's input); measured, the norms' [b, s, 1] rstd shrink too.
    measured = saved_activation_bytes(False) - saved_activation_bytes(True)
    planned = planner_sp_saving(tp)
    if abs(measured - planned) > 0.02 * planned:
        raise AssertionError(f"tp{tp}: SP saves {measured} activation bytes, the planner says {planned}")
    done.append(f"tp{tp}:planner_saving")
    # SP hidden dropout under full recompute: the recompute must replay the per-rank masks.
    from megatron_lite.model.llama import LlamaModel

    grads = []
    for recompute in (None, "full"):
        cfg = case_config("plain", True)
        cfg.hidden_dropout, cfg.recompute_granularity = 0.2, recompute
        torch.manual_seed(0)
        model = LlamaModel(cfg).train()
        model_parallel_manual_seed(5)
        b = case_batch("plain")
        model(b["tokens"], labels=b["labels"]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        _close(g1, g0, f"tp{tp} SP dropout: full recompute vs none", rtol=1e-6, atol=1e-8)
    done.append(f"tp{tp}:dropout_recompute")
    return done


# ----------------------------------------------------------------------------- training runs
COMMON = ["--model-size", "tiny", "--num-query-groups", "4", "--vocab-size", str(VOCAB),
          "--seq-length", str(SEQ), "--micro-batch-size", "1", "--train-iters", "4", "--lr", "3e-3",
          "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--split", "100,0,0", "--num-workers", "0",
          "--log-interval", "1", "--eval-interval", "0", "--seed", "7", "--device", "cpu",
          "--fp32"]


def runs_spec(root: str) -> list[tuple[str, list[str]]]:
    """(name, argv) in launch order. TP=2 runs: D = 2, GB 4 -> A = 2; TP=4: D = 1, GB 2 -> A = 2."""
    def r(name, tp, *extra):
        gb = "4" if tp == 2 else "2"
        return name, COMMON + ["--data-path", os.path.join(root, "data"), "--tp", str(tp),
                               "--global-batch-size", gb,
                               "--metrics-file", os.path.join(root, name + ".jsonl"), *extra]

    ck1, ck3 = os.path.join(root, "ck_z1"), os.path.join(root, "ck_z3")
    return [
        r("z1_sp_part", 2, "--zero-stage", "1", "--sequence-parallel", "--save", ck1, "--exit-interval", "2"),
        r("z1_resumed", 2, "--zero-stage", "1", "--save", ck1, "--load", ck1),
        r("z3_sp", 2, "--zero-stage", "3", "--sequence-parallel"),
        r("z3_part", 2, "--zero-stage", "3", "--save", ck3, "--exit-interval", "2"),
        r("z3_sp_resumed", 2, "--zero-stage", "3", "--sequence-parallel", "--save", ck3, "--load", ck3),
        r("tp4", 4, "--zero-stage", "1"),
        r("tp4_sp", 4, "--zero-stage", "1", "--sequence-parallel"),
    ]


def _driver(root: str) -> None:
    """Body of the torchrun launch (4 processes)."""
    from megatron_lite import parallel
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    ref = torch.load(os.path.join(root, "ref.pt"))
    results = {"model_checks": []}
    for name, argv in runs_spec(root):
        st = pretrain(parse_args(argv))
        results[name] = {"iteration": st.iteration}
        if name in ("z3_sp_resumed", "tp4_sp"):  # this run's TP groups still exist
            results["model_checks"] += model_checks(ref, parallel.get_tensor_model_parallel_world_size())
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Run the launch once; returns (root, results)."""
    from tests.test_training import make_dataset

    root = str(tmp_path_factory.mktemp("sp"))
    make_dataset(os.path.join(root, "data"))
    torch.save(tp1_references(), os.path.join(root, "ref.pt"))
    run_torchrun(__file__, root, nproc=4)
    with open(os.path.join(root, "results.json")) as f:
        return root, json.load(f)


def _series(root: str, *names: str) -> dict[int, dict]:
    out = {}
    for n in names:
        out.update(read_metrics(os.path.join(root, n + ".jsonl")))
    return out


def _assert_same_steps(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b) == [1, 2, 3, 4], what
    for step in a:
        for key in ("loss", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=RTOL), f"{what}: step {step} {key}"


@pytest.mark.slow
def test_sequence_parallel_matches_without(launch):
    root, res = launch
    ref = _series(root, "z3_sp")  # TP=2, ZeRO-3, SP, 4 uninterrupted steps
    # ZeRO-3: no SP for steps 1-2 (SP vs none), then resumed WITH SP from that checkpoint.
    _assert_same_steps(ref, _series(root, "z3_part", "z3_sp_resumed"),
                       "TP=2 ZeRO-3: no SP (steps 1-2), then SP from its checkpoint")
    # ZeRO-1: SP for steps 1-2, then resumed WITHOUT SP from the SP checkpoint (steps 3-4 without
    # SP against the SP run's); ZeRO-1 and ZeRO-3 partition the same math differently.
    _assert_same_steps(ref, _series(root, "z1_sp_part", "z1_resumed"),
                       "TP=2 ZeRO-1: SP (steps 1-2), then no SP from its checkpoint")
    _assert_same_steps(_series(root, "tp4"), _series(root, "tp4_sp"), "TP=4 ZeRO-1, SP vs none")
    assert res["z1_resumed"]["iteration"] == res["z3_sp_resumed"]["iteration"] == 4


@pytest.mark.slow
def test_sequence_parallel_model_level(launch):
    _, res = launch
    expected = [f"tp{tp}:{n}" for tp in (2, 4) for n in CASES]
    expected += [f"tp{tp}:{k}" for tp in (2, 4) for k in ("nccl_path", "odd_length", "planner_saving",
                                                             "dropout_recompute")]
    assert sorted(res["model_checks"]) == sorted(expected)


# ----------------------------------------------------------------------------- single process
def _cfg(*extra: str):
    from megatron_lite.config import parse_args

    argv = ["--model-size", "tiny", "--num-query-groups", "4", "--vocab-size", "256", "--train-iters", "2",
            "--device", "cpu", "--micro-batch-size", "1", *extra]
    return parse_args(argv, world_size=4)


def test_flag_errors_and_plan_line():
    from megatron_lite.config.plan_text import format_plan
    from megatron_lite.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--sequence-parallel needs --tensor-model-parallel-size > 1$"):
        _cfg("--sequence-parallel")
    with pytest.raises(ConfigError, match=r"--sequence-parallel: --seq-length 250 is not divisible by "
                                          r"--tensor-model-parallel-size 4"):
        _cfg("--sequence-parallel", "--tp", "4", "--seq-length", "250")
    cfg = _cfg("--sequence-parallel", "--tp", "2", "--seq-length", "64")
    assert cfg.model.sequence_parallel is True
    assert "sequence parallel       : on  (norms, residuals, dropout on 32 of" in format_plan(cfg)
    plain = _cfg("--tp", "2", "--seq-length", "64")
    assert plain.model.sequence_parallel is False
    assert "sequence parallel" not in format_plan(plain)


def test_checkpoint_compatible_across_the_flag():
    from megatron_lite.checkpoint.compat import check_compatible

    saved = (_cfg("--sequence-parallel", "--tp", "2", "--seq-length", "64")).to_dict()
    check_compatible(saved, _cfg("--tp", "2", "--seq-length", "64"))  # no error
    saved["model"]["hidden_size"] = 64
    with pytest.raises(ValueError, match="hidden"):
        check_compatible(saved, _cfg("--tp", "2", "--seq-length", "64"))


def test_tp1_ignores_the_model_field():
    """At TP = 1 the model section's sequence_parallel changes nothing (no padding, no split)."""
    ref = run_case("plain", False)
    got = run_case("plain", True)
    assert torch.equal(got["loss"], ref["loss"])


def test_planner_output_layer_with_sequence_parallel():
    """The final norm's input is split over TP with SP; the LM head's (gathered) input is not."""
    from megatron_lite.planning import memory

    s, b, h, a, g, f, L, V, t, p = 64, 2, 32, 4, 4, 96, 2, 256, 2, 4
    off, on = (memory.activation_memory(s, b, h, a, g, f, L, V, t, sp, bytes_per_element=p, fused_norm=True)
               for sp in (False, True))
    assert off.output_layer - off.loss_logits == 2 * p * s * b * h
    assert on.output_layer - on.loss_logits == p * s * b * h // t + p * s * b * h
    assert off.loss_logits == on.loss_logits
    assert off.per_layer - on.per_layer == 4 * p * s * b * h // t   # norm, QKV, MLP inputs: / t


if __name__ == "__main__":
    _driver(sys.argv[1])
