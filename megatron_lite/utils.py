"""Small helpers shared by every layer, one copy each: atomic file writes, file modes, fsync, rank
queries, and the check that runs a tool under the project's .venv.

Imports only the standard library and torch.distributed (for the rank helpers), so any module may
use it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import uuid
from typing import BinaryIO, Iterator


def get_rank() -> int:
    """This process's global rank (0 when torch.distributed is not initialised)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_rank_0() -> bool:
    """Whether this process is global rank 0 (True without torch.distributed)."""
    return get_rank() == 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists, else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print_rank_0(*args, **kwargs) -> None:
    """``print(..., flush=True)`` on global rank 0 only."""
    if is_rank_0():
        print(*args, flush=True, **kwargs)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def use_project_venv(module: str | None = None) -> None:
    """Make a tool started with a Python that lacks torch run under the checkout's ``.venv``.

    Called at the top of each ``tools/*.py``, ``pretrain_llama.py``, ``cpt_llama.py`` and the
    package run by ``python -m megatron_lite.integrations.lightning``, before anything imports
    torch. A Python that has torch (an activated ``.venv``, a conda env, ``pip install -e .``) is
    used as it is; otherwise the process is replaced by ``<checkout>/.venv/bin/python`` with the
    same arguments (what ``scripts/setup_env.sh`` builds). With neither, one line says how to
    create the environment and the exit status is 2, instead of ``ModuleNotFoundError: No module
    named 'torch'``.

    Args:
        module: for a ``python -m MODULE`` run, the module to rerun with ``-m`` (its package is
            imported while ``sys.argv[0]`` is still ``"-m"``); None for a script.
    """
    if importlib.util.find_spec("torch") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(root, ".venv")
    python = os.path.join(venv, "bin", "python")
    if os.access(python, os.X_OK) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        head = ["-m", module] if module else sys.argv[:1]
        os.execv(python, [python, *head, *sys.argv[1:]])
    tool = (f"python -m {module}" if module else
            os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "megatron_lite")
    print(f"{tool}: error: torch is not installed for {sys.executable}: create the project's "
          f"environment once with `source scripts/setup_env.sh` in {root} (it builds .venv and "
          f"activates it; in a later shell `source .venv/bin/activate`)", file=sys.stderr)
    sys.exit(2)


def umask_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file in this process: ``0o666 & ~umask``.

    Read from ``/proc/self/status`` where it exists (Linux), else by setting and restoring the
    umask (a moment in which another thread creating a file would get mode 0o666 & ~0o077).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: str) -> None:
    """chmod ``path`` to :func:`umask_file_mode`: for files another library or ``tempfile.mkstemp``
    created owner-only (0o600) that others must read (exported models, shared data caches)."""
    os.chmod(path, umask_file_mode())


@contextlib.contextmanager
def atomic_output(path: str, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Stream a file into place: yields a binary file object on a temporary file in ``path``'s
    folder, renamed over ``path`` (``os.replace``) when the block ends without an exception and
    removed when it raises. A reader sees the old file or the whole new one, never a part. The
    mode follows the process umask like any ``open(path, "w")`` (0o666 & ~umask), so outputs
    others must read (checkpoints, caches, metrics, data shards) stay group/world readable under
    the usual 022.

    Args:
        path: destination; its folder is created when missing.
        fsync: flush the file to stable storage before the rename (the default).

    Raises:
        OSError: the folder cannot be written (the temporary file is removed).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`: temporary file in the same
    folder, then ``os.replace``; mode from the umask).

    Raises:
        OSError: the folder cannot be written (the temporary file is removed).
    """
    with atomic_output(path, fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str, text: str, *, fsync: bool = True) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "barrier", "follow_umask", "fsync_path",
           "get_rank", "is_rank_0", "print_rank_0", "umask_file_mode", "use_project_venv"]
