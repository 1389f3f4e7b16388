#!/usr/bin/env python
"""Time of the LM head + loss alone, fused vs chunked (``--cross-entropy-impl``), in one process.

The head GEMM and the vocab-parallel cross entropy (forward and backward) of ``tokens`` tokens,
hidden size H and vocabulary V at TP = 1, each implementation in turn, ``--rounds`` times; the
first round is a warm-up and the rest are averaged. Times are CPU seconds of this process
(``time.process_time``, one thread), which a busy shared machine does not inflate the way it
inflates wall time; a whole training step (``bench/bench_memory.py``) varies by ~10 % from one step
to the next on CPU, more than the difference measured here.

    python bench/bench_cross_entropy.py --vocab-size 128256 --chunk-sizes 256 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lite.layers.lm_head_loss import lm_head_cross_entropy  # noqa: E402


def one_pass(hidden, weight, labels, vocab: int, impl: str, chunk: int) -> tuple[float, float]:
    """CPU seconds of (forward, backward) of one head + loss pass with an upstream of 1/N."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    t0 = time.process_time()
    loss = lm_head_cross_entropy(h, w, labels, vocab_size=vocab, impl=impl, chunk_size=chunk)
    t1 = time.process_time()
    (loss.sum() / labels.numel()).backward()
    return t1 - t0, time.process_time() - t1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="b*s tokens of one micro-batch")
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024])
    p.add_argument("--rounds", type=int, default=3, help="rounds (the first is a warm-up)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden_size)
    weight = torch.randn(args.vocab_size, args.hidden_size) * 0.02
    labels = torch.randint(0, args.vocab_size, (args.tokens,))
    variants = [("fused", 0)] + [("chunked", c) for c in args.chunk_sizes]
    times: dict = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:  # alternating, so a slow phase of the machine hits every variant
            times[v].append(one_pass(hidden, weight, labels, args.vocab_size, *v))
    print(f"tokens {args.tokens}, H {args.hidden_size}, V {args.vocab_size}; CPU seconds, mean of "
          f"{args.rounds - 1} rounds after a warm-up")
    base = None
    for (impl, chunk), ts in times.items():
        ts = ts[1:] or ts
        fwd, bwd = (sum(t[i] for t in ts) / len(ts) for i in (0, 1))
        base = base or fwd + bwd
        name = impl if impl == "fused" else f"chunked {chunk}"
        print(f"{name:<16} forward {fwd:7.3f}  backward {bwd:7.3f}  total {fwd + bwd:7.3f}  "
              f"(x{(fwd + bwd) / base:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
