"""Fast checks of the hang and node-loss machinery (the end-to-end runs are in
tests/faults/test_multinode.py): the collective tracker, the watchdog's limit and reports, the
lost-peer classification, the flag check."""

from __future__ import annotations

import json
import os
import time

import pytest

from megatron_lite.config import ConfigError, parse_args
from megatron_lite.parallel import comm_timer, peers
from megatron_lite.training.callbacks import stall_watchdog as sw

BASE = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
        "--micro-batch-size", "1", "--train-iters", "10", "--device", "cpu"]


def _tp_all_reduce():
    t0 = comm_timer.begin()
    inside = comm_timer.last_collective()
    comm_timer.end(comm_timer.TP, t0)
    return inside


def test_tracker_names_the_collective_and_marks_its_return():
    before = comm_timer.last_collective()["seq"]
    inside = _tp_all_reduce()
    assert inside["name"] == "test_stall_watchdog._tp_all_reduce"
    assert inside["returned"] is None and inside["seq"] == before + 1
    after = comm_timer.last_collective()
    assert after["kind"] == "tp" and after["returned"] >= after["entered"]
    with comm_timer.timed(comm_timer.DP, "loss all-reduce"):
        assert comm_timer.last_collective()["name"] == "loss all-reduce [dp]"
    assert comm_timer.last_collective()["seq"] == before + 2


def test_stall_timeout_flag_is_checked():
    assert parse_args(BASE).parallel.stall_timeout_seconds is None
    assert parse_args(BASE + ["--stall-timeout-seconds", "0"]).parallel.stall_timeout_seconds == 0
    with pytest.raises(ConfigError, match=r"--stall-timeout-seconds must be >= 0 seconds"):
        parse_args(BASE + ["--stall-timeout-seconds", "-1"])


def test_automatic_limit_follows_the_slowest_step(tmp_path):
    w = sw.StallWatchdog(None, str(tmp_path), 0, 1)
    assert w.limit() == sw.AUTO_FLOOR_S                         # nothing measured yet
    w.slowest = 100.0
    assert w.limit() == 1000.0                                  # 10 x the slowest interval
    assert sw.StallWatchdog(4, None, 0, 1).limit() == 4.0       # explicit
    cfg = parse_args(BASE + ["--stall-timeout-seconds", "0"])
    assert sw.StallWatchdog.from_config(cfg, 0, 1) is None      # 0 = off


def _report(folder, rank, waiting: bool, now: float):
    last = {"seq": 7, "name": "step._global_loss_tokens [dp]", "kind": None if waiting else "dp",
            "entered": now - 5.0, "returned": None if waiting else now - 4.5}
    rep = {"rank": rank, "host": "node0", "pid": 1, "step": 3, "stalled_s": 5.0, "limit_s": 4.0,
           "now": now, "last_collective": last, "frame": "faults.py:1 in on_step_begin"}
    with open(os.path.join(folder, f"rank_{rank}.txt"), "w") as f:
        f.write(sw.HEADER + json.dumps(rep) + "\nThread 0x1 (most recent call first):\n")


def test_reports_describe_each_rank_and_name_the_stuck_one(tmp_path):
    now = time.time()
    _report(tmp_path, 0, waiting=False, now=now)
    _report(tmp_path, 1, waiting=True, now=now)
    reps = sw.read_reports(str(tmp_path), 3, since=now - 60)
    assert sorted(reps) == [0, 1]
    assert sw.describe(reps[1]) == ("rank 1 (node0): step 3, waiting in "
                                    "step._global_loss_tokens [dp] for 5.0 s, at faults.py:1 in "
                                    "on_step_begin")
    assert "not in a collective (last: step._global_loss_tokens [dp], returned 4.5 s before)" \
        in sw.describe(reps[0])
    # rank 2 wrote nothing (dead, or its watchdog could not run): a suspect too
    assert sw.verdict(reps, 3) == ("stuck: rank(s) 0,2 (outside any collective or no report) "
                                   "while rank(s) 1 wait in a collective")
    assert sw.read_reports(str(tmp_path), 3, since=now + 60) == {}   # an older attempt's files


def test_lost_peer_errors_are_recognised():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                        "by peer [10.213.0.2]:14540. This is typically caused by a remote worker "
                        "crashing.")
    assert peers.is_lost_peer_error(gloo)
    assert not peers.is_lost_peer_error(RuntimeError("CUDA out of memory"))
    assert not peers.is_lost_peer_error(ValueError("Connection closed by peer"))
    # no process group in this process: nothing to name, the caller re-raises
    assert peers.lost_peer_message(gloo) is None
