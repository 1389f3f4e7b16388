"""Resume ZeRO-1/2/3 optimizer state at another data-parallel size (training/zero_reshard.py).

Three torchrun launches (this file run as a script, ``phase`` = save | d1 | d2):

* ``save`` (2 processes): for ZeRO-1, -2, -3 at TP=1, D=2 an uninterrupted 4-step run saving at
  steps 2 and 4; right after the step-2 save it gathers its full optimizer state (the
  reference); the same for a TP=2, D=1 ZeRO-1 run. The ZeRO-2 runs freeze layer 0 and the
  embedding (CPT's --freeze-layers/--freeze-embeddings: 7 of 15 parameters without state).
* ``d1`` (1 process): each TP=1 step-2 checkpoint resumed at D=1 (A doubles: the global batch is
  the same) to step 4, dumping the state right after the load; plus a --no-load-optim resume.
* ``d2`` (4 processes): the TP=2, D=1 checkpoint resumed at TP=2, D=2 (world 2 -> 4).

A DeepSpeed-level test (forked gloo processes, a toy whose parameters all have odd sizes, so
every partition is padded) covers ZeRO-1/2/3 fp32, ZeRO-2/3 bf16 and ZeRO-2/3 with the optimizer
(and at ZeRO-3 the parameters) offloaded to CPU, in both directions.

Right after the load every parameter's fp32 master, exp_avg, exp_avg_sq (gathered with
DeepSpeed's ``safe_get_full_*``) and the step equal the reference bitwise, and the training-dtype
weights equal the masters. The resumed steps' losses equal the uninterrupted run's within 1e-6
relative: only the gradients' reduction order changes (sum over 4 micro-batches in one process
instead of 2 x 2 over two ranks), fp32 rounding of order 1e-7 relative per step; a resume with
fresh Adam moments is off by 1.7e-3 (measured differences: <= 2.3e-8). LR and consumed samples
are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from megatron_lite.config import parse_args
from megatron_lite.checkpoint import compat, layout
from megatron_lite.checkpoint import engine_state as ckpt
from tests.dist_utils import read_metrics, run_torchrun
from tests.test_training import COMMON, make_dataset

STAGES = ("1", "2", "3")
REL_TOL = 1e-6


def _argv(root: str, name: str, *extra: str) -> list[str]:
    return COMMON + ["--data-path", os.path.join(root, "data"), "--train-iters", "4",
                     "--metrics-file", os.path.join(root, name + ".jsonl"), *extra]


def _runs(root: str, phase: str) -> list[tuple[str, list[str], str | None]]:
    """(name, argv, dump folder or None) of the runs of one launch, in order."""
    ck = lambda s: os.path.join(root, f"ck_{s}")           # noqa: E731
    it2 = lambda s: os.path.join(ck(s), "iter_0000002")     # noqa: E731
    dump = lambda n: os.path.join(root, "dump", n)          # noqa: E731
    if phase == "save":
        runs = [(f"u{s}", _argv(root, f"u{s}", "--zero-stage", s, "--save", ck(s),
                                "--save-interval", "2"), dump(f"ref{s}")) for s in STAGES]
        return runs + [("utp", _argv(root, "utp", "--tp", "2", "--zero-stage", "1", "--save",
                                     ck("tp"), "--save-interval", "2"), dump("reftp"))]
    if phase == "d1":
        runs = [(f"r{s}", _argv(root, f"r{s}", "--zero-stage", s, "--load", it2(s)), dump(f"r{s}"))
                for s in STAGES]
        runs.append(("fresh", _argv(root, "fresh", "--zero-stage", "1", "--load", it2("1"),
                                    "--no-load-optim"), None))
        # weights only (--no-load-optim) at ZeRO-3, and across stages 3 -> 1 and 1 -> 3
        for name, stage, src in (("w33", "3", "3"), ("w31", "1", "3"), ("w13", "3", "1")):
            runs.append((name, _argv(root, name, "--zero-stage", stage, "--load", it2(src),
                                     "--no-load-optim"), None))
        return runs
    return [("rtp", _argv(root, "rtp", "--tp", "2", "--zero-stage", "1", "--load", it2("tp")),
             dump("rtp"))]


def _freeze(model, cfg) -> None:
    for n, p in model.named_parameters():
        if n.startswith(("layers.0.", "embedding.")):
            p.requires_grad_(False)


def _driver(root: str, phase: str) -> None:
    """Body of a torchrun launch: the runs of :func:`_runs` in one process group."""
    from megatron_lite.training.loop import pretrain
    from megatron_lite.checkpoint.zero_reshard import dump_full_state
    from megatron_lite.testing import faults

    results = {}
    save = ckpt.save_checkpoint
    for name, argv, dump in _runs(root, phase):
        os.environ.pop("MEGATRON_LITE_DUMP_OPTIM_STATE", None)
        if dump and phase == "save":   # the reference: the saving run's state at step 2
            def save_and_dump(engine, cfg, state, scheduler, save_dir, _dump=dump, **kw):
                final = save(engine, cfg, state, scheduler, save_dir, **kw)
                if state.iteration == 2:
                    dump_full_state(engine, _dump, os.path.basename(final))
                return final

            ckpt.save_checkpoint = save_and_dump
        elif dump:                     # the resumed run's state right after the load
            os.environ["MEGATRON_LITE_DUMP_OPTIM_STATE"] = dump
        # ZeRO-2 runs freeze layer 0 and the embedding (as cpt_llama.py --freeze-layers does):
        # frozen parameters have no optimizer partitions.
        st = pretrain(parse_args(argv), model_setup=_freeze if name in ("u2", "r2") else None,
                      callbacks=faults.callbacks_from_env())
        ckpt.save_checkpoint = save
        results[name] = {"iteration": st.iteration, "consumed_samples": st.consumed_samples}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, f"results_{phase}.json"), "w") as f:
            json.dump(results, f)


def _dump(root: str, name: str, tp: int = 0) -> dict:
    return torch.load(os.path.join(root, "dump", name, f"iter_0000002_tp{tp}.pt"))


def _assert_same_state(ref: dict, got: dict, what: str) -> None:
    assert ref["step"] == got["step"] == [2.0], (what, ref["step"], got["step"])
    assert ref["model_mismatch"] == got["model_mismatch"] == [], what
    assert ref["params"].keys() == got["params"].keys(), what
    frozen = [n for n in got["params"] if n.startswith(("layers.0.", "embedding."))]
    zero2 = "ZeRO-2" in what       # layer 0 and the embedding frozen: 8 of 15 have state
    assert len(got["params"]) == (8 if zero2 else 15) and not (frozen and zero2), what
    for n, d in ref["params"].items():
        assert set(d) == {"fp32", "exp_avg", "exp_avg_sq"}, (what, n, sorted(d))
        for k, t in d.items():
            assert torch.equal(t, got["params"][n][k]), (what, n, k)
    # the state is not trivially equal: two Adam steps were taken
    assert any(d["exp_avg_sq"].abs().sum() > 0 for d in got["params"].values()), what


def _assert_continues(root: str, uninterrupted: str, resumed: str) -> None:
    u, r = read_metrics(os.path.join(root, uninterrupted + ".jsonl")), \
        read_metrics(os.path.join(root, resumed + ".jsonl"))
    assert sorted(r) == [3, 4], (resumed, sorted(r))
    for step in (3, 4):
        assert r[step]["lr"] == u[step]["lr"], (resumed, step)
        assert r[step]["consumed_samples"] == u[step]["consumed_samples"], (resumed, step)
        assert r[step]["loss"] == pytest.approx(u[step]["loss"], rel=REL_TOL, abs=0), \
            (resumed, step, r[step]["loss"], u[step]["loss"])


@pytest.fixture
def scratch():
    """A folder made with tempfile, not under pytest's basetemp: concurrent pytest sessions of one
    user prune each other's older basetemp folders (see tests/test_convert_checkpoint.py)."""
    root = tempfile.mkdtemp(prefix="zero_reshard_")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_resume_at_other_dp_size_restores_optimizer_state(scratch):
    root = scratch
    make_dataset(os.path.join(root, "data"))
    run_torchrun(__file__, root, "save", nproc=2)
    # The two resume launches only read the saved folders: run them side by side (their
    # start-up, mostly imports, overlaps).
    with ThreadPoolExecutor(2) as pool:
        for job in [pool.submit(run_torchrun, __file__, root, "d1", nproc=1),
                    pool.submit(run_torchrun, __file__, root, "d2", nproc=4)]:
            job.result()
    res = {}
    for phase in ("save", "d1", "d2"):
        with open(os.path.join(root, f"results_{phase}.json")) as f:
            res.update(json.load(f))
    for s in STAGES:                                      # D=2 -> D=1, ZeRO-1/2/3
        ts = json.load(open(os.path.join(root, f"ck_{s}", "iter_0000002", "trainer_state.json")))
        assert ts["data_parallel_size"] == 2 and ts["zero_stage"] == int(s)
        _assert_same_state(_dump(root, f"ref{s}"), _dump(root, f"r{s}"), f"ZeRO-{s} D2->D1")
        _assert_continues(root, f"u{s}", f"r{s}")
        assert res[f"r{s}"] == res[f"u{s}"] == {"iteration": 4, "consumed_samples": 16}
    for tp in (0, 1):                                     # TP=2: D=1 -> D=2 (world 2 -> 4)
        _assert_same_state(_dump(root, "reftp", tp), _dump(root, "rtp", tp), f"TP2 tp{tp} D1->D2")
    _assert_continues(root, "utp", "rtp")
    assert res["rtp"] == res["utp"] == {"iteration": 4, "consumed_samples": 16}
    # Fresh Adam moments (--no-load-optim) move the loss far outside the tolerance used above.
    u = read_metrics(os.path.join(root, "u1.jsonl"))
    fresh = read_metrics(os.path.join(root, "fresh.jsonl"))
    assert abs(fresh[4]["loss"] - u[4]["loss"]) > 50 * REL_TOL * abs(u[4]["loss"])
    # --no-load-optim keeps the weights whatever the stages: step 3's loss (its forward runs on
    # the loaded weights, before any update) is the uninterrupted run's. DeepSpeed's module-only
    # load gave other weights at ZeRO-3 and asserted across stages.
    for name, src in (("w33", "3"), ("w31", "3"), ("w13", "1")):
        u = read_metrics(os.path.join(root, f"u{src}.jsonl"))
        w = read_metrics(os.path.join(root, name + ".jsonl"))
        assert w[3]["loss"] == pytest.approx(u[3]["loss"], rel=REL_TOL, abs=0), (name, w[3], u[3])
        assert res[name] == {"iteration": 4, "consumed_samples": 16}, name


# ----------------------------------------------------------- DeepSpeed-level, odd-sized params
# (stage, bf16, offload): "opt" = optimizer on CPU (ZeRO-Offload), "all" = also the parameters;
# "lion" = lion-pytorch's Lion (state: exp_avg only, no step count) instead of torch AdamW
TOY_CASES = ((1, False, ""), (2, False, ""), (3, False, ""), (2, True, ""), (3, True, ""),
             (2, False, "opt"), (3, False, "all"), (1, False, "lion"), (3, False, "lion"))


def _toy_engine(stage: int, seed: int, bf16: bool = False, offload: str = ""):
    """A 2-layer toy under ZeRO-``stage`` over all ranks: every parameter's numel is odd (15, 3,
    21, 7), so DeepSpeed pads (stage 1/2: per-parameter alignment to 4 fp32 / 8 bf16 elements
    and the tail; stage 3: the last chunk of each parameter)."""
    import deepspeed

    from megatron_lite import parallel as ps
    from megatron_lite.parallel import mpu
    from megatron_lite.training.deepspeed_engine import skip_cpu_shm_comm_op

    skip_cpu_shm_comm_op()
    os.environ.setdefault("LOCAL_RANK", str(torch.distributed.get_rank()))   # DeepSpeed checks it
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 7))
    if offload == "lion":
        from lion_pytorch import Lion

        opt, offload = Lion(model.parameters(), lr=1e-3), ""
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, mpu=mpu, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": zero, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31 - 1, "bf16": {"enabled": bf16}}, dist_init_required=False)
    opt = engine.optimizer   # offload really on (stage 1/2: cpu_offload; 3: offload_optimizer)
    assert bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)) \
        == bool(offload)
    return engine


def _toy_job(rank: int, world: int, root: str, load_from: int | None, save: bool) -> None:
    """Per stage: optionally reshard the toy checkpoint saved at D=``load_from`` into this D and
    dump its state; optionally train 2 steps and save at this D (dumping the reference)."""
    from megatron_lite.checkpoint.zero_reshard import (dump_full_state, read_full_state,
                                                     write_full_state)

    for stage, bf16, offload in TOY_CASES:
        c = f"s{stage}{'_bf16' * bf16}{offload}"
        if load_from is not None:
            engine = _toy_engine(stage, 99, bf16, offload)   # other initial weights: overwritten
            ck = os.path.join(root, f"{c}_d{load_from}", "t")
            write_full_state(engine, read_full_state(ck, stage, load_from, 0), ck)
            dump_full_state(engine, os.path.join(root, f"got_{c}_d{load_from}to{world}"), "t")
        if save:
            engine = _toy_engine(stage, 0, bf16, offload)
            for i in range(2):
                x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 * i + rank))
                engine.backward(engine(x.to(torch.bfloat16 if bf16 else torch.float32))
                                .float().pow(2).mean())
                engine.step()
            engine.save_checkpoint(os.path.join(root, f"{c}_d{world}"), tag="t")
            dump_full_state(engine, os.path.join(root, f"ref_{c}_d{world}"), "t")


def test_odd_sized_parameters_reshard_exactly(scratch):
    """D=2 -> 1 and D=1 -> 2 at ZeRO-1/2/3 fp32, ZeRO-2/3 bf16 and ZeRO-2/3 with CPU offload, all
    with padded partitions (forked gloo processes): the state read back with DeepSpeed's
    safe_get_full_* equals the saving engine's bitwise."""
    import importlib

    from tests.dist_utils import spawn

    # Import once here what every forked child would otherwise import on its own (~10 s each on
    # 2 cores): torch._dynamo (an optimizer's constructor) and DeepSpeed's engine and ZeRO.
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    for m in ("deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2",
              "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.muon.muon_optimizer"):
        importlib.import_module(m)
    root = scratch
    spawn(_toy_job, 2, root, None, True)      # save at D=2
    spawn(_toy_job, 1, root, 2, True)         # D=2 -> D=1; save at D=1
    spawn(_toy_job, 2, root, 1, False)        # D=1 -> D=2
    saved = os.listdir(os.path.join(root, "s2_bf16_d2", "t"))
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in saved, saved   # bf16 file name
    for stage, bf16, offload in TOY_CASES:
        c = f"s{stage}{'_bf16' * bf16}{offload}"
        for a, b in ((2, 1), (1, 2)):
            ref = torch.load(os.path.join(root, f"ref_{c}_d{a}", "t_tp0.pt"))
            got = torch.load(os.path.join(root, f"got_{c}_d{a}to{b}", "t_tp0.pt"))
            lion = offload == "lion"
            assert ref["step"] == got["step"] == ([] if lion else [2.0]), (c, a, b)
            assert ref["params"].keys() == got["params"].keys() == {"0.weight", "0.bias",
                                                                    "1.weight", "1.bias"}
            for n, d in ref["params"].items():
                assert set(d) == {"fp32", "exp_avg"} | (set() if lion else {"exp_avg_sq"})
                for k, t in d.items():
                    assert torch.equal(t, got["params"][n][k]), (c, a, b, n, k)


def _fake(tmp_path, stage: int, dp: int = 2) -> str:
    d = os.path.join(str(tmp_path), layout.tag_for(3))
    os.makedirs(d)
    saved = parse_args(COMMON + ["--data-path", "x", "--zero-stage", str(stage)], world_size=dp)
    with open(os.path.join(d, "run_config.json"), "w") as f:
        json.dump({"config": saved.to_dict()}, f)
    with open(os.path.join(d, "trainer_state.json"), "w") as f:
        json.dump({"zero_stage": stage, "data_parallel_size": dp, "world_size": dp}, f)
    layout.write_manifest(d)
    return d


@pytest.mark.parametrize("flags,match", [
    (["--zero-stage", "2"], r"saved at D=2, this run has D=1 and --zero-stage 2: resharding keeps "
                            r"the stage; resume with --zero-stage 1 or pass --no-load-optim"),
    (["--zero-stage", "1", "--optimizer", "adafactor"],
     r"supports --optimizer adamw/lion, not adafactor .*pass --no-load-optim"),
    (["--zero-stage", "1", "fp16"], r"an --fp16 run is not supported \(untested\); pass "
                                    r"--no-load-optim"),
])
def test_unsupported_reshard_is_refused_in_one_line(tmp_path, flags, match):
    from megatron_lite.training.step import TrainState

    _fake(tmp_path, 1)
    fp16 = "fp16" in flags       # --fp16 is refused on CPU by parse_args: set it afterwards
    now = parse_args(COMMON + ["--data-path", "x", "--load", str(tmp_path),
                               *[f for f in flags if f != "fp16"]], world_size=1)
    if fp16:
        now.derived.precision = "fp16"
    with pytest.raises(ValueError, match=match) as e:
        ckpt.load_checkpoint(None, now, TrainState(), None)
    assert "\n" not in str(e.value)


def test_changed_frozen_set_is_refused_before_loading_optimizer_state():
    from types import SimpleNamespace

    now = SimpleNamespace(cpt=SimpleNamespace(freeze_layers="0-1", freeze_embeddings=False))
    compat.check_same_frozen_set({"cpt": {"freeze_layers": "0-1"}}, now, "ck")   # same: fine
    with pytest.raises(ValueError, match=r"^ck: the frozen parameters differ from the "
                       r"checkpoint's \(--freeze-layers: checkpoint '0-0', this run '0-1'\), .*"
                       r"pass --no-load-optim$"):
        compat.check_same_frozen_set({"cpt": {"freeze_layers": "0-0"}}, now, "ck")


def test_missing_saved_partition_is_named(tmp_path):
    """read_full_state names the saved DP rank file that is missing."""
    from megatron_lite.checkpoint.zero_reshard import read_full_state

    d = _fake(tmp_path, 1)
    shapes = [{"a": torch.Size([3, 2]), "b": torch.Size([5])}]
    torch.save({"param_shapes": shapes, "ds_config": {}},
               os.path.join(d, "mp_rank_00_model_states.pt"))
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        read_full_state(d, 1, 2, 0)


def test_stage12_and_stage3_layouts_hand_built(tmp_path):
    """Partitions laid out by hand as DeepSpeed documents them (stage 1/2: one flat group with
    per-parameter alignment padding and tail padding, split in equal slices; stage 3: each
    parameter split in ceil(numel/D) chunks) are cut back into the original tensors."""
    from megatron_lite.checkpoint.zero_reshard import read_full_state

    a = torch.arange(6, dtype=torch.float32).view(3, 2)
    b = torch.arange(100, 105, dtype=torch.float32)
    shapes = [{"a": a.shape, "b": b.shape}]
    for stage in (1, 3):
        d = os.path.join(str(tmp_path), f"s{stage}")
        os.makedirs(d)
        ms = {"param_shapes": shapes, "ds_config": {}, "global_steps": 7}
        name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else \
            "mp_rank_00_model_states.pt"
        torch.save(ms, os.path.join(d, name))
        if stage == 1:
            # a (6) + 2 alignment zeros + b (5) = 13, tail-padded to 16, D=2 -> slices of 8
            flat = torch.cat([a.flatten(), torch.zeros(2), b, torch.zeros(3)])
            for r in range(2):
                part = flat[8 * r:8 * (r + 1)]
                pad = 3 if r == 1 else 0
                sd = {"single_partition_of_fp32_groups": [part[:8 - pad].clone()],
                      "group_paddings": [pad], "param_alignment_paddings": [[2, 0]],
                      "partition_count": [2], "loss_scaler": None,
                      "base_optimizer_state": {"state": {0: {"step": torch.tensor(4.0),
                                                             "exp_avg": -part.clone()}},
                                               "param_groups": []}}
                torch.save({"optimizer_state_dict": sd},
                           os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        else:
            # a: chunks of 3 (rank 0: 0..2, rank 1: 3..5); b: chunks of 3 (rank 1: 103, 104, 0)
            for r in range(2):
                fa = a.flatten()[3 * r:3 * r + 3]
                fb = torch.cat([b, torch.zeros(1)])[3 * r:3 * r + 3]
                flat = torch.cat([fa, fb])
                sd = {"fp32_flat_groups": [flat[:4].clone(), flat[4:].clone()],
                      "partition_count": 2, "loss_scaler": None,
                      "optimizer_state_dict": {"state": {
                          0: {"step": torch.tensor(4.0), "exp_avg": -flat[:4].clone()},
                          1: {"step": torch.tensor(4.0), "exp_avg": -flat[4:].clone()}}}}
                torch.save({"optimizer_state_dict": sd},
                           os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        full = read_full_state(d, stage, 2, 0)
        assert torch.equal(full["params"]["a"]["fp32"], a), stage
        assert torch.equal(full["params"]["b"]["fp32"], b), stage
        assert torch.equal(full["params"]["a"]["exp_avg"], -a), stage
        assert torch.equal(full["params"]["b"]["exp_avg"], -b), stage
        assert float(full["scalars"]["step"]) == 4.0 and full["engine"]["global_steps"] == 7


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2])
