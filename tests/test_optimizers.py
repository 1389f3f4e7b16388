"""Optimizers behind --optimizer: one step equals the reference implementation's step (torch
AdamW, lion-pytorch Lion, torch Adafactor used directly), the skip guard leaves parameters and
state untouched for every optimizer, state_dict round trips, the ZeRO/device matrix is enforced,
and end to end (torchrun, 2 ranks, DeepSpeed) Lion and Adafactor at ZeRO-0 and ZeRO-1 resume from a
checkpoint bit for bit (a fresh optimizer state instead would not).

This file is also the torchrun driver of the end-to-end runs shared with tests/test_rampup.py
(session fixture ``dyn``): one launch, every run in one process group.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

from tests.dist_utils import read_metrics, run_torchrun

from megatron_lite.config import ConfigError, parse_args
from megatron_lite.config.checks import check_optimizer
from megatron_lite.training.optimizer import (GuardedAdafactor, GuardedAdamW, SkipGuard,
                                              build_optimizer, param_groups)

TINY = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
        "--micro-batch-size", "1", "--train-iters", "4", "--device", "cpu"]
RAMP_ARGS = ["--rampup-batch-size", "2", "2", "12"]
E2E = TINY[:-4] + ["--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2",
                   "--split", "100,0,0", "--num-workers", "0", "--log-interval", "1",
                   "--eval-interval", "0", "--seed", "7", "--device", "cpu"]


# ----------------------------------------------------------------------------- end-to-end driver
def runs_spec(root: str) -> dict:
    """name -> argv of every end-to-end run (order matters: each *_b resumes its *_a)."""
    data = ["--data-path", os.path.join(root, "data")]

    def r(name, *extra):
        return name, E2E + data + ["--metrics-file", os.path.join(root, name + ".jsonl")] + \
            list(extra)

    ramp = ["--global-batch-size", "8", "--train-iters", "7", "--zero-stage", "1"] + RAMP_ARGS
    runs = [r("ramp", *ramp),
            r("ramp_a", *ramp, "--save", os.path.join(root, "ck_ramp"), "--exit-interval", "3"),
            r("ramp_b", *ramp, "--save", os.path.join(root, "ck_ramp"), "--load",
              os.path.join(root, "ck_ramp")),
            # ZeRO-0 (plain DP, our clipping) and ZeRO-2 (gradients reduced in the backward at
            # the accumulation boundary) must find the same boundaries as A changes.
            r("ramp_z0", *ramp[:-6], "--zero-stage", "0", *RAMP_ARGS),
            r("ramp_z2", *ramp[:-6], "--zero-stage", "2", *RAMP_ARGS)]
    for opt, z in (("lion", 0), ("lion", 1), ("adafactor", 0), ("adafactor", 1)):
        lr = ["--lr", "1e-2", "--min-lr", "1e-3"] if opt == "adafactor" else []
        base = ["--global-batch-size", "4", "--train-iters", "4", "--zero-stage", str(z),
                "--optimizer", opt] + lr
        ck = os.path.join(root, f"ck_{opt}{z}")
        runs += [r(f"{opt}{z}", *base),
                 r(f"{opt}{z}_a", *base, "--save", ck, "--exit-interval", "2"),
                 r(f"{opt}{z}_b", *base, "--load", ck)]
    # A resume that does not restore the optimizer state must differ (the test can fail).
    runs.append(r("lion0_fresh", "--global-batch-size", "4", "--train-iters", "4",
                  "--zero-stage", "0", "--optimizer", "lion", "--load",
                  os.path.join(root, "ck_lion0"), "--no-load-optim"))
    return dict(runs)


def _driver(root: str) -> None:
    from megatron_lite.testing import faults
    from megatron_lite.training.loop import pretrain

    results = {}
    for name, argv in runs_spec(root).items():
        # Each rank appends its sample ids per step (pretrain's MEGATRON_LITE_LOG_SAMPLES hook).
        os.environ["MEGATRON_LITE_LOG_SAMPLES"] = os.path.join(root, "ids") if name == "ramp" \
            else ""
        cfg = parse_args(argv)
        st = pretrain(cfg, callbacks=faults.callbacks_from_env())
        results[name] = {"iteration": st.iteration, "consumed_samples": st.consumed_samples}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="session")
def dyn(tmp_path_factory):
    """Run the shared launch once (test_rampup imports this fixture: a fixed folder lets the
    second copy pytest makes of it reuse the first launch); returns (root, results, stdout)."""
    from tests.test_training import make_dataset

    root = str(tmp_path_factory.getbasetemp() / "dyn_shared")
    done = os.path.join(root, "results.json")
    if os.path.exists(done):
        with open(done) as f, open(os.path.join(root, "stdout.txt")) as g:
            return root, json.load(f), g.read()
    os.makedirs(root, exist_ok=True)
    make_dataset(os.path.join(root, "data"))
    stdout = run_torchrun(__file__, root)
    with open(os.path.join(root, "stdout.txt"), "w") as g:
        g.write(stdout)
    with open(done) as f:
        return root, json.load(f), stdout


# ----------------------------------------------------------------------------- unit: one step
def _problem(seed=0):
    """A 2-layer model with a matrix (decayed) and a bias (not), and fixed gradients."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    grads = [torch.randn_like(p) for p in model.parameters()]
    return model, grads


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def _groups(model):
    return param_groups(model, 0.1)


def _pairs():
    """(ours, reference) factories with identical hyper-parameters."""
    from lion_pytorch import Lion

    from megatron_lite.training.optimizer import _lion_class

    kw_adam = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    kw_lion = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.3)
    kw_ada = dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.1)
    return {
        "adamw": (lambda g: GuardedAdamW(g, **kw_adam), lambda g: torch.optim.AdamW(g, **kw_adam)),
        "lion": (lambda g: _lion_class()(g, **kw_lion), lambda g: Lion(g, **kw_lion)),
        "adafactor": (lambda g: GuardedAdafactor(g, **kw_ada),
                      lambda g: torch.optim.Adafactor(g, **kw_ada)),
    }


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_step_equals_reference(name):
    ours_f, ref_f = _pairs()[name]
    m1, grads = _problem()
    m2 = copy.deepcopy(m1)
    ours, ref = ours_f(_groups(m1)), ref_f(_groups(m2))
    assert isinstance(ours, SkipGuard)
    for step in range(3):       # several steps: the state (momentum, factored moments) matters
        g = [x * (step + 1) for x in grads]
        _set_grads(m1, g)
        _set_grads(m2, g)
        ours.begin_step()
        ours.step()
        ref.step()
        assert not ours.skipped
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(a, b), (name, step)
    # The parameters did move, and the no-decay bias group kept weight_decay 0.
    assert not torch.equal(next(m1.parameters()), next(_problem()[0].parameters()))
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]


def test_lion_hand_step():
    # Lion (Chen et al. 2023, Alg. 2), one step from zero momentum: p <- p(1 - lr wd) - lr sign(
    # (1 - b1) g) ; momentum m <- (1 - b2) g.
    from megatron_lite.training.optimizer import _lion_class

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt = _lion_class()([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1,
                                                    0.5 * 0.95]), rtol=0, atol=1e-7)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.3, -0.1, 0.0]))


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
@pytest.mark.parametrize("how", ["forced", "nan_grad"])
def test_skip_leaves_params_and_state(name, how):
    ours_f, _ = _pairs()[name]
    m, grads = _problem()
    opt = ours_f(_groups(m))
    _set_grads(m, grads)
    opt.begin_step()
    opt.step()                                          # one real step: state exists
    params = [p.detach().clone() for p in m.parameters()]
    state = copy.deepcopy(opt.state_dict())
    bad = [g.clone() for g in grads]
    if how == "nan_grad":
        bad[1][0] = float("nan")
    _set_grads(m, bad)
    opt.begin_step(force_skip=how == "forced")
    assert opt.step() is None and opt.skipped
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    after = opt.state_dict()
    for k, st in state["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][key])), key


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_state_dict_round_trip(name):
    ours_f, _ = _pairs()[name]
    m1, grads = _problem()
    o1 = ours_f(_groups(m1))
    _set_grads(m1, grads)
    o1.begin_step()
    o1.step()
    m2 = copy.deepcopy(m1)
    o2 = ours_f(_groups(m2))
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    for m, o in ((m1, o1), (m2, o2)):
        _set_grads(m, [g * -0.5 for g in grads])
        o.begin_step()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_clip_in_optimizer_for_any_optimizer():
    # ZeRO-0 fp32: the guard computes the global norm and clips before the wrapped update.
    from megatron_lite.training.optimizer import _lion_class

    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])
    opt = _lion_class()([a], clip_grad=1.0, lr=0.1, weight_decay=0.0)
    opt.begin_step()
    opt.step()
    assert opt._global_grad_norm == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6)


def _cpu_adam_built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.exists(os.path.join(_get_build_directory("cpu_adam", False), "cpu_adam.so"))


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_adam_built(), reason="DeepSpeed's cpu_adam op is not built in "
                    "$TORCH_EXTENSIONS_DIR (its JIT build takes 1.5-9 min here, over this file's "
                    "time budget); build it once to run this test")
def test_cpu_adam_step_equals_adamw():
    from megatron_lite.training.optimizer import _guarded
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m1, grads = _problem()
    m2 = copy.deepcopy(m1)
    ours = _guarded(DeepSpeedCPUAdam, "GuardedCPUAdam")(_groups(m1), adamw_mode=True, **kw)
    ref = torch.optim.AdamW(_groups(m2), **kw)
    for step in range(3):
        _set_grads(m1, grads)
        _set_grads(m2, grads)
        ours.begin_step(force_skip=step == 1)     # the middle step is skipped by both
        ours.step()
        if step != 1:
            ref.step()
        for a, b in zip(m1.parameters(), m2.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), step   # AVX kernel: fp32 rounding


# ----------------------------------------------------------------------------- config matrix
def _cfg(*extra, world_size=1):
    return parse_args(TINY + list(extra), world_size=world_size)


def test_build_picks_class_and_hyperparameters():
    from lion_pytorch import Lion

    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel

    model = LlamaModel(ModelConfig(model_size="tiny", vocab_size=256, seq_length=64))
    cfg = _cfg("--optimizer", "lion", "--lr", "1e-4", "--lion-weight-decay", "0.5",
               "--lion-beta2", "0.98")
    opt = build_optimizer(model, cfg, torch.device("cpu"), clip_in_optimizer=True)
    assert isinstance(opt, Lion) and isinstance(opt, SkipGuard) and opt.clip_grad == 1.0
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.5]
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)
    cfg = _cfg("--optimizer", "adafactor", "--lr", "1e-2", "--adafactor-eps2", "2e-3")
    opt = build_optimizer(model, cfg, torch.device("cpu"), clip_in_optimizer=False)
    assert isinstance(opt, torch.optim.Adafactor) and opt.clip_grad == 0.0
    assert opt.param_groups[0]["eps"] == (None, 2e-3)
    opt = build_optimizer(model, _cfg(), torch.device("cpu"), clip_in_optimizer=False)
    assert type(opt) is GuardedAdamW


def test_matrix_refusals():
    from megatron_lite.config.checks import check_runtime

    with pytest.raises(ConfigError, match="cpu_adam .* needs --offload-optimizer"):
        _cfg("--optimizer", "cpu_adam", "--zero-stage", "1")
    with pytest.raises(ConfigError, match="cpu_adam"):
        _cfg("--optimizer", "cpu_adam", "--zero-stage", "0")
    with pytest.raises(ConfigError, match="paged_adamw pages its states .* drop --offload-optimizer"):
        _cfg("--optimizer", "paged_adamw", "--zero-stage", "2", "--offload-optimizer")
    # --device cpu (or --dry-run here): refused when parsed; --device auto: at launch on a CPU
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="paged_adamw .* CUDA only"):
            _cfg("--optimizer", "paged_adamw", "--zero-stage", "1")
        cfg = parse_args(TINY[:-2] + ["--optimizer", "paged_adamw", "--zero-stage", "1"],
                         world_size=1)
        with pytest.raises(ConfigError, match="paged_adamw .* CUDA only"):
            check_runtime(cfg)
    with pytest.raises(ConfigError, match="--lion-beta1"):
        _cfg("--optimizer", "lion", "--lion-beta1", "1.5")
    with pytest.raises(ConfigError, match="--adafactor-beta2-decay must be <= 0"):
        _cfg("--optimizer", "adafactor", "--adafactor-beta2-decay", "0.5")
    ok = _cfg("--optimizer", "cpu_adam", "--zero-stage", "2", "--offload-optimizer")
    check_optimizer(ok)
    with pytest.raises(ConfigError, match="invalid choice"):
        _cfg("--optimizer", "sgd")


def test_plan_names_optimizer():
    from megatron_lite.config import format_plan

    plan = format_plan(_cfg("--optimizer", "adafactor", "--zero-stage", "1"))
    assert "optimizer               : adafactor (torch) relative step --lr" in plan
    assert "unfactored on ZeRO's flat partitions" in plan
    assert "optimizer               : adamw (torch" in format_plan(_cfg())


def test_steps_per_print_always_off(tmp_path):
    import warnings

    from megatron_lite.training.deepspeed_engine import build_ds_config

    js = tmp_path / "ds.json"
    js.write_text('{"steps_per_print": 10, "zero_optimization": {"stage": "auto"}}')
    cfg = _cfg("--deepspeed-config", str(js))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = build_ds_config(cfg)
    assert ds["steps_per_print"] == 2 ** 31 - 1
    assert any("steps_per_print=10 is ignored" in str(x.message) for x in w)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("run", ["lion0", "lion1", "adafactor0", "adafactor1"])
def test_resume_equals_uninterrupted(dyn, run):
    root, results, _ = dyn
    full = read_metrics(os.path.join(root, f"{run}.jsonl"))
    a = read_metrics(os.path.join(root, f"{run}_a.jsonl"))
    b = read_metrics(os.path.join(root, f"{run}_b.jsonl"))
    assert sorted(full) == [1, 2, 3, 4] and sorted(a) == [1, 2] and sorted(b) == [3, 4]
    for step in (1, 2, 3, 4):
        assert (a.get(step) or b[step])["loss"] == full[step]["loss"], (run, step)
    assert full[4]["loss"] < full[1]["loss"]                      # it trains
    assert results[f"{run}_b"]["iteration"] == 4


def test_fresh_optimizer_state_differs(dyn):
    root, _, _ = dyn
    full = read_metrics(os.path.join(root, "lion0.jsonl"))
    fresh = read_metrics(os.path.join(root, "lion0_fresh.jsonl"))
    assert fresh[3]["loss"] == full[3]["loss"]       # same weights at the resume point
    assert fresh[4]["loss"] != full[4]["loss"]       # but no Lion momentum -> another update


def test_e2e_plan_names_the_optimizer(dyn):
    _, _, stdout = dyn
    assert "optimizer               : lion (lion-pytorch) betas (0.9, 0.99)" in stdout
    assert "optimizer               : adafactor (torch) relative step --lr" in stdout
    assert "batch ramp-up           : 2 -> 8 samples by 2 over 12 samples (4 steps)" in stdout


if __name__ == "__main__":
    _driver(sys.argv[1])
