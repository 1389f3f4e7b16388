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
    python bench/bench_memory.py --cases 125m:2048:1:none:sdpa:fused 125m:2048:1:none:sdpa:chunked \
        --vocab-size 128256 --steps 3          # the LM-head loss with and without chunking
    (each case runs in a fresh subprocess so an earlier case's freed memory cannot hide a peak)
    python bench/bench_memory.py --sequence-parallel-compare 125m:1024:2:none:sdpa
        (activation memory per rank at TP=2 with and without --sequence-parallel, 2 gloo processes)
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
                                   cfg.recompute_num_layers, fused_norm=True,
                                   cross_entropy_chunk_tokens=cfg.cross_entropy_chunk_size
                                   if cfg.cross_entropy_impl == "chunked" else None)
    head = (n - non_emb) // 2  # the LM head (V_pad x h), also the largest tensor
    step = memory.optimizer_step_working_bytes(head, fused=True)  # fused AdamW, as we train
    return {"params": n, "states_bytes": states.total, "activations_bytes": act.total,
            "loss_logits_bytes": act.loss_logits,
            "optimizer_step_bytes": step,
            "total_bytes": memory.peak_training_bytes(states, act, False,
                                                      4 * (head + cfg.hidden_size), step),
            "total_bytes_grads_persist": memory.peak_training_bytes(states, act, True, 0, step)}


def _warmup(preset: str, backend: str, recompute: str, dev: torch.device, ce: str = "fused") -> None:
    """One step of a 16-token, 256-word model of the same kind, so the runtime's one-time
    allocations (thread pools, kernel workspaces, autograd engine) happen before the baseline:
    the estimate covers the training state, not the process's fixed cost."""
    import gc

    from megatron_lite.model.llama import LlamaModel

    cfg = ModelConfig(model_size=preset, vocab_size=256, seq_length=16, max_position_embeddings=16,
                      attention_backend=backend, num_layers=1, cross_entropy_impl=ce,
                      cross_entropy_chunk_size=8,
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


def run_case(spec: str, steps: int, vocab: int, device: str, chunk_size: int = 1024) -> dict:
    """Train ``steps`` AdamW steps of one case "preset:seq:mbs:recompute:backend[:ce]" (ce: the
    ``--cross-entropy-impl``, fused or chunked; default fused); measure peak and step time."""
    from megatron_lite.model.llama import LlamaModel

    preset, seq, mbs, recompute, backend, *rest = spec.split(":")
    seq, mbs, ce = int(seq), int(mbs), (rest[0] if rest else "fused")
    cfg = ModelConfig(model_size=preset, vocab_size=vocab, seq_length=seq,
                      max_position_embeddings=seq, attention_backend=backend,
                      cross_entropy_impl=ce, cross_entropy_chunk_size=chunk_size,
                      recompute_granularity=None if recompute == "none" else recompute)
    cfg.validate(1)
    dev = torch.device(device)
    _warmup(preset, backend, recompute, dev, ce)
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
    step_times, step_cpu = [], []
    for _ in range(steps):
        t_step, c_step = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t_step)
        step_cpu.append(time.process_time() - c_step)  # CPU seconds: robust on a shared machine
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
    # step time: the steps after the first (the first also builds the optimizer states)
    later, later_cpu = step_times[1:] or step_times, step_cpu[1:] or step_cpu
    return {"case": spec, "device": device, "steps": steps, "seconds": seconds,
            "cross_entropy_impl": ce, "cross_entropy_chunk_size": chunk_size, "vocab_size": vocab,
            "step_seconds": step_times, "step_seconds_mean": sum(later) / len(later),
            "step_cpu_seconds": step_cpu, "step_cpu_seconds_mean": sum(later_cpu) / len(later_cpu),
            "measured_bytes": measured, **est, **extra,
            "estimate_over_measured": est["total_bytes"] / measured}


def case_env(malloc: str) -> dict:
    """Environment of a measured case: glibc's mmap threshold fixed at its initial 128 KiB (so
    freed tensors leave RSS at once) and one arena, unless ``malloc == "default"``."""
    env = dict(os.environ)
    if malloc == "fixed":
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="1")
    return env


def print_cross_entropy_comparison(results: list[dict]) -> None:
    """For each case run with both ``--cross-entropy-impl`` values (same shape and vocabulary):
    the measured peak and the planner's estimate of each, the saving, and the step-time ratio."""
    mib = 1024 ** 2
    by_key = {}
    for r in results:
        base = ":".join(r["case"].split(":")[:5])
        by_key.setdefault((base, r["vocab_size"]), {})[r["cross_entropy_impl"]] = r
    for (base, vocab), pair in by_key.items():
        if set(pair) != {"fused", "chunked"}:
            continue
        f, c = pair["fused"], pair["chunked"]
        print(f"chunked CE ({c['cross_entropy_chunk_size']} tokens/chunk) vs fused, {base}, vocab "
              f"{vocab}: measured peak {f['measured_bytes'] / mib:.1f} -> {c['measured_bytes'] / mib:.1f}"
              f" MiB (saves {(f['measured_bytes'] - c['measured_bytes']) / mib:.1f}); planner "
              f"{f['total_bytes'] / mib:.1f} -> {c['total_bytes'] / mib:.1f} MiB (saves "
              f"{(f['total_bytes'] - c['total_bytes']) / mib:.1f}; logits terms "
              f"{f['loss_logits_bytes'] / mib:.1f} -> {c['loss_logits_bytes'] / mib:.1f}); step time "
              f"{f['step_seconds_mean']:.2f} -> {c['step_seconds_mean']:.2f} s "
              f"(x{c['step_seconds_mean'] / f['step_seconds_mean']:.3f}), CPU time "
              f"{f['step_cpu_seconds_mean']:.2f} -> {c['step_cpu_seconds_mean']:.2f} s "
              f"(x{c['step_cpu_seconds_mean'] / f['step_cpu_seconds_mean']:.3f})", flush=True)


def main(argv=None) -> int:
    """Run the cases (each in this process, one after another) and print/write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                   help="preset:seq_length:micro_batch:recompute(none|full|selective):backend"
                        "[:fused|chunked] (the last field: --cross-entropy-impl, default fused)")
    p.add_argument("--steps", type=int, default=2, help="AdamW steps (states exist from step 1)")
    p.add_argument("--vocab-size", type=int, nargs="+", default=[32000],
                   help="vocabulary size(s); every case runs with each")
    p.add_argument("--cross-entropy-chunk-size", type=int, default=1024,
                   help="tokens per chunk of the cases ending in :chunked")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="CPU: 'fixed' glibc mmap threshold (RSS follows live tensors; default) or "
                        "glibc's 'default' dynamic threshold (RSS keeps freed heap pages)")
    p.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    p.add_argument("--sequence-parallel-compare", metavar="CASE", default=None,
                   help="preset:seq_length:micro_batch:recompute:backend: measure one forward+backward "
                        "per TP rank at --tp with and without sequence parallelism (CPU, gloo)")
    p.add_argument("--tp", type=int, default=2, help="TP degree of --sequence-parallel-compare")
    p.add_argument("--single", action="store_true",
                   help="internal: run the one case in this process and print its JSON")
    args = p.parse_args(argv)
    if args.sequence_parallel_compare:
        if args.malloc == "fixed" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
            # glibc reads the variables at start-up: run again in a process that has them
            return subprocess.run([sys.executable, os.path.abspath(__file__),
                                   *(sys.argv[1:] if argv is None else argv)], env=case_env("fixed")).returncode
        vocab = args.vocab_size[0] if isinstance(args.vocab_size, list) else args.vocab_size
        rows = sequence_parallel_compare(args.sequence_parallel_compare, vocab, args.tp)
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=2)
            os.replace(tmp, args.out)
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.single:
        print("RESULT " + json.dumps(run_case(args.cases[0], args.steps, args.vocab_size[0],
                                              args.device, args.cross_entropy_chunk_size)))
        return 0
    results = []
    what = ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
            f"peak RSS growth, malloc {args.malloc}")
    print(f"measured = {what}; estimate = megatron_lite.planning.memory")
    print(f"{'case':<34}{'vocab':>7}{'params':>12}{'measured MiB':>14}{'estimate MiB':>14}"
          f"{'est/meas':>10}{'states MiB':>12}{'act MiB':>10}{'step s':>8}{'s':>7}")
    for spec, vocab in [(c, v) for v in args.vocab_size for c in args.cases]:
        # a fresh process per case: memory freed by one case would hide the next one's peak
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--single", "--cases",
                               spec, "--steps", str(args.steps), "--vocab-size", str(vocab),
                               "--device", args.device, "--cross-entropy-chunk-size",
                               str(args.cross_entropy_chunk_size)],
                              capture_output=True, text=True, env=case_env(args.malloc))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(lines[0][len("RESULT "):])
        results.append(r)
        mib = 1024 ** 2
        print(f"{spec:<34}{vocab:>7}{r['params']:>12,}{r['measured_bytes'] / mib:>14.1f}"
              f"{r['total_bytes'] / mib:>14.1f}{r['estimate_over_measured']:>10.3f}"
              f"{r['states_bytes'] / mib:>12.1f}{r['activations_bytes'] / mib:>10.1f}"
              f"{r['step_seconds_mean']:>8.2f}{r['seconds']:>7.1f}", flush=True)
        if "cuda_max_memory_reserved_bytes" in r:
            print(f"{'':<26}cuda max_memory_allocated {r['cuda_max_memory_allocated_bytes'] / mib:.1f}"
                  f" MiB, max_memory_reserved {r['cuda_max_memory_reserved_bytes'] / mib:.1f} MiB",
                  flush=True)
    print_cross_entropy_comparison(results)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.out)
    return 0


# ----------------------------------------------------------------------------- sequence parallelism
def _saved_activation_bytes(model, run) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` builds the graph
    (parameters excluded): the activation memory the planner estimates, without the allocator's
    transients."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


def _sp_worker(rank: int, world: int, port: int, spec: str, sp: bool, vocab: int, out: str) -> None:
    """One TP rank: forward + backward of one micro-batch, with or without sequence parallelism."""
    import torch.distributed as dist

    from megatron_lite import parallel
    from megatron_lite.model.llama import LlamaModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel.initialize_model_parallel(world)
    preset, seq, mbs, recompute, backend = spec.split(":")[:5]
    cfg = ModelConfig(model_size=preset, vocab_size=vocab, seq_length=int(seq), max_position_embeddings=int(seq),
                      attention_backend=backend, sequence_parallel=sp,
                      recompute_granularity=None if recompute == "none" else recompute)
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    tokens = torch.randint(0, vocab, (int(mbs), int(seq)), generator=torch.Generator().manual_seed(1))
    model(tokens, labels=tokens).mean().backward()  # one-time allocations before the baseline
    model.zero_grad(set_to_none=False)              # gradients exist: only activations grow below
    base_kib = _status_kib("VmRSS")
    _reset_peak_rss()
    loss, saved = _saved_activation_bytes(model, lambda: model(tokens, labels=tokens).mean())
    fwd_peak = (_status_kib("VmHWM") - base_kib) * 1024
    loss.backward()
    peak = (_status_kib("VmHWM") - base_kib) * 1024
    est = memory.activation_memory(int(seq), int(mbs), cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_query_groups, cfg.ffn_hidden_size, cfg.num_layers,
                                   model.padded_vocab_size, world, sp, backend != "eager", recompute, 4,
                                   cfg.recompute_num_layers, fused_norm=True)
    res = {"case": spec, "tp": world, "sequence_parallel": sp, "saved_activation_bytes": saved,
           "forward_peak_rss_bytes": fwd_peak, "peak_rss_bytes": peak, "estimate_bytes": est.total,
           "estimate_layers_bytes": est.layers, "estimate_output_layer_bytes": est.output_layer}
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def sequence_parallel_compare(spec: str, vocab: int, tp: int = 2) -> list[dict]:
    """Activation memory per TP rank with and without ``--sequence-parallel`` (CPU, gloo, ``tp``
    forked processes per setting; ``main`` fixes glibc's mmap threshold as for the other cases): the bytes
    autograd saves for backward (the planner's quantity), the peak RSS growth of forward and of
    forward + backward, and the planner's ``activation_memory`` (fp32, fused norm) beside them."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    for sp in (False, True):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.start_processes(_sp_worker, args=(tp, port, spec, sp, vocab, out), nprocs=tp, join=True,
                               start_method="fork")
            with open(out) as f:
                rows += json.load(f)
    mib = 1024 ** 2
    print(f"activation memory per TP rank, TP={tp}, {spec}, vocab {vocab} (fp32, CPU, gloo)")
    print(f"{'SP':<5}{'rank':>5}{'saved for bwd MiB':>19}{'planner MiB':>13}{'saved/planner':>15}"
          f"{'fwd peak RSS MiB':>18}{'fwd+bwd peak RSS MiB':>22}")
    for r, rank in zip(rows, list(range(tp)) * 2):
        print(f"{'on' if r['sequence_parallel'] else 'off':<5}{rank:>5}{r['saved_activation_bytes'] / mib:>19.1f}"
              f"{r['estimate_bytes'] / mib:>13.1f}{r['saved_activation_bytes'] / r['estimate_bytes']:>15.3f}"
              f"{r['forward_peak_rss_bytes'] / mib:>18.1f}{r['peak_rss_bytes'] / mib:>22.1f}")
    off, on = rows[0], rows[tp]
    for key, what in (("saved_activation_bytes", "saved activations"), ("estimate_bytes", "planner"),
                      ("peak_rss_bytes", "fwd+bwd peak RSS")):
        print(f"SP reduction, {what}: {off[key] / mib:.1f} -> {on[key] / mib:.1f} MiB "
              f"({100 * (1 - on[key] / off[key]):.1f} % less)")
    return rows


if __name__ == "__main__":
    sys.exit(main())
