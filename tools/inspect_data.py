#!/usr/bin/env python
"""Show one training sample exactly as the model is fed it.

Example::

    python tools/inspect_data.py --data-path data/corpus_text_document --seq-length 4096 \\
        --index 17 --tokenizer-model tok/sp32k.model --reset-position-ids --json

The dataset is built the way training builds it (same ``--split``, ``--seed``, packing flags and
index cache), so sample ``--index`` of ``--split-name`` is the sample the training run sees at that
global index. ``--data-path`` accepts Megatron's blend syntax (``0.7 A 0.3 B``).

``--json`` prints one JSON object with exactly the keys ``tokens``, ``labels``, ``loss_mask``,
``position_ids``, ``cu_seqlens`` (lists, the sample's own document boundaries), ``dataset`` (the
source prefix), ``document_ids`` (sequence ids in that source, in order) and ``text`` (decoded
input tokens; null without ``--tokenizer-model``).
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

from megatron_lite.data.builder import SPLITS, build_split_dataset  # noqa: E402
from megatron_lite.data.data_config import DataConfig, parse_data_path  # noqa: E402

KEYS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "dataset", "document_ids", "text")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (issue 2 item 7, plus --seed / --tokenizer-type / --eod-id / --data-cache-path)."""
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", nargs="+", required=True, help="prefix, or 'W1 P1 W2 P2 ...'")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sample (L)")
    p.add_argument("--index", type=int, required=True, help="sample index within the split (0-based)")
    p.add_argument("--split", default="969,30,1", help="train,valid,test document proportions")
    p.add_argument("--split-name", default="train", choices=SPLITS, help="which split to read")
    p.add_argument("--tokenizer-model", default=None, help="decode the text with this model")
    p.add_argument("--tokenizer-type", default=None, choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="default: from the model file name (.json -> HuggingFace, else SentencePiece)")
    p.add_argument("--eod-id", type=int, default=None, help="EOD id (default: the tokenizer's)")
    p.add_argument("--seed", type=int, default=1234, help="shuffling seed (training's --seed)")
    p.add_argument("--no-shuffle", action="store_true", help="document and sample order as on disk")
    p.add_argument("--reset-position-ids", action="store_true", help="positions restart after EOD")
    p.add_argument("--reset-attention-mask", action="store_true", help="cu_seqlens split at EODs")
    p.add_argument("--eod-mask-loss", action="store_true", help="loss mask 0 where the input is EOD")
    p.add_argument("--data-cache-path", default=None, help="index cache directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def inspect_sample(args: argparse.Namespace) -> dict:
    """The sample as a dict with the keys of :data:`KEYS`.

    Raises:
        ValueError / IndexError: bad data path, split without data, index out of range.
    """
    if args.seq_length < 1:  # before the dataset, whose message would not name the flag
        raise ValueError(f"--seq-length must be >= 1 (got {args.seq_length})")
    tok = None
    if args.tokenizer_model:
        from megatron_lite.data.tokenizer import build_tokenizer

        ttype = args.tokenizer_type or ("HuggingFaceTokenizer" if args.tokenizer_model.endswith(".json")
                                        or os.path.isdir(args.tokenizer_model) else "SentencePieceTokenizer")
        tok = build_tokenizer(ttype, args.tokenizer_model)
    eod = args.eod_id if args.eod_id is not None else (tok.eod if tok is not None else None)
    if eod is None and (args.reset_position_ids or args.reset_attention_mask or args.eod_mask_loss):
        raise ValueError("--reset-position-ids/--reset-attention-mask/--eod-mask-loss need the EOD id: "
                         "give --tokenizer-model or --eod-id")
    if args.index < 0:
        raise IndexError(f"--index must be >= 0 (got {args.index})")
    cfg = DataConfig(data_path=args.data_path, split=args.split, no_shuffle=args.no_shuffle,
                     reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
                     eod_mask_loss=args.eod_mask_loss, data_cache_path=args.data_cache_path)
    prefixes, weights = parse_data_path(args.data_path)
    slot = SPLITS.index(args.split_name)
    ds = build_split_dataset(cfg, args.split_name, prefixes, weights, slot, args.seq_length, args.index + 1,
                             args.seed, eod)
    s = ds[args.index]
    return {"tokens": s["tokens"].tolist(), "labels": s["labels"].tolist(),
            "loss_mask": [float(x) for x in s["loss_mask"]], "position_ids": s["position_ids"].tolist(),
            "cu_seqlens": s["cu_seqlens"].tolist(), "dataset": prefixes[int(s["dataset_id"])],
            "document_ids": s["document_ids"].tolist(),
            "text": tok.decode(s["tokens"].tolist()) if tok is not None else None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = inspect_sample(args)
    except (ValueError, IndexError, FileNotFoundError) as e:
        print(f"inspect_data.py: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(f"sample {args.index} of split '{args.split_name}' from {out['dataset']} "
          f"(documents {out['document_ids']})")
    for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"):
        print(f"{k:>13}: {out[k]}")
    if out["text"] is not None:
        print("-" * 20 + " text " + "-" * 20)
        print(out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
