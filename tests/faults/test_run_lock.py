"""One run per ``--save`` folder (megatron_lite/training/run_lock.py, docs/reliability.md): a
second run is refused before it writes anything, a lock whose holder was SIGKILLed does not block,
a finished (or failed) run releases it so a rerun in the same process resumes, and a filesystem
without flock warns and goes on. The two-rank refusal (every rank raises) is checked in
test_preemption_workers.py's shared driver launch."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from megatron_lite.training import run_lock
from megatron_lite.training.run_lock import RunLock, RunLockedError
from tests.faults import harness as h


def test_second_lock_is_refused_naming_save_folder_and_holder(tmp_path):
    d = str(tmp_path / "ck")
    first = RunLock()
    assert first.acquire(d) is True
    info = json.load(open(os.path.join(d, ".run_lock")))
    assert info["pid"] == os.getpid() and info["host"] == os.uname().nodename
    with pytest.raises(RunLockedError) as e:
        RunLock().acquire(d)   # flock: a second open file description conflicts, same process too
    msg = str(e.value)
    assert msg.startswith(f"--save {d}: another run is using this folder (host "
                          f"{info['host']}, pid {os.getpid()}, started {info['started']}; "
                          f"lock file {d}/.run_lock)")
    assert "give this one another --save" in msg and "\n" not in msg
    first.release()
    first.release()                  # idempotent
    again = RunLock()
    assert again.acquire(d) is True  # released: the next run takes it at once
    again.release()


def test_filesystem_without_flock_warns_and_goes_on(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = RunLock()
    with pytest.warns(UserWarning, match=r"does not support flock \(ENOLCK\), so nothing stops"):
        assert lock.acquire(str(tmp_path / "ck")) is False
    assert lock.fd is None
    lock.release()


def test_unwritable_save_is_one_line_error(tmp_path, monkeypatch):
    """Rank 0's OSError reaches every rank as RunLockedError (no rank waits in a collective)."""
    def boom(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(run_lock.os, "makedirs", boom)
    with pytest.raises(RunLockedError, match=r"--save /x: cannot create or lock /x/.run_lock "
                                             r"\(\[Errno 13\] Permission denied\); --save must"):
        run_lock.acquire_for_run(RunLock(), "/x", 0, "cpu")


def test_pretrain_refused_then_released_and_resumed(tmp_path):
    """Real pretrain() calls in one process (tests/faults/run_lock_child.py)."""
    from tests.test_training import make_dataset

    root = str(tmp_path)
    make_dataset(os.path.join(root, "data"))
    out = os.path.join(root, "res.json")
    p = subprocess.run([sys.executable, os.path.join(h.ROOT, "tests", "faults",
                                                     "run_lock_child.py"), root, out],
                       cwd=h.ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=h.ROOT),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out))
    ck = os.path.join(root, "ck")
    assert res["refused"].startswith(f"RunLockedError: --save {ck}: another run is using this "
                                     f"folder (host {os.uname().nodename}, "
                                     f"pid {res['holder_pid']}, started ")
    assert res["listing"] == [".run_lock"]       # nothing written: no metrics, config, checkpoint
    # Through the entrypoint: exit 2, one line.
    lines = res["entrypoint"]["stderr"].splitlines()
    assert res["entrypoint"]["rc"] == 2 and len(lines) == 1, res["entrypoint"]
    assert lines[0].startswith(f"pretrain_llama.py: error: --save {ck}: another run is using "
                               f"this folder (host {os.uname().nodename}, "
                               f"pid {res['entrypoint']['pid']}, started ")
    assert res["failed"] == "FileNotFoundError"  # took the lock, failed, released it (finally)
    assert res["first"] == {"iteration": 4, "consumed_samples": 16}
    assert res["rerun"] == {"iteration": 6, "consumed_samples": 24}
    # The rerun resumed at step 4 (no step trained twice into the folder's metrics).
    steps = [json.loads(line)["step"] for line in open(os.path.join(ck, "metrics.jsonl"))
             if json.loads(line).get("type", "train") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert open(os.path.join(ck, "latest")).read().strip() == "iter_0000006"
