#!/usr/bin/env python
"""Perplexity of a checkpoint on a dataset prefix, plain or sliding-window (issue 4, item 8).

The stream is the dataset's documents concatenated in on-disk order, EOD tokens included,
optionally cut to ``--max-tokens``; windows of ``--seq-length`` tokens start every ``--stride``
tokens (default: the window length, i.e. plain non-overlapping evaluation) and each window scores
only targets no earlier window scored, so every token after the first is scored exactly once.
The definition is in ``megatron_lite/eval/perplexity.py``.

Examples::

    python tools/eval_ppl.py --load runs/tiny --data-path data/val_text_document --json
    torchrun --nproc_per_node 2 tools/eval_ppl.py --tp 2 --load runs/tiny \\
        --data-path data/val_text_document --seq-length 256 --stride 128
    python tools/eval_ppl.py --load-format hf --load hf_llama/ --data-path data/val_text_document

With ``--json`` rank 0 prints one line ``{"ppl": ..., "nll": ..., "tokens": ...}`` (``nll`` in
nats per token, ``tokens`` = targets scored). Windows are shared out over the data-parallel ranks
(world / TP); the TP ranks of a group evaluate the same windows together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our --save folder / checkpoint folder, or a "
                   "HuggingFace folder with --load-format hf")
    p.add_argument("--load-format", default="megatron_lite", choices=["megatron_lite", "hf"],
                   help="checkpoint format (default: megatron_lite)")
    p.add_argument("--data-path", required=True, help="dataset prefix (without .bin/.idx)")
    p.add_argument("--seq-length", type=int, default=None, help="window length in tokens "
                   "(default: the checkpoint's --seq-length)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts, in "
                   "[1, --seq-length] (default: --seq-length, plain evaluation)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first this "
                   "many tokens of the stream")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="TP degree (launch this many processes per model with torchrun)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help='print {"ppl", "nll", "tokens"} as JSON')
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from megatron_lite import parallel
    from megatron_lite.data.indexed import IndexedDataset
    from megatron_lite.eval.loading import inference_session, load_model
    from megatron_lite.eval.perplexity import build_stream, stream_perplexity

    with inference_session(args.tp, args.device) as device:
        loaded = load_model(args.load, args.load_format, device)
        seq_length = args.seq_length or loaded.seq_length
        if not seq_length:
            raise SystemExit("eval_ppl: the checkpoint names no sequence length; pass --seq-length")
        stream = build_stream(IndexedDataset(args.data_path), args.max_tokens)
        top = int(stream.max())
        if top >= loaded.vocab_size:
            raise SystemExit(f"eval_ppl: {args.data_path} holds token id {top} but the model's "
                             f"vocabulary has {loaded.vocab_size} entries: the data was made "
                             "with a different tokenizer")
        result = stream_perplexity(
            loaded.loss, stream, seq_length, args.stride, micro_batch_size=args.micro_batch_size,
            dp_rank=parallel.get_data_parallel_rank(),
            dp_size=parallel.get_data_parallel_world_size(),
            dp_group=parallel.get_data_parallel_group(), device=device,
            progress=args.progress)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                stride = args.stride or seq_length
                print(f"perplexity {result['ppl']:.4f} | nll {result['nll']:.6f} nats/token | "
                      f"{result['tokens']} tokens scored | seq_length {seq_length} stride "
                      f"{stride} | {args.load} ({args.load_format}) on {args.data_path}",
                      flush=True)
        return result


if __name__ == "__main__":
    main()
