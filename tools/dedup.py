#!/usr/bin/env python
"""Remove exact and near-duplicate documents from raw-text shards (the recipe's light governance).

Example::

    python tools/dedup.py --input 'corpus/*.jsonl.zst' --output-dir corpus_dedup \\
        --threshold 0.8 --ngram 5 --num-perm 128 --workers 8

Documents are read in input order (files as given, records in file order); the first document of
every duplicate cluster is kept, later ones are dropped:

* exact duplicates: equal normalised text (NFKC, lower case, punctuation and whitespace runs
  collapsed; ``megatron_lite.data.governance.normalize_text``), compared by a 128-bit digest;
* near duplicates (unless ``--exact-only``): estimated Jaccard similarity of word ``--ngram``-gram
  shingle sets >= ``--threshold``, by MinHash with ``--num-perm`` permutations and
  ``datasketch.MinHashLSH`` banding. A dropped document points to the kept one it matched.

Outputs (written atomically): one filtered shard per input in ``--output-dir`` (same file name;
JSONL records byte for byte, Parquet/.txt documents as ``{"text": ...}`` JSONL), and
``--report`` (default ``<output-dir>/dedup_report.json``): counts, parameters and clusters
(kept id -> dropped ids, with the first ``--examples`` clusters' text openings). Document ids are
``file:line`` (``file:row`` for Parquet), or the record's ``--id-key`` field when given.
MinHash signatures are computed in ``--workers`` processes; the clustering itself is sequential so
the result is the same for every worker count. Memory: the LSH index holds every kept document's
signature (8 bytes x ``--num-perm``, ~1 KiB at 128) plus a 120-character opening for the report.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how

from tqdm import tqdm  # noqa: E402

from megatron_lite.data.governance import NearDuplicateIndex, exact_key, minhash_signature  # noqa: E402
from megatron_lite.data.text_readers import expand_inputs, iter_record_chunks, parse_record  # noqa: E402
from megatron_lite.data.text_writers import check_outputs_spare_inputs, jsonl_writer, output_name, record_line  # noqa: E402
from megatron_lite.eval.tool_cli import ToolArgumentParser, run_tool  # noqa: E402
from megatron_lite.utils import atomic_write_text  # noqa: E402

CHUNK = 256


def parse_args(argv=None):
    p = ToolArgumentParser(prog="dedup.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.jsonl[.gz|.zst], "
                   ".json, .parquet, .txt)")
    p.add_argument("--output-dir", required=True, help="folder for the filtered shards and the report")
    p.add_argument("--json-key", default="text", help="field holding the text (default text)")
    p.add_argument("--id-key", default=None, help="field naming each document in the report (default file:line)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold in (0, 1] (default 0.8)")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle (default 5)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--seed", type=int, default=1, help="MinHash seed (default 1)")
    p.add_argument("--exact-only", action="store_true", help="exact duplicates only (no MinHash)")
    p.add_argument("--workers", type=int, default=1, help="processes computing signatures (default 1)")
    p.add_argument("--report", default=None, help="report path (default <output-dir>/dedup_report.json)")
    p.add_argument("--examples", type=int, default=20, help="clusters shown with text openings (default 20)")
    args = p.parse_args(argv)
    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold}: a Jaccard similarity threshold must be in (0, 1]")
    if args.ngram < 1:
        raise ValueError(f"--ngram {args.ngram}: must be >= 1")
    if args.num_perm < 2:
        raise ValueError(f"--num-perm {args.num_perm}: must be >= 2")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be >= 1")
    return args


_ARGS = None


def _init_worker(args) -> None:
    global _ARGS
    _ARGS = args


def _signature(rec):
    """(doc id, text opening, exact key, MinHash values or None) of one raw record."""
    args = _ARGS
    texts = parse_record(rec, (args.json_key,))
    text = texts[args.json_key]
    doc_id = f"{rec.path}:{rec.line}"
    if args.id_key is not None and rec.kind == "jsonl":
        obj = json.loads(rec.payload)
        if args.id_key not in obj:
            raise ValueError(f"{rec.path}:{rec.line}: no --id-key {args.id_key!r} field")
        doc_id = str(obj[args.id_key])
    sig = None if args.exact_only else minhash_signature(text, args.ngram, args.num_perm, args.seed)
    return doc_id, text[:120], exact_key(text), sig, record_line(rec, texts)


class _Walk:
    """The clustering state over all documents in input order."""

    def __init__(self, args):
        self.near = None if args.exact_only else NearDuplicateIndex(args.threshold, args.num_perm, args.seed)
        self.exact_first: dict[bytes, int] = {}
        self.ids: list[str] = []
        self.openings: dict[int, str] = {}
        self.clusters: dict[int, list[tuple[int, str]]] = {}
        self.counts = {"documents": 0, "kept": 0, "exact_duplicates": 0, "near_duplicates": 0}

    def offer(self, doc_id: str, opening: str, key: bytes, sig) -> bool:
        """Record one document; True when it is kept."""
        i = len(self.ids)
        self.ids.append(doc_id)
        self.counts["documents"] += 1
        root, kind = self.exact_first.get(key), "exact"
        if root is None and self.near is not None:
            root, kind = self.near.add(i, sig), "near"
        self.openings.setdefault(i, opening)
        if root is None:
            self.exact_first[key] = i
            self.counts["kept"] += 1
            return True
        self.counts[f"{kind}_duplicates"] += 1
        self.clusters.setdefault(root, []).append((i, kind))
        return False


def _dedup_files(args, files, names, pool) -> _Walk:
    """Walk every input in order, writing each one's kept records to its output shard."""
    walk = _Walk(args)
    bar = tqdm(desc="dedup", unit=" docs", mininterval=1.0, disable=None)
    for path, name in zip(files, names):
        with jsonl_writer(os.path.join(args.output_dir, name)) as out:
            for recs in iter_record_chunks(path, (args.json_key,), CHUNK):
                results = pool.map(_signature, recs) if pool else [_signature(r) for r in recs]
                for doc_id, opening, key, sig, line in results:
                    if walk.offer(doc_id, opening, key, sig):
                        out.write(line)
                bar.update(len(recs))
    bar.close()
    return walk


def main(argv=None):
    args = parse_args(argv)
    files = expand_inputs(args.input)
    names = [output_name(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError("--input: two inputs share a file name; their filtered copies would collide in "
                         "--output-dir (dedup each folder separately)")
    check_outputs_spare_inputs([os.path.join(args.output_dir, n) for n in names], files, "--output-dir")
    if not args.exact_only:
        import datasketch  # noqa: F401  why: fail before reading anything when it is missing
    t0 = time.time()
    pool = multiprocessing.Pool(args.workers, _init_worker, (args,)) if args.workers > 1 else None
    _init_worker(args)
    try:
        walk = _dedup_files(args, files, names, pool)
    finally:
        if pool:
            pool.close()
            pool.join()
    counts, ids, openings = walk.counts, walk.ids, walk.openings
    report = {"parameters": {k: getattr(args, k) for k in ("threshold", "ngram", "num_perm", "seed",
                                                            "exact_only", "json_key")},
              "inputs": files, "outputs": [os.path.join(args.output_dir, n) for n in names],
              "counts": {**counts, "dropped": counts["documents"] - counts["kept"], "clusters": len(walk.clusters),
                         "seconds": round(time.time() - t0, 3)},
              "clusters": [{"kept": ids[root], "dropped": [{"id": ids[i], "match": kind} for i, kind in members],
                            **({"examples": {ids[root]: openings.get(root, ""),
                                             **{ids[i]: openings.get(i, "") for i, _ in members[:3]}}}
                               if n < args.examples else {})}
                           for n, (root, members) in enumerate(sorted(walk.clusters.items()))]}
    report_path = args.report or os.path.join(args.output_dir, "dedup_report.json")
    atomic_write_text(report_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    c = report["counts"]
    print(f"dedup.py: {c['documents']} documents, kept {c['kept']}, dropped {c['exact_duplicates']} exact and "
          f"{c['near_duplicates']} near duplicates in {c['clusters']} clusters ({c['seconds']:.1f} s); "
          f"shards in {args.output_dir}, report {report_path}")
    return report


if __name__ == "__main__":
    sys.exit(run_tool("dedup.py", main))
