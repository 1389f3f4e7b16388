"""Preemption with DataLoader workers on (docs/reliability.md): SIGTERM/SIGUSR1 reach the workers
too (torchrun signals each rank's process group, SLURM every process), and a worker must not die
of them before its rank saves at the step boundary.

* Fast checks with ``loader_child.py``, a stand-in rank reading a ``build_data_loader`` loader with
  2 workers: the signals to the whole process group stop it cleanly (torch's default
  ``worker_signals=()`` is the control that crashes), the rank's own ``terminate()`` at interpreter
  exit still ends its workers (else that exit would hang in ``join()``), a SIGKILLed rank's
  workers exit (torch's watchdog), Ctrl-C is unchanged.
* End to end (slow): ``torchrun --nproc_per_node 2 pretrain_llama.py --num-workers 2``, SIGTERM
  to the torchrun agent, and to every process of the job (agent, ranks, workers: what SLURM does)
  after 3 logged steps: the signal's step is saved, no process is left, and the resume (one
  shared driver.py launch, which also runs the uninterrupted reference) reproduces the reference
  bit for bit. The same driver launch checks that all ranks of a run refused by the run lock
  stop (test_run_lock.py has the single-process checks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_lite.checkpoint import layout
from tests.faults import harness as h

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loader_child.py")
N = h.TRAIN_ITERS


def _start_child(tmp_path, mode, which):
    status = str(tmp_path / f"{mode}_{which}.json")
    log = open(tmp_path / f"{mode}_{which}.log", "w")
    # A session (process-group) leader of its own, as torchrun starts each rank.
    p = subprocess.Popen([sys.executable, CHILD, mode, which, status], cwd=h.ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=h.ROOT),
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.time() + 120
    while not os.path.exists(status):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            raise AssertionError(h.read(log.name))
        time.sleep(0.05)
    return p, status, log.name


def _finish_child(p, status, log, timeout=60):
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        h.kill_tree(p.pid)
        p.wait()
        raise AssertionError("stand-in rank hung: " + h.read(log))
    with open(status) as f:
        return rc, json.load(f), h.read(log)


def test_workers_survive_preemption_signals_to_the_process_group(tmp_path):
    """SIGUSR1 to the workers alone, then SIGTERM to the rank's whole process group: the rank
    stops at its next 'step' with exit 0 and its workers end with it (through multiprocessing's
    exit-time terminate(), the loader is still alive at interpreter exit)."""
    p, status, log = _start_child(tmp_path, "until_signal", "guarded")
    workers = json.load(open(status))["workers"]
    for w in workers:
        h.send(w, signal.SIGUSR1)
    time.sleep(0.5)           # the rank keeps reading from both workers meanwhile
    os.killpg(p.pid, signal.SIGTERM)
    rc, st, text = _finish_child(p, status, log)
    assert rc == 0 and "killed by signal" not in text, text
    assert st["stopped"] == "cleanly" and st["signals"] == [int(signal.SIGTERM)]
    assert st["batches"] > 1
    assert h.wait_gone(workers) == []


def test_without_the_guard_the_group_signal_kills_the_workers(tmp_path):
    """The control (torch's default, ``worker_signals=()``): the crash this guards against."""
    p, status, log = _start_child(tmp_path, "until_signal", "plain")
    workers = json.load(open(status))["workers"]
    os.killpg(p.pid, signal.SIGTERM)
    _, _, text = _finish_child(p, status, log)
    assert "is killed by signal: Terminated" in text, text
    assert h.wait_gone(workers) == []


def test_workers_of_a_sigkilled_rank_exit(tmp_path):
    p, status, log = _start_child(tmp_path, "until_signal", "guarded")
    workers = json.load(open(status))["workers"]
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    # torch's watchdog: a worker whose parent changed exits within MP_STATUS_CHECK_INTERVAL (5 s)
    assert h.wait_gone(workers, timeout=60) == []


def _init_then_sleep(init):
    init(0)
    time.sleep(60)


def test_worker_whose_rank_died_during_start_up_exits():
    """A rank killed while a worker is still in its worker_init_fn: torch's watchdog, made after
    it, would take init for the rank and never exit; the guard ends the worker at once."""
    import multiprocessing

    from megatron_lite.data.builder import PreemptionSafeWorkerInit

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    init = PreemptionSafeWorkerInit([signal.SIGTERM])
    init.rank_pid = gone.pid                      # a rank that no longer exists
    p = multiprocessing.get_context("fork").Process(target=_init_then_sleep, args=(init,))
    p.start()
    p.join(30)
    assert p.exitcode == 0, p.exitcode           # not None: it did not sleep on


def test_ctrl_c_still_interrupts_without_saving(tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) is not a preemption signal: the rank gets
    KeyboardInterrupt (docs/reliability.md), the workers exit."""
    p, status, log = _start_child(tmp_path, "until_signal", "guarded")
    workers = json.load(open(status))["workers"]
    os.killpg(p.pid, signal.SIGINT)
    rc, st, text = _finish_child(p, status, log)
    assert rc == -signal.SIGINT and "KeyboardInterrupt" in text, text   # Python re-raises it
    assert "stopped" not in st
    assert h.wait_gone(workers) == []


# ---- end to end: torchrun, pretrain_llama.py --num-workers 2 ----

def _launch(root, name, data, tok, torchrun_args=()):
    argv = h.with_flag(h.run_argv(root, name, os.path.join(root, "ck_" + name), 2, data, tok),
                       "--num-workers", "2")
    log = os.path.join(root, name + ".log")
    return h.launch(argv, h.env_for(root, name), log, torchrun_args=torchrun_args), log


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("preempt_workers"))
    try:
        yield _run(root)
    finally:
        h.kill_leftovers()


def _run(root):
    data, tok = h.make_corpus(root)
    out = {"root": root}
    for name in ("sigterm_agent", "sigterm_all"):
        # sigterm_all: the SLURM path, torchrun started as examples/common_launch.sh starts it.
        p, log = _launch(root, name, data, tok, () if name == "sigterm_agent" else (
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"))
        h.workers(p)
        h.wait_steps(os.path.join(root, name + ".jsonl"), 3, p)
        pids = h.tree_pids(p.pid)      # agent, 2 ranks and their 2 + 2 DataLoader workers
        for pid in (pids if name == "sigterm_all" else [p.pid]):
            h.send(pid, signal.SIGTERM)
        rc, text = h.finish(p, log)
        out[name] = {"rc": rc, "log": text, "pids": pids, "left": h.wait_gone(pids, 30),
                     "latest": open(os.path.join(root, "ck_" + name, "latest")).read().strip()}
    # One launch: a run refused by the run lock (this process holds --save's lock: every rank
    # must raise, or the ranks would drift apart), the uninterrupted reference (workers on, from
    # scratch), then both resumes.
    from megatron_lite.training.run_lock import RunLock

    lock = RunLock()
    lock.acquire(os.path.join(root, "ck_locked"))
    runs = [{"name": "locked", "argv": h.run_argv(root, "locked", os.path.join(root, "ck_locked"),
                                                  2, data, tok)}]
    runs += [{"name": "ref", "argv": h.with_flag(h.run_argv(
        root, "ref", os.path.join(root, "ck_ref"), 100, data, tok), "--num-workers", "2"),
        "env": {"MEGATRON_LITE_LOG_SAMPLES": os.path.join(root, "ref.samples")}}]
    for name in ("sigterm_agent", "sigterm_all"):
        runs.append({"name": name, "argv": h.with_flag(h.run_argv(
            root, name + ".resume", os.path.join(root, "ck_" + name), 2, data, tok),
            "--num-workers", "2"),
            "env": {"MEGATRON_LITE_LOG_SAMPLES": os.path.join(root, name + ".resume.samples")}})
    spec, res = os.path.join(root, "spec.json"), os.path.join(root, "results.json")
    with open(spec, "w") as f:
        json.dump(runs, f)
    p = h.launch([spec, res], h.env_for(root, "driver"), os.path.join(root, "driver.log"),
                 script="tests/faults/driver.py")
    try:
        rc, text = h.finish(p, os.path.join(root, "driver.log"), timeout=400)
    finally:
        lock.release()
    assert rc == 0, text[-4000:]
    with open(res) as f:
        out["driver"] = json.load(f)
    return out


def _same(root, a, a_samples, b, b_samples, steps):
    """Steps ``steps`` of run ``a`` have run ``b``'s loss bits, LR, consumed samples, sample ids."""
    ma, mb = (h.read_metrics(os.path.join(root, n + ".jsonl")) for n in (a, b))
    sa, sb = (h.read_samples(os.path.join(root, s)) for s in (a_samples, b_samples))
    assert sorted(ma) == list(steps), (a, sorted(ma))
    for s in steps:
        assert ma[s]["loss"] == mb[s]["loss"] and ma[s]["lr"] == mb[s]["lr"], (a, s)
        assert ma[s]["consumed_samples"] == mb[s]["consumed_samples"] == 4 * s
        for rank in (0, 1):
            assert sa[(s, rank)] == sb[(s, rank)], (a, s, rank)


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("name", ["sigterm_agent", "sigterm_all"])
def test_preemption_with_workers_saves_and_resumes_bitwise(preempted, name):
    root, run = preempted["root"], preempted[name]
    text = run["log"]
    assert "killed by signal" not in text and "SignalException" in text, text[-3000:]
    # The ranks saved and returned 0; the agent re-raises the signal it got: exit 1
    # (docs/reliability.md); nothing was killed after --shutdown-timeout.
    assert run["rc"] == 1 and "forcefully exiting via SIGKILL" not in text, text[-3000:]
    assert "[exit] signal received: stopping after step" in text
    assert len(run["pids"]) == 7 and run["left"] == []   # agent, 2 ranks, 4 loader workers
    killed = h.read_metrics(os.path.join(root, name + ".jsonl"))
    k = max(killed)
    assert 3 <= k < N and run["latest"] == layout.tag_for(k)
    assert preempted["driver"]["ref"] == {"iteration": N, "skipped": 0, "consumed_samples": 4 * N}
    assert preempted["driver"][name] == {"iteration": N, "skipped": 0,
                                         "consumed_samples": 4 * N}
    _same(root, name, name + ".samples", "ref", "ref.samples", range(1, k + 1))
    _same(root, name + ".resume", name + ".resume.samples", "ref", "ref.samples",
          range(k + 1, N + 1))


@pytest.mark.slow
@pytest.mark.faults
def test_run_lock_refuses_every_rank_of_a_second_run(preempted):
    """2 ranks under torchrun: rank 0 finds --save locked (by the test process), every rank raises
    the same one-line error before writing anything, and the next run of the launch proceeds."""
    root = preempted["root"]
    ck = os.path.join(root, "ck_locked")
    err = preempted["driver"]["locked"]["error"]
    assert err.startswith(f"RunLockedError: --save {ck}: another run is using this folder (host "
                          f"{os.uname().nodename}, pid {os.getpid()}, started "), err
    assert err.endswith(f"lock file {ck}/.run_lock). Two runs saving into one folder overwrite "
                        f"each other's checkpoints and metrics: stop that run first, or give "
                        f"this one another --save")
    assert sorted(os.listdir(ck)) == [".run_lock"]
    assert not os.path.exists(os.path.join(root, "locked.jsonl"))   # --metrics-file outside it
    assert preempted["driver"]["ref"]["iteration"] == N
