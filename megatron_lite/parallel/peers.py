"""Which peer was lost: the job's host table, and one line for a collective that failed because
another rank's process (or its whole node) went away.

When a node dies, every surviving rank fails in its next collective with the backend's message
(gloo: ``[.../pair.cc:553] Connection closed by peer [10.0.0.2]:14540. This is typically caused
by a remote worker crashing...``), and the peer it names is only the rank's neighbour in that
collective - often another survivor that already failed and closed its sockets (a cascade). To
name the rank that really went away, every survivor marks itself alive in the job's key-value
store (the default process group's store: torchrun's, on node 0) and, after a short grace period,
the ranks that did not mark themselves are the lost ones; :func:`record_peers` (called once after
the process group is created) gives each rank's host name and address for the message. Without
a store (node 0 itself was lost), the message falls back to the address in the backend's text.
"""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

# backend messages of a collective whose peer process is gone (gloo, NCCL, the c10d store)
LOST_PATTERNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                 "remote process exited", "Connection refused", "NCCL communicator was aborted",
                 "Socket Timeout", "Timed out waiting")
ADDRESS = re.compile(r"\[([0-9a-fA-F:.]+)\]:(\d+)")
ALIVE_KEY = "megatron_lite/alive/"
GRACE_S = 2.0   # how long survivors wait for each other's mark: they fail within milliseconds

_table: list[tuple[str, str]] = []   # rank -> (host name, address its peers see)


def _own_address() -> str:
    """The address this host uses towards the rendezvous host (what its peers connect to)."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 1))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))   # UDP: no packet is sent, only the route is chosen
            return s.getsockname()[0]
    except OSError:
        return "?"


def record_peers() -> list[tuple[str, str]]:
    """Gather every rank's ``(host name, address)`` (one all-gather; collective over the default
    group). Call once after ``init_process_group``. Returns the table, rank-indexed."""
    global _table
    mine = (socket.gethostname(), _own_address())
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    _table = [tuple(x) for x in out]
    return _table


def is_lost_peer_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer process went away."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(p in text for p in LOST_PATTERNS)


def _hosts_of(ranks: list[int]) -> str:
    hosts = sorted({f"host {_table[r][0]}, {_table[r][1]}" for r in ranks if r < len(_table)})
    return "; ".join(hosts) or "host unknown"


def _ranks_list(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _silent_ranks(grace_s: float) -> Optional[list[int]]:
    """Ranks that did not mark themselves alive in the store within ``grace_s`` (None: no store)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(grace_s, 1.0)))
        store.set(f"{ALIVE_KEY}{dist.get_rank()}", "1")
        keys = [f"{ALIVE_KEY}{r}" for r in range(dist.get_world_size())]
        deadline = time.monotonic() + grace_s
        while True:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store went with the lost node: fall back
        return None


def lost_peer_message(exc: BaseException, where: str = "",
                      grace_s: float = GRACE_S) -> Optional[str]:
    """One line naming the lost peer(s) of a failed collective, or None when ``exc`` is not one.

    Args:
        exc: the exception the collective raised.
        where: what this rank was doing (e.g. the last collective's name), for the message.
        grace_s: seconds to wait for the other survivors' marks in the store.
    """
    if not is_lost_peer_error(exc) or not dist.is_initialized():
        return None
    silent = _silent_ranks(grace_s)
    where = f" in {where}" if where else ""
    if silent:
        return (f"lost {_ranks_list(silent)} ({_hosts_of(silent)}): their processes stopped "
                f"answering{where}; this rank stops too. Restart the job (--load resumes from "
                f"the last complete checkpoint)")
    m = ADDRESS.search(str(exc))
    addr = m.group(1) if m else "?"
    ranks = [r for r, (_, a) in enumerate(_table) if a == addr]
    who = f"{_ranks_list(ranks)} ({_hosts_of(ranks)})" if ranks else f"the peer at {addr}"
    return (f"lost the connection to {who}{where}; this rank stops too. Restart the job "
            f"(--load resumes from the last complete checkpoint)")


__all__ = ["is_lost_peer_error", "lost_peer_message", "record_peers"]
