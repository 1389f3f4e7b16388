"""Shared helpers for multi-process tests: free TCP port and forked gloo process groups."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite import parallel as ps


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def spawn(fn, world, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes. Forked, not spawned: a spawned
    child re-imports torch (10+ s each on a loaded 2-core machine); the parent has not touched
    torch.distributed and runs single-threaded (OMP_NUM_THREADS=1), so forking is safe."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="fork")
