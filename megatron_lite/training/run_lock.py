"""One run per ``--save`` folder: an exclusive ``fcntl.flock`` on ``<save>/.run_lock``.

Two runs writing into one ``--save`` folder corrupt each other's checkpoints (one deletes the
other's ``.tmp_iter_*`` folder mid-save) and interleave their metrics. Global rank 0 takes the lock
(non-blocking) when the run starts, before anything is written, and holds it to the end of
:func:`megatron_lite.training.loop.pretrain`; every rank of a refused run raises
:class:`RunLockedError` (exit 2 through ``run_entrypoint``).

Why flock: the kernel drops the lock when its file description is closed, which includes any
death of the holder (SIGKILL, OOM kill, node reboot for a local disk), so no stale lock is ever
left to clean up by hand. The lock file itself stays (deleting it would let a run that opened the
old file and one that creates a new file both "hold" the lock); it holds the holder's host, pid
and start time for the refusal message, written in place because replacing the file (temp +
``os.replace``) would hand the next run a new, unlocked inode.

Not covered: runs with another ``--save`` that share a ``--metrics-file`` or ``--tensorboard-dir``
outside it, and filesystems without flock support (ENOLCK/EOPNOTSUPP/ENOSYS, e.g. Lustre mounted
without ``-o flock``), where the run warns once and goes on unlocked. NFSv4 and local disks
support it (Linux emulates flock with NFS byte-range locks).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from typing import Optional

import torch.distributed as dist

from megatron_lite.errors import RunLockedError  # noqa: F401 - raised here, re-exported

LOCK_NAME = ".run_lock"
# flock unsupported by the filesystem (Linux flock(2): ENOLCK; NFS/FUSE variants; Lustre -ENOSYS).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)}




def _holder_text(fd: int) -> str:
    """'host H, pid P, started T' from the lock file (best effort: it may be mid-write)."""
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(raw)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown (its lock file is being written)"


class RunLock:
    """The lock of one run; :meth:`acquire` takes it, :meth:`release` (idempotent) drops it."""

    def __init__(self):
        self.fd: Optional[int] = None
        self.path: Optional[str] = None

    def acquire(self, save_dir: str) -> bool:
        """Take the exclusive lock on ``save_dir/.run_lock`` (creating ``save_dir``).

        Returns:
            True when held, False when the filesystem does not support flock (one warning).

        Raises:
            RunLockedError: another process holds it; the message names ``--save``, the folder
                and the holder (host, pid, start time) and says what to do.
        """
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunLockedError(
                        f"--save {save_dir}: another run is using this folder ({_holder_text(fd)}; "
                        f"lock file {path}). Two runs saving into one folder overwrite each "
                        f"other's checkpoints and metrics: stop that run first, or give this one "
                        f"another --save") from None
                if e.errno in _UNSUPPORTED:
                    warnings.warn(f"--save {save_dir}: the filesystem does not support flock "
                                  f"({errno.errorcode.get(e.errno, e.errno)}), so nothing stops a "
                                  f"second run from writing into this folder at the same time",
                                  stacklevel=2)
                    return False
                raise
            finally:
                os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self.fd, self.path = fd, path
        return True

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock); no-op when not held."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def acquire_for_run(lock: RunLock, save_dir: Optional[str], rank: int, device) -> None:
    """Collective: global rank 0 takes ``lock`` on ``save_dir`` (nothing without ``--save``);
    every rank learns the outcome, so all ranks of a refused run stop with the same error
    instead of waiting for rank 0 in the next collective.

    Args:
        lock: the run's :class:`RunLock` (released by the caller in a ``finally``).
        save_dir: ``--save``, or None.
        rank: this process's global rank.
        device: the device of the process group's collectives (gloo: cpu, NCCL: cuda).

    Raises:
        RunLockedError: on every rank when rank 0 found the folder locked (or could not create
            the lock file: the message says which).
    """
    if not save_dir:
        return
    err = None
    if rank == 0:
        try:
            lock.acquire(save_dir)
        except RunLockedError as e:
            err = str(e)
        except OSError as e:   # e.g. --save not writable: the other ranks must hear of it too
            err = (f"--save {save_dir}: cannot create or lock {os.path.join(save_dir, LOCK_NAME)}"
                   f" ({e}); --save must be a writable folder")
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0, device=device)
        err = box[0]
    if err is not None:
        raise RunLockedError(err)
