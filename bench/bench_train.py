#!/usr/bin/env python
"""Training throughput on this machine: our ``LlamaModel`` vs HF ``LlamaForCausalLM``, same config.

Both models get the same architecture (default: the CPU quickstart's model: hidden 256, 4 layers,
8 heads, 4 KV groups, SwiGLU 704, seq 256, vocab 4096), the same batch, the same thread count and
the same optimizer (torch's fused AdamW, betas (0.9, 0.95), eps 1e-8, wd 0.1); one measured step is
forward + backward + AdamW step + zero_grad on one process (TP = 1, no DeepSpeed). Rounds
alternate between the two models so that load from other processes hits both alike; the median
over rounds is reported, with the ratio ours / HF and the median of the per-round ratios (the
issue's aim: >= 1.2). On a machine shared with other jobs the per-round figures swing by 2x;
use more --rounds there.

    python bench/bench_train.py                      # quickstart config, 2 threads
    python bench/bench_train.py --threads 1 --micro-batch-size 4 --rounds 5
    python bench/bench_train.py --profile            # top ops of each model (torch.profiler)
    python bench/bench_train.py --threads 1 --clock cpu   # CPU seconds: robust on a busy machine
    python bench/bench_train.py --no-compile              # eager only (skips minutes of compiling)

With compilation (default) two more variants run in the same rounds: ours with ``--compile``'s
per-block compile (``megatron_lite/model/compile.py``) and HF with each ``LlamaDecoderLayer``
compiled the same way, both inductor; printed: compile time, tokens/s of all four, compiled/eager
for each model and ours/HF with both compiled. ``--row-cu-seqlens`` gives ours the per-row
``cu_seqlens`` training always passes (attention then runs eagerly between two graphs per block).

Measured with compilation (2026-12-07, shared machine at load 13-57, so ``--threads 1 --clock
cpu``, 3 rounds x 2 steps): ours eager 2055, ours compiled 2277 (1.108x), HF eager 1931, HF
compiled 2050 (1.061x) tokens/CPU-s; ours/HF both compiled 1.111. With ``--row-cu-seqlens``
(attention eager between graphs): ours compiled/eager 1.010, HF 1.020, ours/HF compiled 1.062.

Prints figures only; nothing here is asserted.

Measured on a quiet machine (2026-11-29 23:05, load 0.3, 2 threads, 5 rounds, both models with
fused AdamW): ours 1904 tok/s, HF 1817 tok/s, ratio 1.048 (per round 0.98-1.09). The profiled
step: ours GEMM 726 ms + SDPA 167 ms + everything else 108 ms; HF 739 + 163 + 155 ms. The GEMMs
(the same MKL calls in both models) run at ~93 % of a 1024^3 fp32 matmul's rate and the SDPA
kernel is the same, so the printed ceiling, HF's step over our GEMM + attention time, is 1.18:
even with every other op of ours free the 1.2x aim is out of reach on this CPU. (On a loaded
machine the ratio swings up to 1.3-2.2x, likely because ours runs fewer separate element-wise
kernels, each a synchronisation point of the thread pool; those
figures are not the comparison.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, default=704)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per step")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--attention-backend", default="auto",
                   help="ours: auto|sdpa|flex|eager|flash (HF always uses sdpa)")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--profile", action="store_true", help="print each model's top ops")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile variants (ours: --compile's per-block compile, "
                        "megatron_lite/model/compile.py; HF: each LlamaDecoderLayer compiled the same way)")
    p.add_argument("--row-cu-seqlens", action="store_true",
                   help="pass ours the per-row cu_seqlens that training's collate always gives (under "
                        "--compile attention then runs between two graphs); default: none (in-graph SDPA)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds (user + system, "
                        "page faults included), far less sensitive to other jobs on a shared "
                        "machine; only meaningful with --threads 1 (idle OpenMP threads spin)")
    return p.parse_args(argv)


def build_models(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel

    cfg = ModelConfig(hidden_size=args.hidden_size, num_layers=args.num_layers,
                      num_attention_heads=args.num_attention_heads,
                      num_query_groups=args.num_query_groups,
                      ffn_hidden_size=args.ffn_hidden_size, seq_length=args.seq_length,
                      max_position_embeddings=args.seq_length, vocab_size=args.vocab_size,
                      attention_backend=args.attention_backend)
    torch.manual_seed(0)
    ours = LlamaModel(cfg)
    hf_cfg = LlamaConfig(vocab_size=cfg.padded_vocab_size(1), hidden_size=args.hidden_size,
                         intermediate_size=args.ffn_hidden_size,
                         num_hidden_layers=args.num_layers,
                         num_attention_heads=args.num_attention_heads,
                         num_key_value_heads=args.num_query_groups,
                         max_position_embeddings=args.seq_length, rms_norm_eps=cfg.norm_epsilon,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg)
    return cfg, ours, hf


def compiled_copies(ours, hf):
    """Copies of both models with every block compiled (inductor), weights equal to the eager ones:
    ours by ``compile_transformer_blocks`` (what ``--compile`` does), HF's decoder layers by
    ``nn.Module.compile`` one by one (torchtitan's per-block scheme, the same for both)."""
    import copy

    from megatron_lite.model.compile import compile_transformer_blocks

    ours_c, hf_c = copy.deepcopy(ours), copy.deepcopy(hf)
    compile_transformer_blocks(ours_c, "inductor")
    for layer in hf_c.model.layers:
        layer.compile(backend="inductor")
    return ours_c, hf_c


def make_step(model, kind, tokens, labels, cu_seqlens=None):
    import torch

    # fused=True for both: what --optimizer adamw builds, and HF Trainer's default optim
    # ("adamw_torch_fused" with torch >= 2.8, transformers' TrainingArguments).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=True)

    def step():
        if kind == "ours":
            loss = model(tokens, cu_seqlens=cu_seqlens, labels=labels).mean()
        else:
            # HF shifts labels inside; pass the unshifted tokens so both score s - 1 targets.
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def step_breakdown(step, n: int = 2) -> dict:
    """Mean self CPU seconds per step of ``step`` by class of op (torch.profiler, ``n`` steps).

    Returns:
        ``{"gemm", "attention", "other", "total"}`` in seconds: ``aten::mm/addmm/bmm`` (the
        linear layers and LM head, forward and backward), SDPA's forward and backward kernels,
        and all the rest (norms, SwiGLU, RoPE, cross entropy, embedding, AdamW, glue).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    gemm = attn = total = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6 / n
        total += t
        if ev.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            gemm += t
        elif "scaled_dot_product" in ev.key:
            attn += t
    return {"gemm": gemm, "attention": attn, "other": total - gemm - attn, "total": total}


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg, ours, hf = build_models(args)
    b, s = args.micro_batch_size, args.seq_length
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=g)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32) if args.row_cu_seqlens else None
    steps = {"ours": make_step(ours.train(), "ours", tokens, labels, cu),
             "hf": make_step(hf.train(), "hf", tokens, labels)}
    if not args.no_compile:
        ours_c, hf_c = compiled_copies(ours, hf)
        steps["ours_compiled"] = make_step(ours_c.train(), "ours", tokens, labels, cu)
        steps["hf_compiled"] = make_step(hf_c.train(), "hf", tokens, labels)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    backend = ours._attention_backend(torch.zeros(1, dtype=cfg.torch_dtype))
    print(f"config: hidden {args.hidden_size}, layers {args.num_layers}, heads "
          f"{args.num_attention_heads}/{args.num_query_groups} kv, ffn {args.ffn_hidden_size}, "
          f"seq {s}, vocab {args.vocab_size}; batch {b} x {s} = {b * s} tokens/step; "
          f"threads {torch.get_num_threads()}; fp32; AdamW step included")
    print(f"parameters: ours {n_ours:,}  HF {n_hf:,}; our attention backend: {backend}; "
          f"torch {torch.__version__}")
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        if name.endswith("compiled"):
            print(f"{name}: compile + {args.warmup} warm-up steps {time.perf_counter() - t0:.1f} s", flush=True)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        print("warning: --clock cpu with more than one thread counts spinning OpenMP threads; "
              "use --threads 1", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}; load average at start {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    rates = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t0 = clock()
            for _ in range(args.steps):
                step()
            dt = clock() - t0
            rates[name].append(b * s * args.steps / dt)
        per = "tok/s" if args.clock == "wall" else "tok/CPU-s"
        print(f"round {r + 1}: " + "   ".join(f"{name} {rates[name][-1]:8.1f} {per}" for name in steps)
              + f"   ratio ours/HF {rates['ours'][-1] / rates['hf'][-1]:.3f}", flush=True)
    med = {name: statistics.median(r) for name, r in rates.items()}
    mo, mh = med["ours"], med["hf"]
    paired = statistics.median(o / h for o, h in zip(rates["ours"], rates["hf"]))
    unit = "tokens/s" if args.clock == "wall" else "tokens per CPU-second"
    print(f"median {unit}: ours {mo:.1f}  HF LlamaForCausalLM {mh:.1f}  ratio ours/HF "
          f"{mo / mh:.3f}; median of per-round ratios {paired:.3f} (aim >= 1.2); load average "
          f"now {os.getloadavg()[0]:.1f}")
    if not args.no_compile:
        def paired_of(x, y):
            return statistics.median(a / b for a, b in zip(rates[x], rates[y]))
        print(f"compiled (median {unit}): ours {med['ours_compiled']:.1f}  HF {med['hf_compiled']:.1f}; "
              f"ours compiled/eager {med['ours_compiled'] / mo:.3f} (per round "
              f"{paired_of('ours_compiled', 'ours'):.3f}), HF compiled/eager {med['hf_compiled'] / mh:.3f} "
              f"(per round {paired_of('hf_compiled', 'hf'):.3f}), ours/HF both compiled "
              f"{med['ours_compiled'] / med['hf_compiled']:.3f} (per round "
              f"{paired_of('ours_compiled', 'hf_compiled'):.3f})")
    from megatron_lite.model.counting import flops_per_token
    from megatron_lite.training.metrics import measure_cpu_matmul_tflops

    fpt = flops_per_token(cfg, s)
    if args.clock == "wall":
        peak = measure_cpu_matmul_tflops(torch.float32) * 1e3
    else:  # the same clock as the rates: 2 n^3 FLOPs per 1024^3 matmul per CPU-second
        x = torch.randn(1024, 1024)
        torch.mm(x, x)
        t0 = time.process_time()
        for _ in range(5):
            torch.mm(x, x)
        peak = 5 * 2 * 1024 ** 3 / (time.process_time() - t0) / 1e9
    print(f"training FLOPs/token {fpt / 1e6:.2f} M (megatron_lite.model.counting); achieved "
          f"GFLOP/s: ours {fpt * mo / 1e9:.2f}, HF {fpt * mh / 1e9:.2f}; measured fp32 matmul "
          f"peak {peak:.1f} GFLOP/s at {torch.get_num_threads()} thread(s) -> MFU ours "
          f"{fpt * mo / 1e9 / peak * 100:.1f}%, HF {fpt * mh / 1e9 / peak * 100:.1f}%")
    # Where the step's time goes, and what that allows: both models run the same GEMMs (MKL) and
    # the same SDPA kernel, so even with every other op of ours free the ratio cannot exceed
    # HF's step time / (our GEMM + attention time).
    parts = {name: step_breakdown(steps[name]) for name in ("ours", "hf")}
    for name, p in parts.items():
        print(f"profiled step, {name}: GEMM {p['gemm'] * 1e3:.0f} ms, attention (SDPA fwd+bwd) "
              f"{p['attention'] * 1e3:.0f} ms, everything else {p['other'] * 1e3:.0f} ms "
              f"(total self CPU {p['total'] * 1e3:.0f} ms)")
    ceiling = parts["hf"]["total"] / (parts["ours"]["gemm"] + parts["ours"]["attention"])
    print(f"ceiling: with all our non-GEMM, non-attention time removed the ratio would be "
          f"{ceiling:.2f} (HF total / our GEMM + attention); ours now removes "
          f"{(parts['hf']['other'] - parts['ours']['other']) * 1e3:.0f} ms of HF's "
          f"{parts['hf']['other'] * 1e3:.0f} ms of other ops")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            print(f"\n== {name}: top ops by self CPU time (one step)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return {"ours_tokens_per_sec": mo, "hf_tokens_per_sec": mh, "ratio": mo / mh,
            "paired_ratio": paired, "median_tokens_per_sec": med}


if __name__ == "__main__":
    main()
