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
        for step, r in recs.items():
            parts = sum(r[k] for k in PARTS)
            assert all(r[k] >= 0 for k in PARTS), (name, step, r)
            assert abs(parts - r["step_time_s"]) <= 0.10 * r["step_time_s"], (name, step, r)
            assert abs(parts + r["other_s"] - r["step_time_s"]) < 1e-9
            if name == "tp2":
                assert r["tp_comm_s"] > 0, r
            else:
                assert r["tp_comm_s"] == 0 and r["dp_comm_s"] > 0, r
        # The save after step 4 is outside the step time, in the next record's checkpoint_s.
        assert recs[2]["checkpoint_s"] == 0 and recs[6]["checkpoint_s"] > 0


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
