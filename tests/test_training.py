"""Training engine: token-mean loss under accumulation, skip on non-finite, and end-to-end runs
under torchrun (2 processes, gloo, DeepSpeed): ZeRO 0/1/2/3 agree, TP=2 gives the TP=1 losses,
a NaN on one rank skips the step on all ranks, too many skips abort, resume is bit-exact.

The end-to-end runs happen in ONE torchrun launch (this file run as a script), shared by the
tests here and in tests/test_checkpoint.py through the session fixture ``e2e``.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from tests.dist_utils import free_port as _free_port  # noqa: F401 - used by other test modules
from tests.dist_utils import read_metrics, run_torchrun

COMMON = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
          "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "6",
          "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--split", "100,0,0",
          "--num-workers", "0", "--log-interval", "1", "--eval-interval", "0", "--seed", "7",
          "--device", "cpu"]


def make_dataset(prefix: str) -> None:
    """A tiny .bin/.idx of arithmetic-progression documents (learnable, so the loss falls)."""
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(300):
        n = int(rng.integers(20, 120))
        toks = (int(rng.integers(0, 250)) + np.arange(n) * int(rng.integers(1, 4))) % 250 + 3
        b.add_document(toks.astype(np.int32), [n])
    b.finalize(prefix + ".idx")


def runs_spec(root: str) -> dict:
    """name -> (argv, env injection) of every end-to-end run (order matters for resume)."""
    data = ["--data-path", os.path.join(root, "data")]

    def r(name, *extra, nan=""):
        return name, {"argv": COMMON + data + ["--metrics-file", os.path.join(root, name + ".jsonl")]
                      + list(extra), "nan": nan}

    return dict([
        r("z0", "--zero-stage", "0", "--save", os.path.join(root, "ck_z0"), "--save-interval", "3"),
        r("z1", "--zero-stage", "1", "--save", os.path.join(root, "ck_z1")),
        r("z2", "--zero-stage", "2"),
        r("z3", "--zero-stage", "3", "--save", os.path.join(root, "ck_z3"), "--save-interval", "6"),
        r("tp2", "--tp", "2", "--zero-stage", "1", "--save", os.path.join(root, "ck_tp2")),
        r("nan", "--zero-stage", "1", "--save", os.path.join(root, "ck_nan"), "--save-interval", "1",
          nan="3:1"),
        r("abort", "--zero-stage", "1", "--max-skipped-steps", "2", nan="2:0,3:0"),
        r("ev", "--zero-stage", "0", "--split", "90,10,0", "--eval-interval", "4", "--eval-iters", "2",
          "--eval-at-start"),
        r("ra", "--zero-stage", "1", "--save", os.path.join(root, "ck_res"), "--exit-interval", "3"),
        r("rb", "--zero-stage", "1", "--save", os.path.join(root, "ck_res"), "--load",
          os.path.join(root, "ck_res")),
        # The same command line again (a requeued job after the final save): nothing to do.
        r("rc", "--zero-stage", "1", "--save", os.path.join(root, "ck_res"), "--load",
          os.path.join(root, "ck_res")),
    ])


def _driver(root: str) -> None:
    """Body of the torchrun launch: every run of :func:`runs_spec` in one process group."""
    from megatron_lite.config import parse_args
    from megatron_lite.testing import faults
    from megatron_lite.training.loop import pretrain

    results = {}
    for name, spec in runs_spec(root).items():
        os.environ["MEGATRON_LITE_INJECT_NAN"] = spec["nan"]
        cfg = parse_args(spec["argv"])
        try:
            st = pretrain(cfg, callbacks=faults.callbacks_from_env())
            results[name] = {"iteration": st.iteration, "skipped": st.skipped_steps,
                             "consumed_samples": st.consumed_samples}
        except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        if name == "tp2":   # TP groups of this run still exist: load each shard for inference
            from megatron_lite.parallel import get_tensor_model_parallel_rank
            from megatron_lite.checkpoint.weights import load_model_for_inference

            model, _ = load_model_for_inference(os.path.join(root, "ck_tp2"),
                                                get_tensor_model_parallel_rank(), 2)
            results["tp2_infer_loss"] = probe_loss(model)
            # The TP=1 checkpoint of run z1, resharded in memory to this TP=2 layout.
            model, cfg = load_model_for_inference(os.path.join(root, "ck_z1"),
                                                  get_tensor_model_parallel_rank(), 2)
            results["z1_as_tp2_loss"] = probe_loss(model)
            results["z1_as_tp2_tp"] = cfg.parallel.tensor_model_parallel_size
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)


@torch.no_grad()
def probe_loss(model) -> float:
    """Mean per-token loss of a fixed batch (same on every TP degree for the same weights)."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, 253, (2, 64), generator=g)
    return float(model(tokens, labels=torch.roll(tokens, -1, 1)).mean())


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    """Run the end-to-end launch once; returns (root folder, results dict)."""
    # test_checkpoint.py imports this fixture, which pytest then treats as a second fixture:
    # a fixed folder under the session's base temp lets the second one reuse the first launch.
    root = str(tmp_path_factory.getbasetemp() / "e2e_shared")
    done = os.path.join(root, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            return root, json.load(f), ""
    os.makedirs(root, exist_ok=True)
    make_dataset(os.path.join(root, "data"))
    stdout = run_torchrun(__file__, root)
    with open(os.path.join(root, "results.json")) as f:
        return root, json.load(f), stdout


# ----------------------------------------------------------------------------- unit: one step
class _FakeEngine:
    """The DeepSpeed engine surface train_step uses (D = 1): records grads at the boundary."""

    def __init__(self, model, A):
        self.model, self.A, self.calls, self.grads = model, A, 0, None

    def __call__(self, *a, **k):
        return self.model(*a, **k)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False
        loss.backward()

    def step(self):
        self.calls += 1
        if self.calls % self.A == 0:
            self.grads = [p.grad.clone() for p in self.model.parameters()]
            self.optimizer.step()
            self.model.zero_grad()

    def was_step_applied(self):
        return not self.optimizer.skipped

    def get_global_grad_norm(self):
        return None


def _batch(tokens, n_loss):
    b, s = tokens.shape
    mask = torch.zeros(b, s)
    mask.view(-1)[:n_loss] = 1.0
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
            "position_ids": torch.arange(s).expand(b, s)}


def _tiny_model():
    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel

    torch.manual_seed(0)
    return LlamaModel(ModelConfig(model_size="tiny", vocab_size=128, seq_length=16))


def test_token_mean_over_global_batch_equals_concatenated_batch():
    from megatron_lite.training.optimizer import GuardedAdamW
    from megatron_lite.training.schedules import LRScheduler
    from megatron_lite.training.step import TrainState, train_step

    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    t1, t2 = torch.randint(0, 128, (1, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    mb1, mb2 = _batch(t1, 3), _batch(t2, 29)       # 3 and 29 loss tokens: unequal weights
    # Reference: the concatenated batch's token-mean loss, plain autograd.
    cat = {k: torch.cat([mb1[k], mb2[k]]) for k in mb1}
    per_tok = model(cat["tokens"], position_ids=cat["position_ids"], labels=cat["labels"])
    ref_loss = (per_tok * cat["loss_mask"]).sum() / cat["loss_mask"].sum()
    ref_loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # A mean of per-micro-batch means would weigh mb1's 3 tokens like mb2's 29: must differ.
    opt = GuardedAdamW(model.parameters(), lr=0.0)
    eng = _FakeEngine(model, A=2)
    eng.optimizer = opt
    sched = LRScheduler(opt, max_lr=1e-3, min_lr=0.0, warmup_iters=0, decay_iters=10,
                        decay_style="constant")
    res = train_step(eng, opt, sched, [mb1, mb2], TrainState(), 3, torch.device("cpu"))
    assert res.loss == pytest.approx(ref_loss.item(), rel=1e-6) and res.loss_tokens == 32
    for a, b in zip(eng.grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not res.skipped and sched.num_updates == 1


def test_nonfinite_loss_skips_update_and_schedule(monkeypatch):
    from megatron_lite.training.optimizer import GuardedAdamW
    from megatron_lite.training.schedules import LRScheduler
    from megatron_lite.testing import faults
    from megatron_lite.training.step import TooManySkippedSteps, TrainState, train_step

    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = GuardedAdamW(model.parameters(), lr=1e-3)
    eng = _FakeEngine(model, A=1)
    eng.optimizer = opt
    sched = LRScheduler(opt, max_lr=1e-3, min_lr=0.0, warmup_iters=2, decay_iters=10,
                        decay_style="linear")
    st = TrainState()
    mb = _batch(torch.randint(0, 128, (1, 16)), 16)
    monkeypatch.setenv("MEGATRON_LITE_INJECT_NAN", "1:0,2:0")
    res = train_step(eng, opt, sched, [mb], st, 3, torch.device("cpu"),
                     callbacks=faults.callbacks_from_env())
    assert res.skipped and math.isnan(res.loss) and st.skipped_steps == 1
    assert sched.num_updates == 0 and len(opt.state) == 0           # no Adam state created
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TooManySkippedSteps, match="--max-skipped-steps 2"):
        train_step(eng, opt, sched, [mb], st, 2, torch.device("cpu"),
                   callbacks=faults.callbacks_from_env())
    monkeypatch.setenv("MEGATRON_LITE_INJECT_NAN", "")
    st.consecutive_skipped = 0
    res = train_step(eng, opt, sched, [mb], st, 2, torch.device("cpu"),
                     callbacks=faults.callbacks_from_env())
    assert not res.skipped and res.lr == pytest.approx(5e-4)    # u = 0 still: warmup 1/2
    assert st.consecutive_skipped == 0 and sched.num_updates == 1


def test_param_groups_weight_decay_policy():
    from megatron_lite.training.optimizer import param_groups

    model = _tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert no_decay and all(dict(model.named_parameters())[n].ndim == 1 for n in no_decay)
    assert any("embed" in n for n in decay)                   # default: embeddings decayed
    assert len(decay) + len(no_decay) == len(names)
    g2 = {g["name"]: g for g in param_groups(model, 0.1, no_decay_embeddings=True)}
    moved = {names[id(p)] for p in g2["no_decay"]["params"]} - no_decay
    assert moved and all(any(k in n for k in ("embed", "output_layer", "lm_head")) for n in moved)


def test_grad_norm_and_clipping_by_hand():
    from megatron_lite.training.optimizer import GuardedAdamW, tp_aware_grad_norm

    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    assert tp_aware_grad_norm([a, b]) == pytest.approx(13.0)      # sqrt(9 + 16 + 144)
    opt = GuardedAdamW([a, b], clip_grad=1.0, lr=0.0)
    opt.begin_step()
    opt.step()
    assert opt._global_grad_norm == pytest.approx(13.0) and not opt.skipped
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) / (13.0 + 1e-6))
    b.grad = torch.tensor([float("inf")])                          # non-finite gradient: skip
    opt.begin_step()
    opt.step()
    assert opt.skipped and opt.state[a]["step"] == 1


def test_seed_and_deterministic_flags():
    from megatron_lite.config import parse_args
    from megatron_lite.training.setup import set_seeds

    cfg = parse_args(COMMON + ["--deterministic"])
    try:
        set_seeds(cfg, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        x = torch.rand(3)
        set_seeds(cfg, torch.device("cpu"))
        assert torch.equal(x, torch.rand(3))                         # --seed 7 reseeds torch
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_zero_stages_agree_and_loss_falls(e2e):
    root, results, _ = e2e
    for name in ("z0", "z1", "z2", "z3"):
        assert results[name] == {"iteration": 6, "skipped": 0, "consumed_samples": 24}
    ref = read_metrics(os.path.join(root, "z0.jsonl"))
    for name in ("z1", "z2", "z3"):
        m = read_metrics(os.path.join(root, f"{name}.jsonl"))
        for s in range(1, 7):
            assert m[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
            assert m[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
            assert m[s]["lr"] == ref[s]["lr"]
    assert ref[6]["loss"] < ref[1]["loss"] - 0.2
    assert [ref[s]["consumed_tokens"] for s in (1, 6)] == [256, 1536]


@pytest.mark.slow
def test_eval_at_start_and_interval(e2e):
    """--eval-at-start evaluates before step 1; then every --eval-interval steps and after the last."""
    root, results, _ = e2e
    assert results["ev"] == {"iteration": 6, "skipped": 0, "consumed_samples": 24}
    with open(os.path.join(root, "ev.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 6]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    # Untrained: near the uniform-prediction loss ln(256); trained on a learnable corpus: lower.
    assert abs(evals[0]["val_loss"] - math.log(256)) < 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2


@pytest.mark.slow
def test_tp2_matches_tp1(e2e):
    root, results, _ = e2e
    a = read_metrics(os.path.join(root, "z1.jsonl"))
    b = read_metrics(os.path.join(root, "tp2.jsonl"))
    for s in range(1, 7):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4), s


@pytest.mark.slow
def test_tp2_checkpoint_loads_for_inference_like_tp1(e2e):
    from megatron_lite.checkpoint.weights import load_model_for_inference

    root, results, _ = e2e
    model, cfg = load_model_for_inference(os.path.join(root, "ck_z1"), 0, 1)
    assert cfg.parallel.tensor_model_parallel_size == 1
    assert results["tp2_infer_loss"] == pytest.approx(probe_loss(model), rel=1e-4)
    # Resharding TP=1 -> TP=2 at load time gives the same function up to fp summation order.
    assert results["z1_as_tp2_tp"] == 2
    assert results["z1_as_tp2_loss"] == pytest.approx(probe_loss(model), rel=1e-6)
    # ... and TP=2 -> TP=1.
    m21, _ = load_model_for_inference(os.path.join(root, "ck_tp2"), 0, 1)
    assert probe_loss(m21) == pytest.approx(results["tp2_infer_loss"], rel=1e-6)


@pytest.mark.slow
def test_nan_on_one_rank_skips_on_all(e2e):
    root, results, _ = e2e
    assert results["nan"] == {"iteration": 6, "skipped": 1, "consumed_samples": 24}
    m = read_metrics(os.path.join(root, "nan.jsonl"))
    ref = read_metrics(os.path.join(root, "z1.jsonl"))
    assert m[3]["loss"] is None and m[3]["skipped_steps"] == 1 and m[2]["skipped_steps"] == 0
    assert m[4]["lr"] == m[3]["lr"] == ref[3]["lr"]        # schedule did not advance
    assert [m[s]["loss"] for s in (1, 2)] == [ref[s]["loss"] for s in (1, 2)]
    # Parameters and optimizer state after the skipped step 3 equal those after step 2.
    ck = os.path.join(root, "ck_nan")
    for f in sorted(os.listdir(os.path.join(ck, "iter_0000002"))):
        if f.endswith(".pt") and "states" in f:
            a = torch.load(os.path.join(ck, "iter_0000002", f), weights_only=False)
            b = torch.load(os.path.join(ck, "iter_0000003", f), weights_only=False)
            _assert_same_tensors(a, b, f)
    assert "TooManySkippedSteps" in results["abort"]["error"]
    assert "2 consecutive steps skipped" in results["abort"]["error"]


def _assert_same_tensors(a, b, where):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        for k in a:
            if k in ("global_steps", "global_samples", "skipped_steps", "iteration", "ds_config",
                     "ds_version", "lr_scheduler", "client_state"):
                continue
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


@pytest.mark.slow
def test_resume_is_bit_exact(e2e):
    root, results, out = e2e
    assert results["ra"]["iteration"] == 3 and results["rb"]["iteration"] == 6
    full = read_metrics(os.path.join(root, "z1.jsonl"))
    part1 = read_metrics(os.path.join(root, "ra.jsonl"))
    part2 = read_metrics(os.path.join(root, "rb.jsonl"))
    assert sorted(part1) == [1, 2, 3] and sorted(part2) == [4, 5, 6]
    for s in (1, 2, 3):
        assert part1[s]["loss"] == full[s]["loss"]
    for s in (4, 5, 6):      # every later loss, bit for bit, and the same LR right after resume
        assert part2[s]["loss"] == full[s]["loss"], s
        assert part2[s]["lr"] == full[s]["lr"]
        assert part2[s]["consumed_samples"] == full[s]["consumed_samples"]
    # Restarting the finished run returns at once, at the same position, training nothing.
    assert results["rc"] == {"iteration": 6, "skipped": 0, "consumed_samples": 24}
    assert not os.path.exists(os.path.join(root, "rc.jsonl")) or \
        read_metrics(os.path.join(root, "rc.jsonl")) == {}


if __name__ == "__main__":
    _driver(sys.argv[1])
