"""Shared helpers for multi-process tests: free TCP port, forked gloo process groups, torchrun
launches of a test module's driver, metrics.jsonl reading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600,
                 env: dict | None = None) -> str:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc script *args`` from the repo
    root (OMP_NUM_THREADS=1, the repo on PYTHONPATH, ``env`` added) and return its stdout.

    Raises:
        AssertionError: non-zero exit, with the tails of stdout and stderr.
    """
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.abspath(script), *map(str, args)]
    out = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    return out.stdout


def read_metrics(path: str) -> dict[int, dict]:
    """step -> training record of a metrics.jsonl (evaluation records left out)."""
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type", "train") == "train":
                out[rec["step"]] = rec
    return out
