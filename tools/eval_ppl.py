#!/usr/bin/env python
"""Perplexity of a checkpoint on a dataset prefix, plain or sliding-window (issue 4, item 8).

The stream is the dataset's documents concatenated in on-disk order, EOD tokens included,
optionally cut to ``--max-tokens``; windows of ``--seq-length`` tokens start every ``--stride``
tokens (default: the window length, i.e. plain non-overlapping evaluation) and each window scores
only targets no earlier window scored, so every token after the first is scored exactly once
(each window feeds L tokens and scores up to L targets). ``--window-convention hf`` computes the
HuggingFace perplexity guide's number instead (windows of L tokens scoring up to L - 1, with the
guide's weighting). Both definitions are in ``megatron_lite/eval/perplexity.py``.

Examples::

    python tools/eval_ppl.py --load runs/tiny --data-path data/val_text_document --json
    torchrun --nproc_per_node 2 tools/eval_ppl.py --tp 2 --load runs/tiny \\
        --data-path data/val_text_document --seq-length 256 --stride 128
    python tools/eval_ppl.py --load-format hf --load hf_llama/ --data-path data/val_text_document

With ``--json`` rank 0 prints one line ``{"ppl": ..., "nll": ..., "tokens": ...}`` (``nll`` in
nats per token, ``tokens`` = targets scored). With several prefixes (``--data-path A B``, e.g.
the corpora of a blend) it prints one line per prefix, in order, each JSON line with a
``"data_path"`` entry; each prefix's numbers equal a run on that prefix alone. Windows are shared out over the data-parallel ranks
(world / TP); the TP ranks of a group evaluate the same windows together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="our --save folder / checkpoint folder, or a "
                   "HuggingFace folder with --load-format hf")
    p.add_argument("--load-format", default="megatron_lite", choices=["megatron_lite", "hf"],
                   help="checkpoint format (default: megatron_lite)")
    p.add_argument("--data-path", required=True, nargs="+", help="dataset prefix (without "
                   ".bin/.idx); several prefixes are evaluated one after the other with the model "
                   "loaded once, one result line (or JSON line) per prefix")
    p.add_argument("--seq-length", type=int, default=None, help="window length in tokens "
                   "(default: the checkpoint's --seq-length)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts, in "
                   "[1, --seq-length] (default: --seq-length, plain evaluation)")
    p.add_argument("--window-convention", default="ours", choices=["ours", "hf"],
                   help="ours (default): each window feeds L tokens and scores up to L targets, "
                        "every token after the first scored once; hf: the HuggingFace "
                        "perplexity guide's loop (windows of L tokens scoring up to L - 1, its "
                        "weighting), to compare with figures computed that way")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first this "
                   "many tokens of the stream")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="TP degree (launch this many processes per model with torchrun)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json", action="store_true", help='print {"ppl", "nll", "tokens"} as JSON')
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag values that need no checkpoint or data, refused before anything is loaded.

    Raises:
        ValueError: naming the flag and the valid range.
    """
    for flag, value, low in (("--seq-length", args.seq_length, 1), ("--stride", args.stride, 1),
                             ("--max-tokens", args.max_tokens, 2),
                             ("--micro-batch-size", args.micro_batch_size, 1),
                             ("--tensor-model-parallel-size", args.tp, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low} (got {value})")
    if args.stride is not None and args.seq_length is not None and args.stride > args.seq_length:
        raise ValueError(f"--stride {args.stride} must be <= --seq-length {args.seq_length}: a "
                         "stride above the window length would leave targets unscored")


def main(argv: list[str] | None = None) -> dict | list[dict]:
    """Evaluate; returns ``{"ppl", "nll", "tokens"}`` for one prefix, a list of such dicts (each
    with ``"data_path"``) for several.

    Raises:
        ValueError, FileNotFoundError: bad flags, a missing checkpoint or dataset, data made
            with another tokenizer (``tools/eval_ppl.py`` prints them as one line, exit 2).
    """
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch.distributed as dist

    from megatron_lite.data.indexed import IndexedDataset
    from megatron_lite.eval.loading import inference_session, load_model
    from megatron_lite.eval.perplexity import build_stream

    with inference_session(args.tp, args.device) as device:
        rank = dist.get_rank() if dist.is_initialized() else 0
        # The data first: a wrong --data-path fails before the model is read.
        streams = [build_stream(IndexedDataset(p), args.max_tokens) for p in args.data_path]
        loaded = load_model(args.load, args.load_format, device)
        seq_length = args.seq_length or loaded.seq_length
        if not seq_length:
            raise ValueError("the checkpoint names no sequence length; pass --seq-length")
        if args.stride is not None and args.stride > seq_length:
            raise ValueError(f"--stride {args.stride} must be <= the window length {seq_length} "
                             "(the checkpoint's --seq-length; pass --seq-length to change it)")
        note = loaded.extrapolation_warning(seq_length)
        if note and rank == 0:
            print(f"eval_ppl.py: warning: {note}", file=sys.stderr, flush=True)
        for prefix, stream in zip(args.data_path, streams):
            top = int(stream.max())
            if top >= loaded.vocab_size:
                raise ValueError(f"--data-path {prefix} holds token id {top} but the "
                                 f"model's vocabulary has {loaded.vocab_size} entries: the data was "
                                 "made with a different tokenizer")
        results = [_evaluate_prefix(args, loaded, stream, seq_length, device, prefix, rank,
                                    several=len(streams) > 1)
                   for prefix, stream in zip(args.data_path, streams)]
        return results[0] if len(results) == 1 else results


def _evaluate_prefix(args, loaded, stream, seq_length: int, device, prefix: str, rank: int,
                     several: bool) -> dict:
    """One prefix's perplexity, printed on rank 0 (``data_path`` in the JSON with ``several``)."""
    from megatron_lite import parallel
    from megatron_lite.eval.perplexity import stream_perplexity

    result = stream_perplexity(
        loaded.loss, stream, seq_length, args.stride, micro_batch_size=args.micro_batch_size,
        dp_rank=parallel.get_data_parallel_rank(),
        dp_size=parallel.get_data_parallel_world_size(),
        dp_group=parallel.get_data_parallel_group(), device=device,
        progress=args.progress, convention=args.window_convention)
    if several:
        result = {"data_path": prefix, **result}
    if rank == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            stride = args.stride or seq_length
            print(f"perplexity {result['ppl']:.4f} | nll {result['nll']:.6f} nats/token | "
                  f"{result['tokens']} tokens scored | seq_length {seq_length} stride "
                  f"{stride} ({args.window_convention} windows) | {args.load} "
                  f"({args.load_format}) on {prefix}",
                  flush=True)
    return result


if __name__ == "__main__":
    from megatron_lite.eval.tool_cli import run_tool

    sys.exit(run_tool("eval_ppl.py", main))
