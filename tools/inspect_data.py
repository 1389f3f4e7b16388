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

``--packing-report`` (instead of ``--index``) compares the packing modes on one epoch of the split
(the training order: same ``--seed``/``--no-shuffle``), optionally on its first ``--limit``
documents: for each of concat, best-fit, best-fit with ``--packing-fill`` and none, the samples
per epoch, data tokens per sample (of ``seq_length + 1``), the padding share of the token slots
and the share of (non-empty) documents that are truncated, i.e. whose tokens land in more than
one sample. ``--json`` prints the rows as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.data.blended import normalize_weights  # noqa: E402
from megatron_lite.data.builder import SPLITS, build_split_dataset  # noqa: E402
from megatron_lite.data.data_config import DataConfig, parse_data_path, split_weights  # noqa: E402
from megatron_lite.data.gpt_dataset import split_document_ranges  # noqa: E402
from megatron_lite.data.helpers import build_packed_idx  # noqa: E402
from megatron_lite.data.indexed import IndexedDataset  # noqa: E402

KEYS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "dataset", "document_ids", "text")
# --index guard: building the index for a sample this many epochs in (or an index of this many
# entries) takes minutes and GBs for nothing; training never reads that far into a small split.
MAX_INDEX_EPOCHS = 1000
MAX_INDEX_ENTRIES = 200_000_000
REPORT_MODES = (("concat", False), ("best-fit", False), ("best-fit", True), ("none", False))


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (issue 2 item 7, plus --seed / --tokenizer-type / --eod-id / --data-cache-path)."""
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", nargs="+", required=True, help="prefix, or 'W1 P1 W2 P2 ...'")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sample (L)")
    p.add_argument("--index", type=int, default=None, help="sample index within the split (0-based); "
                   "required unless --packing-report")
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
    p.add_argument("--packing", default="concat", choices=["concat", "best-fit", "none"],
                   help="packing mode (training's --packing)")
    p.add_argument("--packing-window", type=int, default=2000, help="best-fit window in documents")
    p.add_argument("--packing-fill", action="store_true", help="best-fit fills free space with fragments")
    p.add_argument("--packing-report", action="store_true",
                   help="compare the packing modes on one epoch of the split instead of showing a sample")
    p.add_argument("--limit", type=int, default=None,
                   help="--packing-report: measure on the split's first N documents only (speed)")
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
    if args.index is None:
        raise ValueError("give --index N (a sample to show) or --packing-report")
    if args.index < 0:
        raise IndexError(f"--index must be >= 0 (got {args.index})")
    cfg = DataConfig(data_path=args.data_path, split=args.split, no_shuffle=args.no_shuffle,
                     reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
                     eod_mask_loss=args.eod_mask_loss, data_cache_path=args.data_cache_path,
                     packing=args.packing, packing_window=args.packing_window, packing_fill=args.packing_fill)
    prefixes, weights = parse_data_path(args.data_path)
    slot = SPLITS.index(args.split_name)
    check_index_size(args, prefixes, weights, slot)
    ds = build_split_dataset(cfg, args.split_name, prefixes, weights, slot, args.seq_length, args.index + 1,
                             args.seed, eod)
    s = ds[args.index]
    return {"tokens": s["tokens"].tolist(), "labels": s["labels"].tolist(),
            "loss_mask": [float(x) for x in s["loss_mask"]], "position_ids": s["position_ids"].tolist(),
            "cu_seqlens": s["cu_seqlens"].tolist(), "dataset": prefixes[int(s["dataset_id"])],
            "document_ids": s["document_ids"].tolist(),
            "text": tok.decode(s["tokens"].tolist()) if tok is not None else None}


def _split_sizes(args, prefix: str, slot: int) -> np.ndarray:
    ix = IndexedDataset(prefix)
    a, b = split_document_ranges(len(ix), split_weights(args.split))[slot]
    return np.asarray(ix.sizes[a:b])


def check_index_size(args, prefixes, weights, slot: int) -> None:
    """Refuse an ``--index`` whose index would be huge (many epochs of a small split).

    Each source ``j`` serves about ``share_j * (index + 1)`` samples (its ``--data-path``
    weight, else its token share, as the blend does at temperature 1); with ``S_j`` samples per
    epoch (``(T_j - 1) // L`` for concat; at least ``ceil(T_j / (L + 1))`` packed, a lower bound
    used for every mode) that is ``E_j`` epochs of ``n_j`` documents and ``S_j`` samples each.

    Raises:
        ValueError: more than :data:`MAX_INDEX_EPOCHS` epochs or :data:`MAX_INDEX_ENTRIES` entries.
    """
    sizes = [_split_sizes(args, p, slot) for p in prefixes]
    tokens = np.array([int(x.astype(np.int64).sum()) for x in sizes], dtype=np.float64)
    if (tokens <= 0).all():
        return  # the dataset itself says the split is empty
    shares = normalize_weights(weights) if weights is not None else tokens / tokens.sum()
    L = args.seq_length
    for j, (x, t) in enumerate(zip(sizes, tokens)):
        per_epoch = max(int(t) - 1, 0) // L if args.packing == "concat" else math.ceil(t / (L + 1))
        if shares[j] <= 0 or per_epoch <= 0:
            continue
        epochs = math.ceil(shares[j] * (args.index + 1) / per_epoch)
        entries = epochs * (len(x) + 2 * per_epoch)
        if epochs > MAX_INDEX_EPOCHS or entries > MAX_INDEX_ENTRIES:
            max_epochs = min(MAX_INDEX_EPOCHS, MAX_INDEX_ENTRIES // (len(x) + 2 * per_epoch))
            raise ValueError(
                f"--index {args.index} lies {epochs} epochs into split '{args.split_name}' of {prefixes[j]} "
                f"({per_epoch} samples per epoch), an index of ~{entries:.2g} entries: give an --index "
                f"below {int(max_epochs * per_epoch / shares[j])}")


def packing_stats(sizes: np.ndarray, order: np.ndarray, seq_length: int, mode: str, window: int,
                  fill: bool) -> dict:
    """One epoch of documents ``order`` (ids into ``sizes``) packed one way, measured.

    Concat: sample ``i`` holds stream tokens ``[i*L, i*L + L]``; a document at stream positions
    ``[a, b)`` is whole iff ``b - 1 <= floor(a / L) * L + L`` (the tail after the last full
    sample counts as cut off). Packed modes: a document is truncated when its tokens lie in more
    than one sample (:func:`megatron_lite.data.helpers.build_packed_idx`).

    Returns:
        dict: ``mode``, ``samples``, ``tokens_per_sample`` (data tokens of ``L + 1``),
        ``padding_share`` (padding slots / all slots), ``truncated_share`` (of non-empty documents).
    """
    L = seq_length
    lengths = np.asarray(sizes, dtype=np.int64)[order]
    docs = int((lengths > 0).sum())
    if mode == "concat":
        ends = np.cumsum(lengths)
        starts = ends - lengths
        samples = max(int(ends[-1]) - 1, 0) // L if len(ends) else 0
        cut = (ends - 1 > (starts // L) * L + L) | (ends - 1 > samples * L)
        truncated = int((cut & (lengths > 0)).sum())
        data = samples * (L + 1)
    else:
        segs, bins = build_packed_idx(sizes, order, L + 1, mode, window, fill)
        samples = len(bins) - 1
        data = int(segs[:, 2].sum())
        bin_of = np.repeat(np.arange(samples), np.diff(bins))
        pairs = np.unique(np.stack([segs[:, 0], bin_of], axis=1), axis=0)
        truncated = int((np.bincount(pairs[:, 0]) > 1).sum())
    slots = samples * (L + 1)
    return {"mode": mode + ("+fill" if fill else ""), "samples": samples,
            "tokens_per_sample": data / samples if samples else 0.0,
            "padding_share": 1.0 - data / slots if slots else 0.0,
            "truncated_share": truncated / docs if docs else 0.0}


def packing_report(args) -> list:
    """Rows of :func:`packing_stats` for each mode of :data:`REPORT_MODES` (first prefix of the
    blend; its ``--split-name`` part, first ``--limit`` documents, epoch 0's order)."""
    if args.seq_length < 1 or args.packing_window < 1:
        raise ValueError("--seq-length and --packing-window must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 documents (got {args.limit})")
    prefixes, _ = parse_data_path(args.data_path)
    sizes = _split_sizes(args, prefixes[0], SPLITS.index(args.split_name))[:args.limit]
    if not int(sizes.astype(np.int64).sum()):
        raise ValueError(f"split '{args.split_name}' of {prefixes[0]} holds no token")
    docs = np.arange(len(sizes))
    order = docs if args.no_shuffle else np.random.default_rng([args.seed, 0, 0]).permutation(docs)
    return [packing_stats(sizes, order, args.seq_length, m, args.packing_window, f) for m, f in REPORT_MODES]


def print_report(rows: list, args) -> None:
    """The rows of :func:`packing_report` as a table."""
    print(f"packing report: {parse_data_path(args.data_path)[0][0]} split '{args.split_name}', L_ctx {args.seq_length}, "
          f"window {args.packing_window}" + (f", first {args.limit} documents" if args.limit else ""))
    print(f"{'mode':<14}{'samples/epoch':>14}{'tokens/sample':>15}{'padding':>10}{'docs truncated':>16}")
    for r in rows:
        print(f"{r['mode']:<14}{r['samples']:>14}{r['tokens_per_sample']:>15.1f}"
              f"{100 * r['padding_share']:>9.2f}%{100 * r['truncated_share']:>15.2f}%")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.packing_report:
            rows = packing_report(args)
            if args.json:
                print(json.dumps(rows))
            else:
                print_report(rows, args)
            return 0
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
