#!/usr/bin/env python
"""Statistics of tokenized corpora: document-length histograms (PNG and JSON), percentiles,
tokens per character and the most frequent tokens, per corpus.

Example::

    python tools/data_stats.py --data-path web=data/web_text_document code=data/code_text_document \\
        --tokenizer-model tok/sp32k.model --output-dir data/stats

For each corpus (``NAME=PREFIX``, or a bare prefix named after its file):
  documents, tokens, document-length percentiles (nearest rank) and a histogram over log-spaced
  bins, drawn to ``<output-dir>/<name>_lengths.png``;
  the ``--top-k`` most frequent token ids with their share (and pieces, with a tokenizer);
  tokens per character of the decoded text of ``--sample-docs`` random documents (with a
  tokenizer; EOD left out).
Everything goes to ``<output-dir>/data_stats.json`` as well; files are written atomically.
"""

from __future__ import annotations

import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from megatron_lite.data.corpus_stats import (document_lengths, length_histogram, length_percentiles,  # noqa: E402
                                             token_counts, tokens_per_character)
from megatron_lite.data.indexed import IndexedDataset, data_file_path, index_file_path  # noqa: E402
from megatron_lite.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from megatron_lite.eval.tool_cli import ToolArgumentParser, run_tool  # noqa: E402
from megatron_lite.utils import atomic_write_bytes, atomic_write_text  # noqa: E402


def parse_args(argv=None):
    p = ToolArgumentParser(prog="data_stats.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", nargs="+", required=True, metavar="[NAME=]PREFIX",
                   help="dataset prefixes (without .bin/.idx), optionally named")
    p.add_argument("--output-dir", required=True, help="folder for data_stats.json and the PNGs")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None, help="tokenizer for pieces and tokens per character")
    p.add_argument("--top-k", type=int, default=30, help="most frequent tokens listed (default 30)")
    p.add_argument("--sample-docs", type=int, default=2000, help="documents decoded for tokens/char (default 2000)")
    p.add_argument("--bins", type=int, default=40, help="histogram bins (log-spaced; default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokens/char sample")
    args = p.parse_args(argv)
    for flag in ("top_k", "sample_docs", "bins"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    corpora = []
    for item in args.data_path:
        name, _, prefix = item.rpartition("=")
        name = name or os.path.basename(prefix)
        for path in (index_file_path(prefix), data_file_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--data-path {item}: {path} not found (give the prefix without "
                                        f".bin/.idx, e.g. data/corpus_text_document)")
        corpora.append((name, prefix))
    if len({n for n, _ in corpora}) != len(corpora):
        raise ValueError("--data-path: two corpora have the same name; name them NAME=PREFIX")
    if args.tokenizer_model and not os.path.exists(args.tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {args.tokenizer_model}: not found")
    args.corpora = corpora
    return args


def _png(name: str, hist: dict, pct: dict) -> bytes:
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if hist["edges"]:
        edges = np.asarray(hist["edges"], dtype=float)
        ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.3)
        ax.set_xscale("log")
        for key, style in (("p50", "--"), ("p90", ":"), ("p99", "-.")):
            if pct[key]:
                ax.axvline(pct[key], color="tab:red", linestyle=style, linewidth=1, label=f"{key} = {pct[key]}")
        ax.legend()
    ax.set_xlabel("document length (tokens, log scale)")
    ax.set_ylabel("documents")
    ax.set_title(f"{name}: document lengths")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def corpus_stats(name: str, prefix: str, args, tok) -> dict:
    """The statistics of one corpus (and its PNG written to the output folder)."""
    ds = IndexedDataset(prefix)
    lengths = document_lengths(ds)
    pct = length_percentiles(lengths)
    hist = length_histogram(lengths, args.bins)
    counts = token_counts(ds, tok.vocab_size if tok else None)
    total = int(counts.sum())
    top = np.argsort(-counts, kind="stable")[:args.top_k]
    top_tokens = [{"id": int(i), "count": int(counts[i]), "share": float(counts[i]) / total if total else 0.0,
                   **({"piece": tok.id_to_piece(int(i))} if tok is not None and hasattr(tok, "id_to_piece") else {})}
                  for i in top if counts[i] > 0]
    out = {"prefix": prefix, "documents": int(lengths.size), "tokens": total, "length_tokens": pct,
           "length_histogram": hist, "top_tokens": top_tokens,
           "distinct_tokens": int((counts > 0).sum())}
    if tok is not None:
        out["tokens_per_char"] = tokens_per_character(ds, tok, args.sample_docs, args.seed, eod=tok.eod)
    png = os.path.join(args.output_dir, f"{name}_lengths.png")
    atomic_write_bytes(png, _png(name, hist, pct))
    out["figure"] = png
    return out


def main(argv=None):
    args = parse_args(argv)
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model) if args.tokenizer_model else None
    stats = {name: corpus_stats(name, prefix, args, tok) for name, prefix in args.corpora}
    path = os.path.join(args.output_dir, "data_stats.json")
    atomic_write_text(path, json.dumps({"corpora": stats, "tokenizer": tok.describe() if tok else None},
                                       indent=1, ensure_ascii=False) + "\n")
    for name, s in stats.items():
        p = s["length_tokens"]
        tpc = s.get("tokens_per_char", {}).get("tokens_per_char")
        print(f"{name}: {s['documents']} documents, {s['tokens']} tokens, length p50 {p['p50']} p90 {p['p90']} "
              f"p99 {p['p99']} max {p['max']}"
              + (f", {tpc:.3f} tokens/char" if tpc else "") + f"; figure {s['figure']}")
    print(f"data_stats.py: written {path}")
    return stats


if __name__ == "__main__":
    sys.exit(run_tool("data_stats.py", main))
