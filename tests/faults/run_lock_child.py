"""Single-process body of tests/faults/test_run_lock.py (one interpreter for every pretrain()
call, as a driver or a notebook would make them). Usage::

    python tests/faults/run_lock_child.py ROOT RESULTS.json

ROOT holds ``data`` (tests/test_training.py make_dataset). Steps, each recorded in RESULTS.json:

1. ``refused``: another process (``hold``) holds ``ROOT/ck``'s lock; pretrain() is refused, and
   ``listing`` shows what ``ROOT/ck`` then holds;
2. ``entrypoint``: this process holds the lock on another descriptor; ``run_entrypoint`` returns
   the exit status and stderr;
3. the holder is SIGKILLed; ``failed``: a run that takes the lock and then fails (missing
   dataset); ``first``: 6 steps planned, a save every 2, ``--exit-interval 4``; ``rerun``: the
   same command without it, in the same process, resumes from step 4.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys

HOLD = ("import sys; from megatron_lite.training.run_lock import RunLock; "
        "RunLock().acquire(sys.argv[1]); print('held', flush=True); sys.stdin.read()")


def argv(root: str, iters: int, data: str = "data", extra: tuple = ()) -> list[str]:
    from tests.test_training import COMMON

    a = list(COMMON)
    a[a.index("--train-iters") + 1] = str(iters)
    ck = os.path.join(root, "ck")
    return a + ["--data-path", os.path.join(root, data), "--save", ck, "--load", ck,
                "--save-interval", "2", "--data-cache-path", os.path.join(root, "cache"), *extra]


def main(root: str, out: str) -> None:
    from megatron_lite.config import parse_args
    from megatron_lite.entrypoints import run_entrypoint
    from megatron_lite.training.loop import pretrain
    from megatron_lite.training.run_lock import RunLock

    ck, res = os.path.join(root, "ck"), {}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ck], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert holder.stdout.readline().strip() == "held"
    res["holder_pid"] = holder.pid
    try:
        pretrain(parse_args(argv(root, 4)))
        res["refused"] = "not refused"
    except Exception as e:  # noqa: BLE001 - recorded for the test
        res["refused"] = f"{type(e).__name__}: {e}"
    res["listing"] = sorted(os.listdir(ck))

    mine = RunLock()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    mine.acquire(ck)          # the SIGKILLed holder's lock is gone: this process takes it
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_entrypoint("pretrain_llama.py", lambda: parse_args(argv(root, 4)), pretrain)
    res["entrypoint"] = {"rc": rc, "stderr": err.getvalue(), "pid": os.getpid()}
    mine.release()

    try:
        pretrain(parse_args(argv(root, 4, data="no_such_data")))
        res["failed"] = "did not fail"
    except Exception as e:  # noqa: BLE001
        res["failed"] = type(e).__name__
    for name, extra in (("first", ("--exit-interval", "4")), ("rerun", ())):
        st = pretrain(parse_args(argv(root, 6, extra=extra)))
        res[name] = {"iteration": st.iteration, "consumed_samples": st.consumed_samples}
    with open(out + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1], sys.argv[2])
