#!/usr/bin/env python
"""Checkpoint cost on this machine: how long a save blocks training, synchronous vs
``--async-save``, the extra host memory of the asynchronous copy, and the speed of the checksum
candidates for the manifest (sha256, blake2b, XXH3-128) on the checkpoint's own files.

One process (gloo, world size 1, ZeRO-1, fp32 AdamW) builds the ``--model-size`` preset (default
125m) with the real set-up (``training/setup.build_components``), trains one step on random tokens
(so the optimizer moments exist), then alternates ``--rounds`` synchronous and asynchronous saves
into ``--out`` (a new folder per save):

* sync: ``engine_state.save_checkpoint`` (write, fsync, checksum, manifest, rename): all of it
  blocks the step boundary;
* async: ``start_save(background=True)`` (host copy of the state; blocks), then one training step
  runs while the thread writes (its step time is reported beside a step without a write), then
  ``commit_save`` (manifest, rename, ``latest``; blocks). Blocking = start + commit.

Extra host memory: the staged copy's bytes (``BackgroundWrite.host_bytes``) and the growth of the
process's resident set across ``start_save`` (VmRSS from /proc).

    python bench/bench_checkpoint.py                          # 125m, 3 rounds, /tmp/bench_ckpt
    python bench/bench_checkpoint.py --model-size tiny --rounds 1

Prints figures only; nothing here is asserted.

Measured 2026-12-07 06:35 on the project's 2-core machine (load ~3 from other jobs), 125m preset
(134.1 M parameters, checkpoint 2.15 GB), 3 rounds, medians: sync save blocks 7.82 s (2.88-8.78,
fsync of 2.15 GB dominates), async save blocks 1.48 s (1.34-1.59: the host copy, DeepSpeed's own
clone of the module state, the commit), background write 6.43 s, a training step 10.99 s alone /
12.22 s while the thread writes, extra host memory 2.15 GB (the staged copy = the rank's
checkpoint bytes; the resident set grew by the same). Checksums over the checkpoint's files:
XXH3-128 9.94 GB/s (0.22 s), sha256 1.34 GB/s (1.60 s), blake2b 0.71 GB/s (3.00 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-size", default="125m")
    p.add_argument("--seq-length", type=int, default=64, help="tokens per sample of the steps")
    p.add_argument("--rounds", type=int, default=3, help="sync/async save pairs")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_ckpt"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build(args):
    from megatron_lite.config import parse_args as parse_run
    from megatron_lite.training.run_lock import RunLock
    from megatron_lite.training.setup import build_components

    cfg = parse_run(["--model-size", args.model_size, "--seq-length", str(args.seq_length),
                     "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "100",
                     "--lr", "1e-4", "--device", "cpu", "--zero-stage", "1", "--vocab-size", "32000",
                     "--data-path", "unused", "--save", args.out, "--peak-tflops", "1"],
                    world_size=1)
    return cfg, build_components(cfg, RunLock())


def one_step(comp, cfg, state):
    import torch

    from megatron_lite.training.step import train_step

    tokens = torch.randint(0, 32000, (1, cfg.model.seq_length))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}
    start = time.perf_counter()
    train_step(comp.engine, comp.optimizer, comp.scheduler, [batch], state, 10, comp.device)
    return time.perf_counter() - start


def hash_speeds(folder: str) -> dict[str, float]:
    """GB/s of each checksum over the checkpoint's files (read once first: page cache warm)."""
    from megatron_lite.checkpoint.layout import list_files
    from megatron_lite.checkpoint.verify import HASHERS, file_checksum

    files = [os.path.join(folder, f) for f in list_files(folder)]
    total = sum(os.path.getsize(f) for f in files)
    for f in files:
        file_checksum(f, "sha256" if "xxh3_128" not in HASHERS else "xxh3_128")
    out = {}
    for alg in ("sha256", "blake2b", "xxh3_128"):
        if alg in HASHERS:
            start = time.perf_counter()
            for f in files:
                file_checksum(f, alg)
            out[alg] = total / (time.perf_counter() - start) / 1e9
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from megatron_lite.checkpoint import engine_state
    from megatron_lite.training.callbacks.checkpoint_saver import folder_bytes
    from megatron_lite.training.train_state import TrainState

    shutil.rmtree(args.out, ignore_errors=True)
    cfg, comp = build(args)
    state = TrainState()
    one_step(comp, cfg, state)
    sync_s, async_block, async_write, host, rss, step_alone, step_during = ([] for _ in range(7))
    for _ in range(args.rounds):
        step_alone.append(one_step(comp, cfg, state))
        start = time.perf_counter()
        path = engine_state.save_checkpoint(comp.engine, cfg, state, comp.scheduler, args.out)
        sync_s.append(time.perf_counter() - start)
        one_step(comp, cfg, state)
        before = rss_bytes()
        start = time.perf_counter()
        pending = engine_state.start_save(comp.engine, cfg, state, comp.scheduler, args.out,
                                          background=True)
        blocked = time.perf_counter() - start
        rss.append(rss_bytes() - before)
        host.append(pending.background.host_bytes)
        step_during.append(one_step(comp, cfg, state))   # training goes on meanwhile
        pending.background.thread.join()
        start = time.perf_counter()
        engine_state.commit_save(pending, cfg)
        async_block.append(blocked + time.perf_counter() - start)
        async_write.append(pending.background.seconds)
    size = folder_bytes(path)
    med = statistics.median
    print(f"model {args.model_size}: {sum(p.numel() for p in comp.model.parameters()) / 1e6:.1f} M "
          f"parameters; checkpoint {size / 1e9:.2f} GB (fp32 weights + AdamW fp32 master and "
          f"moments); {args.rounds} rounds, medians; torch threads {args.threads}")
    print(f"sync save, blocks training:         {med(sync_s):6.2f} s  (all: "
          f"{', '.join(f'{x:.2f}' for x in sync_s)})")
    print(f"async save, blocks training:        {med(async_block):6.2f} s  (all: "
          f"{', '.join(f'{x:.2f}' for x in async_block)})")
    print(f"async save, background write:       {med(async_write):6.2f} s")
    print(f"training step alone / during write: {med(step_alone):6.2f} s / {med(step_during):.2f} s")
    print(f"extra host memory (staged copy):    {med(host) / 1e9:6.2f} GB; resident set grew "
          f"{med(rss) / 1e9:.2f} GB across start_save")
    for alg, gbs in hash_speeds(path).items():
        print(f"checksum {alg:9s} {gbs:6.2f} GB/s = {size / gbs / 1e9:5.2f} s per checkpoint")
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
