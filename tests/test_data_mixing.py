"""Mixing controls (issue 18 item 2): epoch caps with redistribution, share bounds (projection onto
the bounded simplex), DoReMi's exponentiated-gradient update, online mixing resumed bitwise, and the
one-line errors.

The end-to-end part is one torchrun launch (this file run as a script, 2 gloo processes, DP=2,
one DataLoader worker per rank so prefetching is exercised).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.blended import BlendedDataset, compute_mixed_blend  # noqa: E402
from megatron_lite.data.mixing import (exponentiated_gradient_step, parse_share_bounds,  # noqa: E402
                                       project_bounded_simplex)
from tests.dist_utils import run_torchrun  # noqa: E402
from tests.test_per_corpus_eval import make_corpus  # noqa: E402


class _Src:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i}


# ----------------------------------------------------------------------------- unit: exact values
def test_max_epochs_redistribution_counts_by_hand():
    # Weights 1/2, 1/4, 1/4; source 1 capped at 2 samples. Greedy interleave (pick the largest
    # error w_j * max(i, 1) - taken_j, ties to the lowest index): i=0..5 -> 0 1 2 0 0 1; position 5
    # is source 1's 2nd sample (its cap), so the walk restarts at 6 with the weights redistributed
    # (1/2, 0, 1/4) / (3/4) = (2/3, 0, 1/3): errors (2/3, 1/3) -> 0; (-1/3, 1/3) -> 2;
    # (1/3, -1/3) -> 0; (0, 0) -> 0; (-1/3, 1/3) -> 2.
    stages = [(0, np.array([0.5, 0.25, 0.25]))]
    di, dsi, eff = compute_mixed_blend(stages, 11, 4, caps=np.array([100, 2, 100]))
    assert di.tolist() == [0, 1, 2, 0, 0, 1, 0, 2, 0, 0, 2]
    assert np.bincount(di, minlength=3).tolist() == [6, 2, 3]
    assert dsi.tolist() == [0, 0, 0, 1, 2, 1, 3, 1, 4, 5, 2]
    assert [e[0] for e in eff] == [0, 6]
    np.testing.assert_allclose(eff[1][1], [2 / 3, 0, 1 / 3], rtol=0, atol=1e-15)
    # Every corpus capped below the run: refused.
    with pytest.raises(ValueError, match="--data-max-epochs"):
        compute_mixed_blend(stages, 11, 4, caps=np.array([3, 3, 3]))


def test_projection_onto_bounded_simplex_exact():
    # KKT by hand: x = clip(w - tau, lo, hi); x0 = 0.5 (upper), x1 = 0.2 - tau, x2 = 0.1 - tau
    # with 0.5 + 0.3 - 2 tau = 1 -> tau = -0.1 -> (0.5, 0.3, 0.2).
    x = project_bounded_simplex([0.7, 0.2, 0.1], np.array([0, 0.25, 0]), np.array([0.5, 1, 1]))
    np.testing.assert_allclose(x, [0.5, 0.3, 0.2], rtol=0, atol=1e-15)
    # A lower bound that binds: (0.9, 0.1) with lo1 = 0.3 -> (0.7, 0.3).
    np.testing.assert_allclose(project_bounded_simplex([0.9, 0.1], np.array([0, 0.3]), np.ones(2)),
                               [0.7, 0.3], rtol=0, atol=1e-15)
    # Inside the box already: unchanged.
    np.testing.assert_allclose(project_bounded_simplex([0.2, 0.3, 0.5]), [0.2, 0.3, 0.5], atol=1e-15)
    # A bounded static blend draws the projected shares: (0.9, 0.1) with code >= 0.3 -> 7:3.
    stages = [(0, np.array([0.9, 0.1]))]
    lo_hi = parse_share_bounds(["code:0.3:"], ["web", "code"])
    ds = BlendedDataset([_Src(100), _Src(100)], stages, 20, 4, bounds=[lo_hi])
    assert np.bincount(ds.dataset_index, minlength=2).tolist() == [14, 6]


def test_exponentiated_gradient_step_matches_numpy_formula():
    alpha = np.array([0.5, 0.3, 0.2])
    excess = np.array([0.4, -0.2, 1.1])
    eta, c = 1.5, 0.01
    lam = np.maximum(excess, 0)                       # DoReMi clips the excess loss at 0
    a = alpha * np.exp(eta * lam)
    a = a / a.sum()
    want = (1 - c) * a + c / 3
    got = exponentiated_gradient_step(alpha, excess, eta, c)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    # With bounds: the projection of the same point.
    lo, hi = np.array([0.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.4])
    np.testing.assert_allclose(exponentiated_gradient_step(alpha, excess, eta, c, (lo, hi)),
                               project_bounded_simplex(want, lo, hi), rtol=0, atol=1e-15)


def test_online_change_applies_from_its_position_and_replays_from_state():
    stages = [(0, np.array([0.5, 0.5]))]
    ds = BlendedDataset([_Src(100), _Src(100)], stages, 40, 4, online=True)
    head = ds.dataset_index[:12].copy()
    ds.resolve(range(10))
    with pytest.raises(RuntimeError, match="look-ahead"):
        ds.apply_weights(9, [0.9, 0.1])
    ds.apply_weights(12, [0.9, 0.1])
    assert ds.dataset_index[:12].tolist() == head.tolist()
    assert np.bincount(ds.dataset_index[12:22], minlength=2).tolist() == [9, 1]
    np.testing.assert_allclose(ds.weights_at(30), [0.9, 0.1])
    state = json.loads(json.dumps(ds.state_dict(16)))
    fresh = BlendedDataset([_Src(100), _Src(100)], stages, 40, 4, online=True)
    fresh.load_state_dict(state)
    assert fresh.dataset_index.tolist() == ds.dataset_index.tolist()
    assert fresh.dataset_sample_index.tolist() == ds.dataset_sample_index.tolist()
    # With stages an online change holds until the next stage start, which brings its own weights.
    staged = [(16 * 4, np.array([0.5, 0.5])), (10 ** 6, np.array([0.25, 0.75]))]
    st = BlendedDataset([_Src(100), _Src(100)], staged, 40, 4, online=True)
    st.apply_weights(8, [1.0, 0.0])
    assert st.dataset_index[8:16].tolist() == [0] * 8 and st.weights_at(16).tolist() == [0.25, 0.75]
    assert np.bincount(st.dataset_index[16:], minlength=2).tolist() == [6, 18]


def test_callback_running_minimum_reference_and_stage_bounds(tmp_path):
    from types import SimpleNamespace as NS

    from megatron_lite.data.blended import load_stage_bounds
    from megatron_lite.training.callbacks.data_mixing import DataMixing

    cfg = NS(data=NS(mixing_update="online", mixing_update_interval=None, mixing_eta=2.0,
                     mixing_smoothing=0.0, mixing_reference=None, num_workers=0),
             eval=NS(eval_interval=2), model=NS(seq_length=4), training=NS(micro_batch_size=1))
    events = []
    logger = NS(log_event=lambda rec, prefix: events.append(rec))
    ds = BlendedDataset([_Src(100), _Src(100)], [(0, np.array([0.5, 0.5]))], 40, 4, online=True,
                        labels=["web", "code"])
    cb = DataMixing(cfg, ds, logger, 1, "cpu", ["web", "code"])
    cb.on_train_start(NS(state=NS(consumed_samples=8), step_batch=4))
    cb.on_validation(0, {"web": {"val_loss": 3.0}, "code": {"val_loss": 3.0}})   # step 0: no update
    assert ds.history == [] and ds.mixing_state["running_min"] == [3.0, 3.0]
    cb.on_validation(2, {"web": {"val_loss": 2.5}, "code": {"val_loss": 3.4}})
    # excess over each corpus' earlier minimum: (-0.5, 0.4) -> clipped (0, 0.4); no workers: P = 8.
    a = np.array([0.5, 0.5 * np.exp(2.0 * 0.4)])
    np.testing.assert_allclose(ds.weights_at(8), a / a.sum(), rtol=1e-15)
    assert ds.history[0][0] == 8 and ds.mixing_state["running_min"] == [2.5, 3.0]
    assert events[0]["from_sample"] == 8 and events[0]["excess_loss/code"] == pytest.approx(0.4)
    scalars = cb.log_scalars()   # the step [4, 8) was drawn with the initial weights
    assert scalars["data_weight/web"] == 0.5 and \
        scalars["consumed_tokens/web"] + scalars["consumed_tokens/code"] == 8 * 4
    # Stage bounds by corpus name, and an unknown name refused naming the file and the stage.
    y = tmp_path / "stages.yaml"
    y.write_text("- {until_tokens: 64, weights: [0.9, 0.1], bounds: {code: [0.3, 1]}}\n"
                 "- {until_tokens: 128, weights: [0.9, 0.1]}\n")
    b = load_stage_bounds(str(y), ["web", "code"])
    assert b[1] is None and b[0][0].tolist() == [0.0, 0.3]
    y.write_text("- {until_tokens: 64, weights: [0.9, 0.1], bounds: {wiki: [0.3, 1]}}\n")
    with pytest.raises(ValueError, match="stage 0: bounds 'wiki:0.3:1': unknown corpus 'wiki'"):
        load_stage_bounds(str(y), ["web", "code"])


# ----------------------------------------------------------------------------- unit: errors
def _parse(extra, tmp_path):
    from megatron_lite.config import parse_args
    from megatron_lite.config.checks import check_input_paths

    extra = [str(tmp_path / "web") if x == "V" else x for x in extra]
    for name in ("web", "code"):
        p = tmp_path / f"{name}"
        if not (tmp_path / f"{name}.bin").exists():
            make_corpus(str(p), 0, 1)
    cfg = parse_args(["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "32",
                      "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
                      "--device", "cpu", "--eval-interval", "2",
                      "--data-path", "0.5", str(tmp_path / "web"), "0.5", str(tmp_path / "code")] + extra)
    check_input_paths(cfg)
    return cfg


@pytest.mark.parametrize("extra,match", [
    (["--data-share-bounds", "wiki:0:0.5"], r"^--data-share-bounds 'wiki:0:0.5': unknown corpus 'wiki'"),
    (["--data-share-bounds", "web:0.6:1", "code:0.5:1"], r"^--data-share-bounds: lower bounds sum to 1.1 > 1"),
    (["--data-share-bounds", "web:0:0.4", "code:0:0.5"], r"^--data-share-bounds: upper bounds sum to 0.9 < 1"),
    (["--data-share-bounds", "web:0:1.5"], r"^--data-share-bounds 'web:0:1.5': bounds must satisfy"),
    (["--data-max-epochs", "0"], r"--data-max-epochs must be >= 1"),
    (["--mixing-update", "online", "--mixing-update-interval", "3"], r"^--mixing-update-interval 3"),
    (["--mixing-update", "online", "--mixing-reference", "/nonexistent.json"], r"^--mixing-reference"),
    (["--mixing-update", "online", "--valid-data-path", "V"], r"^--mixing-update online: train corpora"),
])
def test_one_line_config_errors(tmp_path, extra, match):
    from megatron_lite.errors import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        _parse(extra, tmp_path)
    assert "\n" not in str(e.value)


def test_bound_infeasible_with_max_epochs(tmp_path):
    from megatron_lite.data.builder import build_train_valid_test_datasets
    from megatron_lite.errors import ConfigError

    cfg = _parse(["--data-max-epochs", "1", "--data-share-bounds", "code:0.9:1"], tmp_path)
    cfg.data.data_cache_path = str(tmp_path / "cache")
    # Each corpus holds ~300 samples of 32 tokens per epoch: 0.9 x 2000 samples cannot come from code.
    with pytest.raises(ConfigError, match=r"^--data-share-bounds code: lower bound 0.9 needs 1800 of 2000"):
        build_train_valid_test_datasets(cfg.data, 32, (2000, 0, 0), 1, None)
    with pytest.raises(ConfigError, match=r"^--data-max-epochs 1: the corpora give"):
        cfg.data.data_share_bounds = None
        build_train_valid_test_datasets(cfg.data, 32, (2000, 0, 0), 1, None)


def test_max_epochs_on_real_corpora_concat_and_best_fit(tmp_path):
    from megatron_lite.data.builder import build_train_valid_test_datasets

    cfg = _parse(["--data-max-epochs", "1"], tmp_path)
    dc = cfg.data
    dc.data_path = ["0.9", str(tmp_path / "web"), "0.1", str(tmp_path / "code")]
    dc.data_cache_path = str(tmp_path / "cache")
    for packing in ("concat", "best-fit"):
        dc.packing = packing
        train, _, _ = build_train_valid_test_datasets(dc, 32, (500, 0, 0), 1, None)
        web = train.datasets[0]
        epoch = web.samples_per_epoch if packing == "concat" else web.epoch_samples[0]
        assert train.caps[0] == epoch < 450      # 0.9 x 500 would need more than one epoch of web
        di, dsi = train.dataset_index, train.dataset_sample_index
        assert (di == 0).sum() == epoch and (di == 1).sum() == 500 - epoch
        assert sorted(dsi[di == 0].tolist()) == list(range(epoch))   # each web sample once
        # After web's last sample only code is drawn (its weight took web's share).
        assert (di[int(np.flatnonzero(di == 0)[-1]) + 1:] == 1).all()
        assert "= 1.000 epochs" in train.plan_lines()[1]


# ----------------------------------------------------------------------------- end to end
ARGS = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--num-workers", "1",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--seed", "5",
        "--device", "cpu", "--zero-stage", "1", "--split", "80,20,0",
        "--mixing-update", "online", "--mixing-eta", "30", "--data-share-bounds", "code:0.1:0.9",
        "--data-max-epochs", "3"]


def _driver(root: str) -> None:
    import torch.distributed as dist

    from megatron_lite.config import parse_args
    from megatron_lite.training.callbacks.base import Callback
    from megatron_lite.training.loop import pretrain

    class Tokens(Callback):
        def __init__(self):
            self.steps = {}

        def on_step_begin(self, trainer, step, micro):
            self.steps[step] = [hashlib.sha256(b["tokens"].numpy().tobytes()).hexdigest() + ":" +
                                ",".join(map(str, b["dataset_ids"].tolist() + b["sample_ids"].tolist())) for b in micro]

    a, b = os.path.join(root, "web"), os.path.join(root, "code")
    ref = os.path.join(root, "reference.json")   # code far above its reference: its weight grows
    with open(ref, "w") as f:
        json.dump({"web": 5.0, "code": 4.0}, f)
    data = ["--data-path", "0.5", a, "0.5", b, "--data-cache-path", os.path.join(root, "cache"),
            "--mixing-reference", ref]
    got = {}
    for run, extra in (("full", []), ("part1", ["--exit-interval", "4"]), ("part2", [])):
        save = os.path.join(root, "ck_full" if run == "full" else "ck_part")
        cfg = parse_args(ARGS + data + extra + ["--save", save, "--load", save,
                                                "--metrics-file", os.path.join(root, run + ".jsonl")])
        cb = Tokens()
        pretrain(cfg, callbacks=[cb])
        got[run] = cb.steps
        # The train loader's persistent worker inherited the run lock's descriptor at fork: end it
        # (collect the finished Trainer's loader) before the next run takes the same --save lock.
        gc.collect()
    with open(os.path.join(root, f"tokens_rank{dist.get_rank()}.json"), "w") as f:
        json.dump(got, f)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mixing"))
    make_corpus(os.path.join(root, "web"), 0, 1)
    make_corpus(os.path.join(root, "code"), 1, 3)
    stdout = run_torchrun(__file__, root)
    return root, stdout


def _records(path, kind):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("type") == kind]


@pytest.mark.slow
def test_online_mixing_resume_reads_the_same_samples_bitwise(e2e):
    root, stdout = e2e
    for rank in (0, 1):
        with open(os.path.join(root, f"tokens_rank{rank}.json")) as f:
            got = json.load(f)
        full = got["full"]
        resumed = {**got["part1"], **got["part2"]}
        assert sorted(got["part1"], key=int) == [str(s) for s in range(1, 5)]
        assert sorted(got["part2"], key=int) == [str(s) for s in range(5, 11)]
        assert resumed == full   # every sample's tokens (and source) of every step, every rank
    # The weights moved (online updates happened, after the resume too) and were logged.
    mix_full = _records(os.path.join(root, "full.jsonl"), "mixing")
    mix_part = _records(os.path.join(root, "part1.jsonl"), "mixing") + \
        _records(os.path.join(root, "part2.jsonl"), "mixing")
    assert len(mix_full) >= 3 and mix_full == mix_part
    assert any(r["step"] > 4 for r in mix_part)
    train_full = _records(os.path.join(root, "full.jsonl"), "train")
    train_part = _records(os.path.join(root, "part2.jsonl"), "train")
    weights = [(r["step"], r["data_weight/web"], r["consumed_tokens/code"]) for r in train_full]
    assert weights[4:] == [(r["step"], r["data_weight/web"], r["consumed_tokens/code"]) for r in train_part]
    assert weights[0][1] == 0.5 and min(w for _, w, _ in weights) < 0.5   # code up-weighted
    for r in train_full:   # bounds hold for every weight used; tokens add up
        assert 0.1 - 1e-12 <= r["data_weight/code"] <= 0.9 + 1e-12
        assert r["consumed_tokens/web"] + r["consumed_tokens/code"] == r["consumed_tokens"]
    assert "data plan (train split, " in stdout and "[mixing] step 2:" in stdout


if __name__ == "__main__":
    _driver(sys.argv[1])
