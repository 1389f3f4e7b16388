"""``--async-save``: the state is copied to host memory at the step boundary and written by a
background thread while training goes on.

The seam is DeepSpeed's ``engine.checkpoint_engine.save(state_dict, path)``, through which
``engine.save_checkpoint`` writes every file of a rank (model states, ZeRO partitions). During an
asynchronous save :func:`megatron_lite.checkpoint.engine_state.start_save` replaces it for the
duration of ``engine.save_checkpoint`` by a recorder that :func:`stage`\\ s the state dict (a host
copy, made before the call returns, so the next optimizer step cannot change it) and queues the
original ``save`` for the thread. DeepSpeed's collectives inside ``save_checkpoint`` therefore
still run on the main thread at the step boundary; the thread only serialises and writes, and
runs no collective. (DeepSpeed 0.19's own asynchronous engines do not fit a CPU/gloo run: the
``FastCheckpointEngine`` and the ``DecoupledCheckpointEngine`` built on it need the DeepNVMe
``async_io`` op and a GPU, and Nebula needs Azure's service.)

:func:`stage` keeps storage sharing: tensors that are views of one storage (DeepSpeed's flat
buffers) are copied as one storage and re-viewed, so ``torch.save`` of the copy writes the same
bytes as ``torch.save`` of the original: a file saved asynchronously is bitwise the file the
synchronous save writes (tests/faults/test_verified_async.py compares their checksums).

Extra host memory while a save is pending: the staged copy, i.e. the bytes of this rank's
checkpoint files (:attr:`BackgroundWrite.host_bytes`); it is released file by file as the thread
writes them.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable, Optional

import torch

# Values that cannot change after the step boundary: kept by reference.
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.Size,
              torch.device)


def stage(obj, memo: Optional[dict] = None):
    """A host copy of ``obj`` (nested dicts, lists, tuples, tensors, plain objects) that
    serialises to the same bytes.

    Tensors: each distinct storage is copied once and every tensor viewing it becomes the same
    view of the copy (offset, shape, strides kept); a ``torch.nn.Parameter`` stays a Parameter.
    Containers are rebuilt with their own type; other objects are deep-copied (kept by reference
    when they cannot be: configuration objects). An object met twice (a tensor, a dict, a list)
    is copied once and the copy met twice, so pickle's memo, and with it the file's bytes, are
    those of the original.

    Args:
        obj: what DeepSpeed passes to ``checkpoint_engine.save``.
        memo: shared between the calls of one save (storages shared across files are copied
            once); :func:`staged_bytes` sums the storages it copied.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, _IMMUTABLE):
        return obj
    key = ("id", id(obj))
    if key in memo:
        return memo[key][1]
    if isinstance(obj, torch.Tensor):
        out = _stage_tensor(obj, memo)
    elif isinstance(obj, dict):
        out = copy.copy(obj)           # keeps the type (OrderedDict, ...) and its attributes
        out.clear()
        memo[key] = (obj, out)         # before the values: a dict that contains itself
        for k, v in obj.items():
            out[k] = stage(v, memo)
    elif isinstance(obj, list):
        out = []
        memo[key] = (obj, out)
        out.extend(stage(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        items = [stage(v, memo) for v in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        try:
            out = copy.deepcopy(obj, memo.setdefault("deepcopy", {}))
        except Exception:  # noqa: BLE001 - e.g. holds a process group: configuration, not state
            out = obj
    memo[key] = (obj, out)             # keeps obj alive, so its id is not reused meanwhile
    return out


def _stage_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    st = t.untyped_storage()
    key = ("storage", st.data_ptr(), t.device.type, t.device.index, st.nbytes())
    copied = memo.get(key)
    if copied is None:
        copied = memo[key] = st.clone() if t.device.type == "cpu" else st.cpu()
    out = torch.empty(0, dtype=t.dtype).set_(copied, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    elif t.requires_grad:              # pickled with the tensor (DeepSpeed's fp32 partitions)
        out.requires_grad_(True)
    return out


def staged_bytes(memo: dict) -> int:
    """Host bytes of the storages :func:`stage` copied with ``memo``."""
    return sum(v.nbytes() for k, v in memo.items() if k[0] == "storage")


class BackgroundWrite:
    """One rank's pending write: ``writes`` run in a daemon thread, in order.

    Args:
        writes: functions run in order; each writes one file and returns its path (it holds the
            staged copy, dropped once written), or returns None (a step that writes nothing).
        finish: ``finish(paths)`` after the last write (fsync, checksums), in the thread.
        after_first: called in the thread after the first file is written (test fault point).
        host_bytes: the staged copy's size (reported).

    The thread runs no collective. An exception in it is kept and re-raised by :meth:`result`.
    """

    def __init__(self, writes: list[Callable[[], Optional[str]]],
                 finish: Callable[[list[str]], object], after_first: Callable[[], None],
                 host_bytes: int):
        self.writes, self.finish, self.after_first = writes, finish, after_first
        self.host_bytes = host_bytes
        self.error: Optional[BaseException] = None
        self.value = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="async-checkpoint", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        paths = []
        try:
            while self.writes:
                fn = self.writes.pop(0)
                path = fn()
                del fn                       # the staged copy of this file can be freed now
                if path is not None:
                    paths.append(path)
                    if len(paths) == 1:
                        self.after_first()
            self.value = self.finish(paths)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by result()
            self.error = e
            self.writes = []
        self.seconds = time.perf_counter() - start

    def done(self) -> bool:
        """Whether the thread has finished (successfully or not)."""
        return not self.thread.is_alive()

    def result(self):
        """Wait for the thread; return ``finish``'s value or raise the thread's exception."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


__all__ = ["BackgroundWrite", "stage", "staged_bytes"]
