"""``--stall-timeout-seconds``: a watchdog thread on every rank that ends a hung job with a report.

A rank that stops making progress - stuck in a collective whose peer never arrives, sleeping,
deadlocked - would otherwise hold the whole job until the process group's timeout
(``--distributed-timeout-minutes``, 10 by default) and then die with a backend error that says
nothing about where each rank was. Here a daemon thread on every rank watches the time since the
last step ended. When it exceeds the limit, the rank:

1. writes ``<save>/hang/rank_<r>.txt``: a one-line JSON header (rank, host, pid, step, seconds
   without progress, the last collective it entered from :func:`megatron_lite.parallel.comm_timer.
   last_collective` and whether it returned, its innermost frame in our code), then every
   thread's Python stack (``faulthandler.dump_traceback``);
2. prints one line saying so (stderr);
3. waits up to a grace period for the other ranks' files (they stop progressing at the same
   moment, so theirs appear within a poll interval) and, on rank 0, prints which rank was stuck
   where - the thread runs whatever the main thread is doing, so rank 0 reports even when it is
   the stuck one (``time.sleep`` and gloo/NCCL waits release the GIL);
4. exits with status 1 (``os._exit``: the main thread may never return from its wait).

The limit: an explicit ``--stall-timeout-seconds S`` (0 = off), or by default
``max(600 s, 10 x the longest interval between two step ends so far)`` - the interval includes
that step's evaluation and checkpoint save, so a run whose saves are slow raises its own limit
after its first save (600 s covers the first one, and the start-up before the first step). A C
backstop (``faulthandler.dump_traceback_later``, re-armed at every step end) dumps the stacks to
stderr and exits should the Python thread itself never get the GIL.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
import traceback
from typing import Optional

from megatron_lite.parallel import comm_timer
from megatron_lite.training.callbacks.base import Callback

AUTO_FLOOR_S = 600.0     # default limit before (and at least after) the first measured steps
AUTO_FACTOR = 10.0       # default limit: this many times the longest step interval so far
BACKSTOP_EXTRA_S = 60.0  # the C backstop fires this long after the Python watchdog should have
EXIT_STATUS = 1
HEADER = "megatron_lite hang report: "
PROJECT_FILES = ("megatron_lite", "pretrain_llama.py", "cpt_llama.py")


def hang_dir(save: Optional[str]) -> Optional[str]:
    """Where the reports go: ``<save>/hang`` (None without ``--save``: stderr only)."""
    return os.path.join(save, "hang") if save else None


def innermost_project_frame(frame) -> str:
    """``file.py:line in func`` of the innermost frame of ours (megatron_lite, the entrypoints)
    in ``frame``'s stack, else of the innermost frame."""
    stack = traceback.extract_stack(frame)
    ours = [f for f in stack if any(p in f.filename for p in PROJECT_FILES)]
    f = (ours or stack)[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def read_reports(folder: str, world: int, since: float) -> dict[int, dict]:
    """``{rank: header}`` of the reports in ``folder`` written after ``since`` (epoch seconds)."""
    out = {}
    for r in range(world):
        path = os.path.join(folder, f"rank_{r}.txt")
        try:
            if os.path.getmtime(path) < since:
                continue
            with open(path) as f:
                line = f.readline()
            if line.startswith(HEADER):
                out[r] = json.loads(line[len(HEADER):])
        except (OSError, ValueError):
            continue
    return out


def describe(rep: dict) -> str:
    """One rank's place in the hang, from its report header."""
    last = rep.get("last_collective") or {}
    if last.get("seq") and last.get("returned") is None:
        where = f"waiting in {last['name']} for {rep['now'] - last['entered']:.1f} s"
    elif last.get("seq"):
        where = (f"not in a collective (last: {last['name']}, returned "
                 f"{rep['now'] - last['returned']:.1f} s before)")
    else:
        where = "not in a collective (none entered yet)"
    return f"rank {rep['rank']} ({rep['host']}): step {rep['step']}, {where}, at {rep['frame']}"


def verdict(reps: dict[int, dict], world: int) -> str:
    """Which ranks hold the others up: those outside a collective (or without a report) while
    the rest wait inside one."""
    waiting = sorted(r for r, rep in reps.items()
                     if rep["last_collective"]["seq"] and rep["last_collective"]["returned"] is None)
    stuck = sorted(set(range(world)) - set(waiting))
    if waiting and stuck:
        return (f"stuck: rank(s) {','.join(map(str, stuck))} (outside any collective or no report) "
                f"while rank(s) {','.join(map(str, waiting))} wait in a collective")
    return "no single culprit: every reporting rank is " + (
        "waiting in a collective (a lost message or a backend hang)" if waiting else
        "outside a collective (all slow or all stuck in the same place)")


class StallWatchdog(Callback):
    """The watchdog thread of one rank (see the module docstring).

    Args:
        timeout_s: explicit limit in seconds, None for the automatic one, 0 for off.
        folder: ``<save>/hang`` or None.
        rank, world: this process's global rank and the job's world size.
    """

    def __init__(self, timeout_s: Optional[float], folder: Optional[str], rank: int, world: int):
        self.timeout_s, self.folder, self.rank, self.world = timeout_s, folder, rank, world
        self.slowest = 0.0
        self.last = time.monotonic()
        self.state = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.started = time.time()

    @classmethod
    def from_config(cls, cfg, rank: int, world: int) -> Optional["StallWatchdog"]:
        t = cfg.parallel.stall_timeout_seconds
        if t == 0:
            return None
        return cls(t, hang_dir(cfg.checkpoint.save), rank, world)

    def limit(self) -> float:
        """Seconds without a step end after which this rank reports a stall."""
        if self.timeout_s is not None:
            return float(self.timeout_s)
        return max(AUTO_FLOOR_S, AUTO_FACTOR * self.slowest)

    # ---- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        self.state, self.started = trainer.state, time.time()
        if self.folder:   # a report of an earlier attempt must not be read as this one's
            try:
                os.remove(os.path.join(self.folder, f"rank_{self.rank}.txt"))
            except FileNotFoundError:
                pass
        self.last = time.monotonic()
        self._arm_backstop()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def on_step_end(self, trainer, step, result) -> None:
        now = time.monotonic()
        self.slowest = max(self.slowest, now - self.last)
        self.last = now
        self._arm_backstop()

    def on_train_end(self, trainer) -> None:
        self.stop()

    def stop(self) -> None:
        """End the thread and the backstop (training ended, or failed with an exception)."""
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    # ---- the thread ------------------------------------------------------------------------------
    def _arm_backstop(self) -> None:
        faulthandler.dump_traceback_later(self.limit() + self._grace() + BACKSTOP_EXTRA_S,
                                          exit=True)

    def _grace(self) -> float:
        return min(30.0, max(5.0, 0.5 * self.limit()))

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.limit() / 20))):
            stalled = time.monotonic() - self.last
            if stalled > self.limit() and not self._stop.is_set():
                self._fire(stalled)

    def _fire(self, stalled: float) -> None:
        step = self.state.iteration + 1 if self.state is not None else 0
        main = sys._current_frames().get(threading.main_thread().ident)
        rep = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": step,
               "stalled_s": round(stalled, 1), "limit_s": self.limit(), "now": time.time(),
               "last_collective": comm_timer.last_collective(),
               "frame": innermost_project_frame(main) if main is not None else "?"}
        path = self._write(rep)
        print(f"[watchdog] rank {self.rank} ({rep['host']}): no progress for {stalled:.1f} s "
              f"(--stall-timeout-seconds {self.limit():g}): {describe(rep).split(': ', 1)[1]}; "
              f"stacks in {path or 'stderr'}; exiting",
              file=sys.stderr, flush=True)
        if path is None:
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        elif self.rank == 0:
            self._summary()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STATUS)

    def _write(self, rep: dict) -> Optional[str]:
        """The report file (header + every thread's stack), written to a temporary name and
        renamed, so a reader never sees half of it."""
        if not self.folder:
            return None
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"rank_{self.rank}.txt")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(HEADER + json.dumps(rep) + "\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        os.replace(tmp, path)
        return path

    def _summary(self) -> None:
        """Rank 0: wait for the other reports (up to the grace period), then one line per rank."""
        deadline = time.monotonic() + self._grace()
        reps = read_reports(self.folder, self.world, self.started)
        while len(reps) < self.world and time.monotonic() < deadline:
            time.sleep(0.1)
            reps = read_reports(self.folder, self.world, self.started)
        lines = [f"[watchdog] hang report ({len(reps)} of {self.world} ranks, {self.folder}):"]
        lines += [f"[watchdog]   {describe(reps[r])}" if r in reps else
                  f"[watchdog]   rank {r}: no report (process gone, or its watchdog could not run)"
                  for r in range(self.world)]
        lines.append(f"[watchdog] {verdict(reps, self.world)}")
        print("\n".join(lines), file=sys.stderr, flush=True)


__all__ = ["StallWatchdog", "describe", "hang_dir", "innermost_project_frame", "read_reports",
           "verdict"]
