#!/usr/bin/env python
"""Attention-backend and fused-RoPE throughput on this machine (forward + backward, tokens/s).

Three tables, each at several sequence lengths (default 256, 1024, 2048 tokens), packed rows of
``--docs-per-row`` equal documents (cu_seqlens), ratios side by side:

1. attention kernel alone, per backend available on the device (eager, sdpa, flex, flash);
   ratio = backend / eager. On CPU flex has no backward in torch 2.13, so it is timed forward only
   (marked ``fwd``) and left out of the ratio column. Then sdpa's two document strategies
   (per-document loop vs dense block-diagonal mask) by document length at the longest s.
2. RoPE on q and k: the fused custom op (``megatron_lite._rope_ops``) vs the PyTorch reference.
3. the whole ``LlamaModel`` (small config, TP = 1, fp32 or bf16) per backend and fused / reference RoPE.

    python bench/bench_model.py                         # CPU: all tables, default sizes
    python bench/bench_model.py --seq-lengths 256 1024 --iters 3 --no-model
    python bench/bench_model.py --device cuda --dtype bf16

Tokens/s = b * s / median step seconds. Prints figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lite.model.attention import attention_forward, flash_attn_available  # noqa: E402
from megatron_lite.ops.rope import fused_rope, fused_rope_available, rope_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[256, 1024, 2048], help="tokens per row")
    p.add_argument("--micro-batch-size", type=int, default=2, help="rows per step")
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=8)
    p.add_argument("--kv-channels", type=int, default=64, help="head dim")
    p.add_argument("--docs-per-row", type=int, default=4, help="equal documents packed in each row")
    p.add_argument("--iters", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model table")
    p.add_argument("--model-hidden-size", type=int, default=256)
    p.add_argument("--model-num-layers", type=int, default=2)
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_median(steps: dict, device, rounds: int, warmup: int) -> dict:
    """Median seconds per step for each named callable; rounds alternate between them so that load
    from other processes on a shared machine hits every candidate alike. A step that raises is
    reported on stderr and gets None."""
    times = {name: [] for name in steps}
    live = dict(steps)
    for r in range(warmup + rounds):
        for name, step in list(live.items()):
            try:
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
            except Exception as exc:  # a backend may lack a kernel here: report and go on
                print(f"  [{name}: {type(exc).__name__}: {str(exc)[:120]}]", file=sys.stderr)
                del live[name]
                times[name] = None
                continue
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t) if t else None) for name, t in times.items()}


def cu_seqlens_for(b, s, docs, device):
    doc = s // docs
    bounds = sorted({r * s + min(i * doc, s) for r in range(b) for i in range(docs)} | {b * s})
    return torch.tensor(bounds, dtype=torch.int32, device=device), max(doc, s - (docs - 1) * doc)


def available_backends(device, dtype):
    names = ["eager", "sdpa", "flex"]
    if device.type == "cuda" and dtype != torch.float32 and flash_attn_available():
        names.append("flash")
    return names


def bench_attention(args, device, dtype):
    b, hq, hk, d = args.micro_batch_size, args.num_attention_heads, args.num_query_groups, args.kv_channels
    backends = available_backends(device, dtype)
    print(f"\n## attention fwd+bwd, tokens/s (b={b}, {hq} q heads / {hk} kv heads x {d}, "
          f"{args.docs_per_row} docs/row, {args.dtype}); ratio = backend / eager")
    print(f"{'seq':>6} " + " ".join(f"{n:>14} {'ratio':>6}" for n in backends))
    for s in args.seq_lengths:
        cu, max_len = cu_seqlens_for(b, s, args.docs_per_row, device)
        q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hk, hk))
        steps = {}
        for name in backends:
            fwd_only = name == "flex" and device.type == "cpu"

            def step(name=name, fwd_only=fwd_only):
                if fwd_only:
                    with torch.no_grad():
                        attention_forward(q, k, v, cu, max_len, name)
                    return
                out = attention_forward(q, k, v, cu, max_len, name)
                out.float().sum().backward()
                q.grad = k.grad = v.grad = None

            steps[name] = step
        secs = interleaved_median(steps, device, args.iters, args.warmup)
        eager_tps = b * s / secs["eager"] if secs["eager"] else None
        cells = []
        for name in backends:
            if secs[name] is None:
                cells.append(f"{'error':>14} {'':>6}")
                continue
            tps = b * s / secs[name]
            fwd_only = name == "flex" and device.type == "cpu"
            ratio = "fwd" if fwd_only else (f"{tps / eager_tps:.2f}" if eager_tps else "-")
            cells.append(f"{tps:>14,.0f} {ratio:>6}")
        print(f"{s:>6} " + " ".join(cells))


def bench_sdpa_strategy(args, device, dtype):
    """Per-document SDPA loop vs one dense block-diagonal masked call, by document length; this is
    what sets ``attention._MIN_AVG_DOC_TOKENS_FOR_LOOP``."""
    from megatron_lite.model import attention as attn

    b, hq, hk, d = args.micro_batch_size, args.num_attention_heads, args.num_query_groups, args.kv_channels
    s = max(args.seq_lengths)
    print(f"\n## sdpa with documents, fwd+bwd tokens/s at s={s}: per-document loop vs dense mask "
          f"(threshold now {attn._MIN_AVG_DOC_TOKENS_FOR_LOOP} tokens/doc)")
    print(f"{'doc len':>8} {'loop':>12} {'dense':>12} {'loop/dense':>11}")
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hk, hk))
    old = attn._MIN_AVG_DOC_TOKENS_FOR_LOOP
    try:
        for doc in (32, 64, 128, 256, 512):
            if doc >= s:
                continue
            cu, max_len = cu_seqlens_for(b, s, s // doc, device)
            steps = {}
            for name, threshold in (("loop", 0), ("dense", 10 ** 9)):
                def step(threshold=threshold):
                    attn._MIN_AVG_DOC_TOKENS_FOR_LOOP = threshold
                    attention_forward(q, k, v, cu, max_len, "sdpa").float().sum().backward()
                    q.grad = k.grad = v.grad = None
                steps[name] = step
            t = interleaved_median(steps, device, args.iters, args.warmup)
            print(f"{doc:>8} {b * s / t['loop']:>12,.0f} {b * s / t['dense']:>12,.0f} {t['dense'] / t['loop']:>11.2f}")
    finally:
        attn._MIN_AVG_DOC_TOKENS_FOR_LOOP = old


def bench_rope(args, device, dtype):
    b, hq, hk, d = args.micro_batch_size, args.num_attention_heads, args.num_query_groups, args.kv_channels
    have = fused_rope_available()
    print(f"\n## RoPE on q and k, fwd+bwd, tokens/s (b={b}, {hq}+{hk} heads x {d}, {args.dtype}); "
          f"fused extension {'built' if have else 'NOT built (fused column = reference fallback)'}")
    print(f"{'seq':>6} {'reference':>14} {'fused':>14} {'fused/ref':>10}")
    for s in args.seq_lengths:
        q = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, s, hk, d, device=device, dtype=dtype, requires_grad=True)
        ang = torch.arange(s, device=device, dtype=torch.float32)[:, None] * torch.rand(d, device=device)
        cos, sin = ang.cos().expand(b, s, d).contiguous(), ang.sin().expand(b, s, d).contiguous()
        steps = {}
        for name, fn in (("reference", rope_reference), ("fused", fused_rope)):
            def step(fn=fn):
                (fn(q, cos, sin).float().sum() + fn(k, cos, sin).float().sum()).backward()
                q.grad = k.grad = None
            steps[name] = step
        res = {n: b * s / t for n, t in interleaved_median(steps, device, max(args.iters, 5), args.warmup).items()}
        print(f"{s:>6} {res['reference']:>14,.0f} {res['fused']:>14,.0f} {res['fused'] / res['reference']:>10.2f}")


def bench_model(args, device, dtype):
    try:
        from megatron_lite.model.model_config import ModelConfig
        from megatron_lite.model.llama import LlamaModel
    except ImportError as exc:
        print(f"\n## whole model: skipped ({exc})")
        return
    b = args.micro_batch_size
    h, nh = args.model_hidden_size, args.num_attention_heads
    backends = available_backends(device, dtype)
    if device.type == "cpu":
        backends.remove("flex")  # no CPU backward
    print(f"\n## LlamaModel fwd+bwd, tokens/s (hidden {h}, {args.model_num_layers} layers, {nh} heads, "
          f"{args.num_query_groups} kv groups, vocab 4096, b={b}, {args.docs_per_row} docs/row, {args.dtype})")
    cols = [(be, fused) for be in backends for fused in (False, True)]
    print(f"{'seq':>6} " + " ".join(f"{be + ('+fused' if f else '+ref'):>16}" for be, f in cols)
          + f" {'fused/ref (' + backends[-1] + ')':>22}")
    for s in args.seq_lengths:
        cu, max_len = cu_seqlens_for(b, s, args.docs_per_row, device)
        doc = s // args.docs_per_row
        pos = (torch.arange(s, device=device) % doc).expand(b, s).contiguous()
        tokens = torch.randint(0, 4096, (b, s), device=device)
        steps = {}
        for be, fused in cols:
            cfg = ModelConfig(hidden_size=h, num_layers=args.model_num_layers, num_attention_heads=nh,
                              num_query_groups=args.num_query_groups, ffn_hidden_size=4 * h // 3 // 64 * 64 or 64,
                              seq_length=s, max_position_embeddings=max(s, 4096), vocab_size=4096,
                              attention_backend=be, no_fused_rope=not fused)
            torch.manual_seed(0)
            model = LlamaModel(cfg).to(device=device, dtype=dtype)

            def step(model=model):
                loss = model(tokens, pos, cu, max_len, labels=tokens)
                loss.float().mean().backward()
                model.zero_grad(set_to_none=True)

            steps[(be, fused)] = step
        secs = interleaved_median(steps, device, args.iters, args.warmup)
        tps = {key: (b * s / t if t else None) for key, t in secs.items()}
        cells = [f"{tps[key]:>16,.0f}" if tps[key] else f"{'error':>16}" for key in cols]
        last = {fused: tps[(backends[-1], fused)] or float("nan") for fused in (False, True)}
        print(f"{s:>6} " + " ".join(cells) + f" {last[True] / last[False]:>22.2f}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    print(f"# bench_model: {platform.node()} {platform.machine()} {platform.processor() or ''} "
          f"cpus={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"device={device} gpu={gpu} flash_attn={flash_attn_available()} fused_rope={fused_rope_available()}")
    bench_attention(args, device, dtype)
    bench_sdpa_strategy(args, device, dtype)
    bench_rope(args, device, dtype)
    if not args.no_model:
        bench_model(args, device, dtype)


if __name__ == "__main__":
    main()
