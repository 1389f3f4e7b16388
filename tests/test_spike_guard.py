"""Loss-spike guard: window statistics, the grad-norm gate, capture decoding, and real 2-process
runs (DP=2, ZeRO-1, DeepSpeed, gloo) where an injected bad batch is skipped or rolled back and the
capture file names exactly that batch's sample ids; the guard stays silent on a clean run.

The end-to-end runs share ONE torchrun launch (this file run as a script; fixture ``spike_e2e``).
"""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from tests.fixtures_data import tiny_corpus_and_tokenizer  # noqa: F401
from tests.dist_utils import read_metrics, run_torchrun
from tests.test_training import COMMON, make_dataset

GB, ITERS, W = 4, 10, 6


def runs_spec(root: str) -> dict:
    """name -> (argv, MEGATRON_LITE_INJECT_SPIKE) of the end-to-end runs."""
    base = [a for a in COMMON]
    base[base.index("--train-iters") + 1] = str(ITERS)
    base += ["--data-path", os.path.join(root, "data"), "--zero-stage", "1",
             "--spike-detection", "--spike-window", str(W)]

    def r(name, *extra, inject="", ck=None):
        return name, {"argv": base + ["--metrics-file", os.path.join(root, name + ".jsonl"),
                                      "--save", os.path.join(root, "ck_" + (ck or name))]
                      + list(extra), "inject": inject}

    return dict([
        r("clean", "--noise-scale-interval", "2"),
        # The clean run again, stopped after step 5 and resumed from its checkpoint.
        r("res_a", "--noise-scale-interval", "2", "--exit-interval", "5", ck="res"),
        r("res_b", "--noise-scale-interval", "2", "--load", os.path.join(root, "ck_res"), ck="res"),
        # ZeRO-0 (p.grad certainly holds the local micro-batch gradient until the boundary).
        r("z0", "--noise-scale-interval", "2", "--zero-stage", "0", "--train-iters", "2"),
        r("skip", inject="8:50"),
        r("rollback", "--spike-policy", "rollback", "--save-interval", "3",
          "--spike-lr-factor", "0.5", "--spike-lr-steps", "2", inject="8:50"),
    ])


def _driver(root: str) -> None:
    from megatron_lite.config import parse_args
    from megatron_lite.testing import faults
    from megatron_lite.training.loop import pretrain

    results = {}
    for name, spec in runs_spec(root).items():
        os.environ["MEGATRON_LITE_INJECT_SPIKE"] = spec["inject"]
        try:
            st = pretrain(parse_args(spec["argv"]), callbacks=faults.callbacks_from_env())
            results[name] = {"iteration": st.iteration, "skipped": st.skipped_steps,
                             "consumed_samples": st.consumed_samples}
        except Exception as e:  # noqa: BLE001 - recorded for the test to assert on
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def spike_e2e(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("spike_e2e"))
    make_dataset(os.path.join(root, "data"))
    stdout = run_torchrun(__file__, root)
    with open(os.path.join(root, "results.json")) as f:
        res = json.load(f)
    for name, r in res.items():
        assert "error" not in r, (name, r)
    return root, res, stdout


def _capture(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    assert recs[0]["type"] == "spike" and all(r["type"] == "sample" for r in recs[1:])
    return recs[0], recs[1:]


# ----------------------------------------------------------------------------- end to end
def _extras(root: str, ckpt: str, iteration: int) -> dict:
    """The guard/noise state saved in a checkpoint's trainer_state.json."""
    with open(os.path.join(root, ckpt, f"iter_{iteration:07d}", "trainer_state.json")) as f:
        return json.load(f)["extras"]


def test_clean_run_never_fires(spike_e2e):
    root, res, _ = spike_e2e
    assert res["clean"] == {"iteration": ITERS, "skipped": 0, "consumed_samples": ITERS * GB}
    m = read_metrics(os.path.join(root, "clean.jsonl"))
    assert [m[s]["spikes"] for s in range(1, ITERS + 1)] == [0] * ITERS
    assert not os.path.exists(os.path.join(root, "ck_clean", "spikes"))
    # The window saved with the final checkpoint holds the last W accepted steps' values.
    sd = _extras(root, "ck_clean", ITERS)["spike_guard"]
    last = range(ITERS - W + 1, ITERS + 1)
    assert sd["loss_window"] == pytest.approx([m[s]["step_loss"] for s in last], rel=1e-12)
    assert sd["norm_window"] == pytest.approx([m[s]["grad_norm"] for s in last], rel=1e-12)
    # Noise scale under DP=2: B_small = one rank's micro-batch (1 x 64 loss tokens), B_big = GB.
    assert m[2]["noise_scale/b_small"] == 64 and m[2]["noise_scale/b_big"] == GB * 64
    assert m[2]["noise_scale/g2_big"] == pytest.approx(m[2]["grad_norm"] ** 2, rel=1e-9)
    # ZeRO-1 reads the same per-rank micro-batch gradient as ZeRO-0 (same model after step 1:
    # both runs' step-1 LR is warmup 1/2 x peak).
    z0 = read_metrics(os.path.join(root, "z0.jsonl"))
    for k in ("noise_scale/g2_small", "noise_scale/g2_big", "noise_scale/b_simple"):
        assert z0[2][k] == pytest.approx(m[2][k], rel=1e-4), k


def test_resume_restores_window_and_noise_ema_exactly(spike_e2e):
    root, res, _ = spike_e2e
    assert res["res_a"]["iteration"] == 5 and res["res_b"]["iteration"] == ITERS
    clean = read_metrics(os.path.join(root, "clean.jsonl"))
    resumed = read_metrics(os.path.join(root, "res_b.jsonl"))
    assert sorted(resumed) == list(range(6, ITERS + 1))
    keys = ("step_loss", "grad_norm", "lr", "noise_scale/b_simple", "noise_scale/g2",
            "noise_scale/trace_sigma")
    for s in range(6, ITERS + 1):   # the EMAs after resume continue the uninterrupted ones
        assert {k: resumed[s][k] for k in keys} == {k: clean[s][k] for k in keys}, s
    sd = _extras(root, "ck_res", 5)["spike_guard"]
    assert sd["loss_window"] == [clean[s]["step_loss"] for s in range(1, 6)]   # warm-up: 5 < W
    assert _extras(root, "ck_res", ITERS) == _extras(root, "ck_clean", ITERS)


def test_injected_spike_is_skipped_and_captured(spike_e2e):
    root, res, out = spike_e2e
    assert res["skip"] == {"iteration": ITERS, "skipped": 1, "consumed_samples": ITERS * GB}
    m = read_metrics(os.path.join(root, "skip.jsonl"))
    assert m[8]["step_skipped"] == 1 and m[8]["spikes"] == 1 and m[7]["spikes"] == 0
    assert m[8]["step_loss"] > 40  # 50 x a ~4.5 nats loss
    # Schedule untouched: step 9 uses step 8's LR (cosine decay changes it at every update).
    assert m[9]["lr"] == m[8]["lr"] and m[8]["lr"] != m[7]["lr"]
    head, samples = _capture(os.path.join(root, "ck_skip", "spikes", "step_8.jsonl"))
    assert head["criterion"] == "loss" and head["action"] == "skip" and head["step"] == 8
    assert head["value"] > head["window_mean"] + 6 * head["window_std"]
    # Step 8 reads global samples [28, 32) (sampler contract: rank r gets 28 + j*2 + r).
    assert sorted(s["sample_id"] for s in samples) == list(range(7 * GB, 8 * GB))
    assert {s["dataset_id"] for s in samples} == {0} and {s["dp_rank"] for s in samples} == {0, 1}
    worst = sorted((s for s in samples if s["worst_rank"]), key=lambda s: s["worst_rank"])
    assert [s["loss"] for s in worst] == sorted((s["loss"] for s in samples), reverse=True)
    assert all(len(s["token_ids"]) == 64 for s in worst)
    assert not any(os.path.exists(os.path.join(root, "ck_skip", "spikes", f"step_{k}.jsonl"))
                   for k in range(1, ITERS + 1) if k != 8)


def test_injected_spike_is_rolled_back(spike_e2e):
    root, res, out = spike_e2e
    # Steps 7-8 are redone on new data: 2 extra global batches consumed, no skip counted.
    assert res["rollback"] == {"iteration": ITERS, "skipped": 0,
                               "consumed_samples": (ITERS + 2) * GB}
    head, samples = _capture(os.path.join(root, "ck_rollback", "spikes", "step_8.jsonl"))
    assert head["action"] == "rollback" and head["rollback_iteration"] == 6
    assert head["skipped_samples"] == [6 * GB, 8 * GB]
    assert sorted(s["sample_id"] for s in samples) == list(range(7 * GB, 8 * GB))
    assert os.listdir(os.path.join(root, "ck_rollback", "spikes")) == ["step_8.jsonl"]
    clean = read_metrics(os.path.join(root, "clean.jsonl"))
    with open(os.path.join(root, "rollback.jsonl")) as f:
        recs = [json.loads(line) for line in f if json.loads(line).get("type") == "train"]
    steps = [r["step"] for r in recs]
    assert steps == list(range(1, 9)) + list(range(7, ITERS + 1))
    after = recs[8:]
    # The first step after the rollback reads the samples after the bad batch.
    assert after[0]["consumed_samples"] == 9 * GB and after[-1]["spikes"] == 1
    # --spike-lr-factor 0.5 for 2 steps on top of the (restored) schedule, then the schedule.
    assert after[0]["lr"] == pytest.approx(0.5 * clean[7]["lr"], rel=1e-12)
    assert after[1]["lr"] == pytest.approx(0.5 * clean[8]["lr"], rel=1e-12)
    assert after[2]["lr"] == pytest.approx(clean[9]["lr"], rel=1e-12)
    # Before the spike the run equals the clean run (whose noise-scale measurement must not
    # change training either).
    assert [r["step_loss"] for r in recs[:7]] == [clean[s]["step_loss"] for s in range(1, 8)]
    assert after[0]["spike_rollbacks"] == 1
    assert "[spike] step 8: loss" in out and "samples [24, 32) skipped" in out


def test_offline_noise_scale_tool_on_the_clean_checkpoint(spike_e2e, tmp_path):
    """tools/noise_scale_estimator.py on this launch's final clean checkpoint (shares the launch)."""
    from tests.fixtures_data import load_tool

    root, _, _ = spike_e2e
    out = str(tmp_path / "ns.json")
    res = load_tool("noise_scale_estimator").main(
        ["--load", os.path.join(root, "ck_clean"), "--data-path", os.path.join(root, "data"),
         "--batch-sizes", "1,4", "--num-batches", "3", "--output", out])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert [r["batch_tokens"] for r in res["rows"]] == [64, 256] and res["seq_length"] == 64
    # Two batch sizes: the least-squares fit is exactly the A.2/A.3 pair.
    assert res["b_simple_tokens"] == pytest.approx(res["b_simple_from_extremes_tokens"], rel=1e-9)
    if res["suggested_global_batch_tokens"] is not None:
        assert res["suggested_global_batch_tokens"] % 64 == 0


# ----------------------------------------------------------------------------- units
def test_rolling_window_statistics_and_warmup():
    from megatron_lite.training.callbacks.spike_guard import RollingWindow

    w = RollingWindow(4)
    for x in (1.0, 2.0, 4.0):
        w.push(x)
        assert w.is_outlier(1e9, 6.0)[0] is False          # warm-up: never flags
    w.push(3.0)
    w.push(float("nan"))                                    # non-finite values are not recorded
    mean, std = w.stats()
    assert mean == 2.5 and std == pytest.approx(np.std([1, 2, 4, 3], ddof=1), rel=1e-15)
    edge = mean + 2.0 * std
    assert w.is_outlier(edge, 2.0)[0] is False and w.is_outlier(edge + 1e-9, 2.0)[0] is True
    assert w.is_outlier(-100.0, 2.0)[0] is False            # one-sided
    w.push(5.0)                                             # the oldest value leaves
    assert list(w.values) == [2.0, 4.0, 3.0, 5.0]


class _Engine:
    """DeepSpeed surface train_step uses (D = 1): the "wrapper" reports a chosen grad norm."""

    def __init__(self, model, opt, norm):
        self.module, self.opt, self.calls = model, opt, 0
        self.optimizer = types.SimpleNamespace(_global_grad_norm=norm)

    def __call__(self, tokens, labels=None, **k):
        return self.module(tokens, labels=labels)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.opt.step()
        self.module.zero_grad()

    def was_step_applied(self):
        return not self.opt.skipped

    def get_global_grad_norm(self):
        return self.optimizer._global_grad_norm


class _Sched:
    def __init__(self):
        self.num_updates = 0

    def apply(self):
        return 1e-2

    def advance(self):
        self.num_updates += 1


def _cfg(**over):
    from megatron_lite.config import parse_args

    argv = ["--model-size", "tiny", "--vocab-size", "128", "--seq-length", "16", "--train-iters",
            "4", "--device", "cpu", "--spike-detection", "--spike-window", "4"]
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parse_args(argv, world_size=1)


def test_grad_norm_gate_skips_before_the_update(tmp_path):
    """The grad-norm criterion acts inside engine.step, before our optimizer's update."""
    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel
    from megatron_lite.training.optimizer import GuardedAdamW
    from megatron_lite.training.callbacks.spike_guard import SpikeGuard
    from megatron_lite.training.step import TrainState, train_step

    torch.manual_seed(0)
    model = LlamaModel(ModelConfig(model_size="tiny", vocab_size=128, seq_length=16))
    opt = GuardedAdamW(model.parameters(), lr=1e-2)
    eng = _Engine(model, opt, norm=1.0)
    guard = SpikeGuard(_cfg(), str(tmp_path))
    guard.install_gate(opt, eng)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    mb = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 16),
          "sample_ids": torch.tensor([10, 11]), "dataset_ids": torch.tensor([0, 1])}
    sched, st = _Sched(), TrainState()
    for norm in (1.0, 1.1, 0.9, 1.0):       # fill the window (warm-up)
        eng.optimizer._global_grad_norm = norm
        assert train_step(eng, opt, sched, [mb], st, 3, torch.device("cpu"),
                          callbacks=[guard]).spike is None
    # A larger loss would trip the loss criterion first; keep the same batch, raise only the norm.
    guard.loss_window.values.clear()
    before = [p.detach().clone() for p in model.parameters()]
    adam_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    eng.optimizer._global_grad_norm = 10.0
    res = train_step(eng, opt, sched, [mb], st, 3, torch.device("cpu"), callbacks=[guard])
    assert res.skipped and res.spike["criterion"] == "grad_norm" and res.spike["value"] == 10.0
    assert res.spike["window_mean"] == pytest.approx(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(opt.state[k]["exp_avg"], v["exp_avg"]) for k, v in adam_state.items())
    assert sched.num_updates == 4 and st.skipped_steps == 1 and guard.spikes == 1
    assert sorted(r["sample_id"] for r in res.spike_samples) == [10, 11]
    # The flagged norm did not enter the window; a normal norm applies again.
    assert list(guard.norm_window.values) == [1.0, 1.1, 0.9, 1.0]
    eng.optimizer._global_grad_norm = 1.05
    res = train_step(eng, opt, sched, [mb], st, 3, torch.device("cpu"), callbacks=[guard])
    assert not res.skipped and sched.num_updates == 5
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_capture_decodes_worst_samples(tmp_path, tiny_corpus_and_tokenizer):  # noqa: F811
    from megatron_lite.data.tokenizer import build_tokenizer
    from megatron_lite.training.callbacks.spike_guard import SpikeGuard

    _, model_path = tiny_corpus_and_tokenizer
    cfg = _cfg(tokenizer_model=model_path, spike_capture_samples=1, vocab_size=512)
    tok = build_tokenizer("SentencePieceTokenizer", model_path)
    texts = ["the data model", "café naïve 日本", "return self"]
    samples = [{"sample_id": 100 + i, "dataset_id": i % 2, "loss_sum": loss * 4,
                "loss_tokens": 4, "micro_batch": i, "index": 0, "tokens": tok.tokenize(t)}
               for i, (t, loss) in enumerate(zip(texts, (2.0, 9.0, 3.0)))]
    guard = SpikeGuard(cfg, str(tmp_path))
    path = guard.capture(5, {"criterion": "loss", "value": 9.0}, samples)
    head, recs = _capture(path)
    assert head == {"type": "spike", "step": 5, "criterion": "loss", "value": 9.0}
    assert [r["sample_id"] for r in recs] == [100, 101, 102]
    assert [r["loss"] for r in recs] == [2.0, 9.0, 3.0]
    assert [r["worst_rank"] for r in recs] == [None, 1, None]
    assert recs[1]["text"] == "café naïve 日本" and "text" not in recs[0]
    assert path == os.path.join(str(tmp_path), "spikes", "step_5.jsonl")


def test_state_round_trip_and_config_checks():
    from megatron_lite.config.checks import check_spike_guard as check_config
    from megatron_lite.training.callbacks.spike_guard import SpikeGuard

    g = SpikeGuard(_cfg(), None)
    for x in (3.0, 2.0, 1.0):
        g.accept(x, x * 10)
    g.spikes, g.rollbacks, g.lr_steps_left = 2, 1, 3
    h = SpikeGuard(_cfg(), None)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict()
    with pytest.raises(ValueError, match="--save-interval"):
        check_config(_cfg(spike_policy="rollback"))
    with pytest.raises(ValueError, match="--spike-window must be >= 2"):
        check_config(_cfg(spike_window=1))


def test_extras_state_round_trip(tmp_path):
    """setup_extras restores the window and the noise-scale EMAs from TrainState.extras."""
    from megatron_lite.training.callbacks.noise_scale import NoiseScaleEstimator
    from megatron_lite.training.callbacks.spike_guard import SpikeGuard
    from megatron_lite.training.callbacks.extras import extras_state, setup_extras

    cfg = _cfg(noise_scale_interval=5, global_batch_size=2)   # A = 2: the estimator needs >= 2
    g, n = SpikeGuard(cfg, None), NoiseScaleEstimator(5, 0.9)
    for x in (4.0, 3.5, 3.25):
        g.accept(x, x / 2)
    n.update(2.0, 50.0)
    extras = json.loads(json.dumps(extras_state(g, n)))  # what trainer_state.json holds
    assert extras_state(None, None) is None
    opt = types.SimpleNamespace(step=lambda *a, **k: None, param_groups=[])
    g2, n2 = setup_extras(cfg, opt, types.SimpleNamespace(optimizer=None), extras, True, None)
    assert g2.state_dict() == g.state_dict() and n2.state_dict() == n.state_dict()
    assert opt.step.__name__ == "gated_step"
    # Off: nothing is built, the optimizer is left alone.
    opt = types.SimpleNamespace(step=lambda *a, **k: None, param_groups=[])
    from megatron_lite.config import parse_args

    plain = parse_args(["--model-size", "tiny", "--vocab-size", "128", "--seq-length", "16",
                        "--train-iters", "4", "--device", "cpu"], world_size=1)
    assert setup_extras(plain, opt, None, extras, True, None) == (None, None)
    assert opt.step.__name__ == "<lambda>"


if __name__ == "__main__":  # torchrun entry of the spike_e2e fixture
    _driver(sys.argv[1])
