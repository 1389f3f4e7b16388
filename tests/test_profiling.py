"""Profiling and the step-time breakdown: ``--profile`` traces (2 ranks, gloo, DeepSpeed ZeRO-1),
the breakdown's parts against the measured step time, TP communication at TP=2 and none at TP=1,
the profiling flags' checks, and (GPU) the CUDA memory snapshot.

The two end-to-end runs share ONE torchrun launch (this file run as a script; fixture ``prof_e2e``).
"""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch

from megatron_lite.errors import ConfigError
from tests.dist_utils import read_metrics, run_torchrun
from tests.test_training import COMMON, make_dataset

ITERS = 6
PARTS = ("data_wait_s", "forward_s", "backward_s", "tp_comm_s", "dp_comm_s", "optimizer_step_s")


def runs_spec(root: str) -> dict:
    """name -> argv of the end-to-end runs (TP=2 profiled on both ranks; TP=1, D=2)."""
    base = list(COMMON)
    base[base.index("--train-iters") + 1] = str(ITERS)
    base[base.index("--log-interval") + 1] = "2"
    base += ["--data-path", os.path.join(root, "data"), "--zero-stage", "1"]

    def r(name, *extra):
        return name, base + ["--save", os.path.join(root, name), "--save-interval", "4",
                             *extra]

    return dict([
        r("tp2", "--tensor-model-parallel-size", "2", "--profile", "--profile-step-start", "2",
          "--profile-step-end", "3", "--profile-ranks", "0,1"),
        r("tp1"),
    ])


def _driver(root: str) -> None:
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    for argv in runs_spec(root).values():
        pretrain(parse_args(argv))


@pytest.fixture(scope="module")
def prof_e2e(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prof_e2e"))
    make_dataset(os.path.join(root, "data"))
    stdout = run_torchrun(__file__, root)
    return root, stdout


def test_trace_per_rank_is_valid_json_with_the_phases(prof_e2e):
    root, stdout = prof_e2e
    for rank in (0, 1):
        with open(os.path.join(root, "tp2", "profile", f"trace_rank{rank}.json")) as f:
            trace = json.load(f)
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"ProfilerStep#2", "ProfilerStep#3", "forward", "backward", "optimizer"} <= names
        assert "ProfilerStep#4" not in names and "ProfilerStep#1" not in names
        tb = glob.glob(os.path.join(root, "tp2", "profile", "tensorboard",
                                    f"rank{rank}.*.pt.trace.json"))
        assert len(tb) == 1
        json.load(open(tb[0]))
        assert f"[profile] rank {rank}: steps 2..3 -> " in stdout
    assert not os.path.exists(os.path.join(root, "tp1", "profile"))


def test_breakdown_sums_to_step_time_and_tp_comm(prof_e2e):
    root, _ = prof_e2e
    for name in ("tp2", "tp1"):
        recs = read_metrics(os.path.join(root, name, "metrics.jsonl"))
        assert sorted(recs) == [2, 4, 6]
        # Over the run's records (a single 2-step interval of a ~0.2 s step on a loaded 2-core
        # machine can lose a preempted 20 ms to "other").
        parts = sum(r[k] for r in recs.values() for k in PARTS)
        total = sum(r["step_time_s"] for r in recs.values())
        assert abs(parts - total) <= 0.10 * total, (name, parts, total, recs)
        for step, r in recs.items():
            assert all(r[k] >= 0 for k in PARTS), (name, step, r)
            assert abs(sum(r[k] for k in PARTS) + r["other_s"] - r["step_time_s"]) < 1e-9
            if name == "tp2":
                assert r["tp_comm_s"] > 0, r
            else:
                assert r["tp_comm_s"] == 0 and r["dp_comm_s"] > 0, r
        # The save after step 4 is outside the step time, in the next record's checkpoint_s.
        assert recs[2]["checkpoint_s"] == 0 and recs[6]["checkpoint_s"] > 0


def test_breakdown_from_timers_and_console_levels(tmp_path):
    """Fake clock: forward 0.25 s of which 0.125 s TP collective, backward 0.375 s, optimizer
    0.125 s of which 0.0625 s DeepSpeed collective; the level-1 line is the one of before."""
    from megatron_lite.parallel import comm_timer
    from megatron_lite.training import timers as T
    from tests.test_metrics import FakeClock, _make

    def collective(kind, seconds):   # a collective of `seconds` on the fake clock
        clock.advance(seconds)
        comm_timer.add(kind, seconds)

    for level in (1, 2):
        clock, lines = FakeClock(), []
        logger = _make(tmp_path / str(level), clock, lines, log_interval=1,
                       timing_log_level=level)
        t = logger.timers
        with t.time(T.DATA_WAIT):
            clock.advance(0.125)
        with t.time(T.FORWARD_BACKWARD):
            with t.time(T.FORWARD):
                clock.advance(0.125)
                collective(comm_timer.TP, 0.125)
            with t.time(T.BACKWARD):
                clock.advance(0.375)
        with t.time(T.OPTIMIZER):
            clock.advance(0.0625)
            collective(comm_timer.DP, 0.0625)
        clock.advance(0.125)   # outside every timer: "other"
        r = logger.log_step(1, {"lr": 1e-3, "loss": 2.0, "consumed_samples": 4,
                                "consumed_tokens": 1000})
        assert (r["step_time_s"], r["forward_backward_s"], r["optimizer_s"]) == (1.0, 0.625, 0.125)
        assert (r["data_wait_s"], r["forward_s"], r["backward_s"], r["tp_comm_s"],
                r["dp_comm_s"], r["optimizer_step_s"], r["other_s"], r["checkpoint_s"]) == \
            (0.125, 0.125, 0.375, 0.125, 0.0625, 0.0625, 0.125, 0.0)
        assert ("breakdown (ms): data wait 125.0, forward 125.0, backward 375.0, TP comm 125.0, "
                "DP comm 62.5, optimizer 62.5, other 125.0, checkpoint 0.0" in lines[-1]) == \
            (level == 2)
        assert "other timers" not in lines[-1]
        logger.close()
    comm_timer.set_synchronize(False)


def _parse(*extra):
    from megatron_lite.config import parse_args

    argv = ["--model-size", "tiny", "--vocab-size", "128", "--seq-length", "16",
            "--train-iters", "4", "--global-batch-size", "2", "--micro-batch-size", "1",
            "--device", "cpu", *extra]
    return parse_args(argv)


@pytest.mark.parametrize("extra,flag", [
    (["--profile", "--profile-step-start", "0"], "--profile-step-start"),
    (["--profile", "--profile-step-start", "3", "--profile-step-end", "2"], "--profile-step-end"),
    (["--profile", "--profile-ranks", "0,1"], "--profile-ranks"),
    (["--profile", "--profile-ranks", "a"], "--profile-ranks"),
    (["--memory-snapshot"], "--memory-snapshot"),
    (["--profile", "--memory-snapshot"], "--memory-snapshot"),
])
def test_profiling_flag_checks(extra, flag):
    with pytest.raises(ConfigError) as e:
        _parse(*extra)
    msg = str(e.value)
    assert flag in msg and "\n" not in msg


def test_memory_snapshot_refused_on_cpu_with_one_line():
    with pytest.raises(ConfigError, match="needs a GPU"):
        _parse("--profile", "--memory-snapshot")
    cfg = _parse("--profile", "--profile-step-start", "2", "--profile-step-end", "2")
    assert (cfg.logging.profile_step_start, cfg.logging.profile_step_end) == (2, 2)


@pytest.mark.gpu
def test_cuda_memory_snapshot(tmp_path):
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    make_dataset(str(tmp_path / "data"))
    argv = list(COMMON)
    argv[argv.index("--device") + 1] = "cuda"
    argv += ["--data-path", str(tmp_path / "data"), "--save", str(tmp_path / "run"),
             "--profile", "--profile-step-start", "2", "--profile-step-end", "3",
             "--memory-snapshot"]
    pretrain(parse_args(argv))
    prof = tmp_path / "run" / "profile"
    assert (prof / "memory_snapshot_rank0.pickle").stat().st_size > 0
    names = {e.get("name") for e in json.load(open(prof / "trace_rank0.json"))["traceEvents"]}
    assert {"ProfilerStep#2", "forward", "backward", "optimizer"} <= names
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # torchrun entry of the prof_e2e fixture
    _driver(sys.argv[1])
