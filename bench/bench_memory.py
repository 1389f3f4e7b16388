#!/usr/bin/env python
"""Measured peak training memory vs the planner's estimate (megatron_lite.planning.memory).

One process, no DeepSpeed (ZeRO-0 arithmetic): build LlamaModel, train a few steps of AdamW on
random tokens, and record the peak memory of the training state:

- CPU: peak RSS growth over the baseline taken after imports and data creation (Linux VmHWM,
  reset through /proc/self/clear_refs so only the training is counted). Each case runs in a
  fresh process with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``, its initial
  value) and one arena: by default glibc raises the threshold to the size of the first large
  block freed (up to 32 MiB), after which transient tensors come from the heap and their freed
  pages stay resident, so RSS also counts memory the training no longer holds (measured on the
  tiny preset: +12 % with SDPA, +37-48 % with eager attention, and varying run to run).
  With the threshold fixed, RSS growth follows the live tensor bytes, the quantity the planner
  estimates and the CPU counterpart of CUDA's ``max_memory_allocated``. ``--malloc default``
  measures glibc's default policy instead;
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (and
  ``max_memory_reserved``, which adds the caching allocator's slack, the planner's
  ``--memory-overhead`` on GPUs).

The estimate is weights + gradients + Adam states (fp32: 4 + 4 + 8 bytes per parameter, the ZeRO
paper's terms without partitioning) + activations of one micro-batch (Korthikanti et al. 2022,
adapted; see ``activation_bytes_per_layer``). Prints one line per case and writes JSON with --out.

    python bench/bench_memory.py                       # tiny and 125m presets, a few shapes
    python bench/bench_memory.py --cases 125m:1024:2:none:sdpa --steps 3
    (each case runs in a fresh subprocess so an earlier case's freed memory cannot hide a peak)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lite.model.model_config import ModelConfig  # noqa: E402
from megatron_lite.model.counting import num_parameters  # noqa: E402
from megatron_lite.planning import memory  # noqa: E402

DEFAULT_CASES = ["tiny:256:8:none:sdpa", "tiny:256:8:none:eager", "125m:1024:2:none:sdpa",
                 "125m:1024:2:full:sdpa", "125m:512:4:none:eager"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def estimate(cfg: ModelConfig, seq: int, mbs: int, recompute: str, flash: bool,
             padded_vocab: int, bytes_per_element: int = 4) -> dict:
    """Planner estimate (bytes) for one process, ZeRO-0, fp32 AdamW, gradients set to None
    between steps (``memory.peak_training_bytes(gradients_persist=False)``, as plan_run gives
    for ``--zero-stage 0``). ``total_bytes_grads_persist`` is the conservative W+G+O+act."""
    non_emb, total = num_parameters(cfg)
    n = total + (padded_vocab - cfg.vocab_size) * cfg.hidden_size * (
        1 if cfg.tie_word_embeddings else 2)
    states = memory.model_state_memory(n, 1, 0, "fp32")
    act = memory.activation_memory(seq, mbs, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_query_groups, cfg.ffn_hidden_size, cfg.num_layers,
                                   padded_vocab, 1, False, flash, recompute, bytes_per_element,
                                   cfg.recompute_num_layers, fused_norm=True)
    head = (n - non_emb) // 2  # the LM head (V_pad x h), also the largest tensor
    step = memory.optimizer_step_working_bytes(head, fused=True)  # fused AdamW, as we train
    return {"params": n, "states_bytes": states.total, "activations_bytes": act.total,
            "optimizer_step_bytes": step,
            "total_bytes": memory.peak_training_bytes(states, act, False,
                                                      4 * (head + cfg.hidden_size), step),
            "total_bytes_grads_persist": memory.peak_training_bytes(states, act, True, 0, step)}


def _warmup(preset: str, backend: str, recompute: str, dev: torch.device) -> None:
    """One step of a 16-token, 256-word model of the same kind, so the runtime's one-time
    allocations (thread pools, kernel workspaces, autograd engine) happen before the baseline:
    the estimate covers the training state, not the process's fixed cost."""
    import gc

    from megatron_lite.model.llama import LlamaModel

    cfg = ModelConfig(model_size=preset, vocab_size=256, seq_length=16, max_position_embeddings=16,
                      attention_backend=backend, num_layers=1,
                      recompute_granularity=None if recompute == "none" else recompute)
    model = LlamaModel(cfg, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 256, (1, 16), device=dev)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(tokens, labels=tokens).mean().backward()
        opt.step()
    del model, opt
    gc.collect()


def run_case(spec: str, steps: int, vocab: int, device: str) -> dict:
    """Train ``steps`` AdamW steps of one case "preset:seq:mbs:recompute:backend"; measure peak."""
    from megatron_lite.model.llama import LlamaModel

    preset, seq, mbs, recompute, backend = spec.split(":")
    seq, mbs = int(seq), int(mbs)
    cfg = ModelConfig(model_size=preset, vocab_size=vocab, seq_length=seq,
                      max_position_embeddings=seq, attention_backend=backend,
                      recompute_granularity=None if recompute == "none" else recompute)
    cfg.validate(1)
    dev = torch.device(device)
    _warmup(preset, backend, recompute, dev)
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (mbs, seq), device=dev)
    labels = torch.randint(0, vocab, (mbs, seq), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base_kib = _status_kib("VmRSS")
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs); Linux needed")
    t0 = time.perf_counter()
    model = LlamaModel(cfg, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as --optimizer adamw builds it
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        opt.step()
    extra = {}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        extra = {"cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                 "cuda_max_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
                 "cuda_baseline_allocated_bytes": base}
    else:
        measured = (_status_kib("VmHWM") - base_kib) * 1024
        extra = {"malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
                 "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", "default")}
    seconds = time.perf_counter() - t0
    est = estimate(cfg, seq, mbs, recompute, backend != "eager", model.padded_vocab_size)
    del model, opt
    return {"case": spec, "device": device, "steps": steps, "seconds": seconds,
            "measured_bytes": measured, **est, **extra,
            "estimate_over_measured": est["total_bytes"] / measured}


def case_env(malloc: str) -> dict:
    """Environment of a measured case: glibc's mmap threshold fixed at its initial 128 KiB (so
    freed tensors leave RSS at once) and one arena, unless ``malloc == "default"``."""
    env = dict(os.environ)
    if malloc == "fixed":
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="1")
    return env


def main(argv=None) -> int:
    """Run the cases (each in this process, one after another) and print/write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                   help="preset:seq_length:micro_batch:recompute(none|full|selective):backend")
    p.add_argument("--steps", type=int, default=2, help="AdamW steps (states exist from step 1)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="CPU: 'fixed' glibc mmap threshold (RSS follows live tensors; default) or "
                        "glibc's 'default' dynamic threshold (RSS keeps freed heap pages)")
    p.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--single", action="store_true",
                   help="internal: run the one case in this process and print its JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.single:
        print("RESULT " + json.dumps(run_case(args.cases[0], args.steps, args.vocab_size,
                                              args.device)))
        return 0
    results = []
    what = ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
            f"peak RSS growth, malloc {args.malloc}")
    print(f"measured = {what}; estimate = megatron_lite.planning.memory")
    print(f"{'case':<26}{'params':>12}{'measured MiB':>14}{'estimate MiB':>14}{'est/meas':>10}"
          f"{'states MiB':>12}{'act MiB':>10}{'s':>7}")
    for spec in args.cases:
        # a fresh process per case: memory freed by one case would hide the next one's peak
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", "--cases",
                               spec, "--steps", str(args.steps), "--vocab-size",
                               str(args.vocab_size), "--device", args.device],
                              capture_output=True, text=True, env=case_env(args.malloc))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(lines[0][len("RESULT "):])
        results.append(r)
        mib = 1024 ** 2
        print(f"{spec:<26}{r['params']:>12,}{r['measured_bytes'] / mib:>14.1f}"
              f"{r['total_bytes'] / mib:>14.1f}{r['estimate_over_measured']:>10.3f}"
              f"{r['states_bytes'] / mib:>12.1f}{r['activations_bytes'] / mib:>10.1f}"
              f"{r['seconds']:>7.1f}", flush=True)
        if "cuda_max_memory_reserved_bytes" in r:
            print(f"{'':<26}cuda max_memory_allocated {r['cuda_max_memory_allocated_bytes'] / mib:.1f}"
                  f" MiB, max_memory_reserved {r['cuda_max_memory_reserved_bytes'] / mib:.1f} MiB",
                  flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
