#!/usr/bin/env python
"""Train/eval contamination: word n-gram overlap between training shards and evaluation sets
(GPT-3's test, Brown et al. 2020 appendix C: 13-grams, case and punctuation ignored).

Example::

    python tools/contamination.py --train 'corpus/*.jsonl.zst' --eval evals/mmlu.jsonl evals/gsm8k.jsonl \\
        --eval-id-key id --output-dir contamination --workers 8 [--decontaminate]

For every evaluation document: its distinct word ``--ngram``-grams (the whole text as one n-gram
when it is shorter), and the share of them that occur anywhere in the training shards. A document
whose share is above ``--threshold`` (default 0: any shared n-gram, GPT-3's "dirty") is
contaminated. Training documents that share at least one n-gram with a contaminated evaluation
document are the offending ones.

Outputs (``--output-dir``, written atomically):
  contamination_report.json  parameters, per eval set: documents, contaminated, mean share;
                             per eval document: id, n-grams, share
  contaminated_ids.txt       one ``<eval file>\\t<id>`` line per contaminated eval document
  train/<shard>              with ``--decontaminate``: each training shard without the offending
                             documents (JSONL records byte for byte)
Eval ids: the ``--eval-id-key`` field, else ``file:line``. Training documents are hashed in
``--workers`` processes; the result does not depend on the worker count.
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

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron_lite.data.governance import contamination_share, ngram_hashes  # noqa: E402
from megatron_lite.data.text_readers import expand_inputs, iter_raw_records, iter_record_chunks, parse_record  # noqa: E402
from megatron_lite.data.text_writers import check_outputs_spare_inputs, jsonl_writer, output_name, record_line  # noqa: E402
from megatron_lite.eval.tool_cli import ToolArgumentParser, run_tool  # noqa: E402
from megatron_lite.utils import atomic_write_text  # noqa: E402

CHUNK = 256


def parse_args(argv=None):
    p = ToolArgumentParser(prog="contamination.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", nargs="+", required=True, help="training shards: files, directories or globs")
    p.add_argument("--eval", nargs="+", required=True, help="evaluation sets: files, directories or globs")
    p.add_argument("--output-dir", required=True, help="folder for the report, the id list and --decontaminate")
    p.add_argument("--json-key", default="text", help="text field of the training records (default text)")
    p.add_argument("--eval-key", default="text", help="text field of the evaluation records (default text)")
    p.add_argument("--eval-id-key", default=None, help="field naming each eval document (default file:line)")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram (default 13, as GPT-3)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="an eval document is contaminated when its share exceeds this (default 0: any overlap)")
    p.add_argument("--decontaminate", action="store_true",
                   help="also write the training shards without the offending documents")
    p.add_argument("--workers", type=int, default=1, help="processes hashing training documents (default 1)")
    args = p.parse_args(argv)
    if args.ngram < 1:
        raise ValueError(f"--ngram {args.ngram}: must be >= 1")
    if not 0.0 <= args.threshold < 1.0:
        raise ValueError(f"--threshold {args.threshold}: must be in [0, 1)")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be >= 1")
    return args


def load_eval(args):
    """[(file, id, n-gram hashes)] of every evaluation document, in order."""
    docs = []
    for path in expand_inputs(args.eval, "--eval"):
        for rec in iter_raw_records(path, (args.eval_key,)):
            text = parse_record(rec, (args.eval_key,))[args.eval_key]
            doc_id = f"{rec.path}:{rec.line}"
            if args.eval_id_key is not None:
                obj = json.loads(rec.payload) if rec.kind == "jsonl" else rec.payload
                if not isinstance(obj, dict) or args.eval_id_key not in obj:
                    raise ValueError(f"{rec.path}:{rec.line}: no --eval-id-key {args.eval_id_key!r} field")
                doc_id = str(obj[args.eval_id_key])
            docs.append((path, doc_id, np.unique(ngram_hashes(text, args.ngram))))
    return docs


_STATE: dict = {}


def _init_worker(eval_hashes: np.ndarray, key: str, n: int) -> None:
    _STATE.update(eval_hashes=eval_hashes, key=key, n=n)


def _train_hits(rec):
    """Hashes of this training document that occur in the eval sets (usually none)."""
    text = parse_record(rec, (_STATE["key"],))[_STATE["key"]]
    h = np.unique(ngram_hashes(text, _STATE["n"]))
    return h[np.isin(h, _STATE["eval_hashes"], assume_unique=True)]


def scan_train(args, files, pool) -> tuple[set, dict, int]:
    """Walk the training documents: (set of shared hashes, per file {record line (1-based, row for
    Parquet): its shared hashes} for the documents that share any, number of documents)."""
    shared: set[int] = set()
    hits_of: dict[str, dict[int, np.ndarray]] = {f: {} for f in files}
    bar = tqdm(desc="contamination", unit=" docs", mininterval=1.0, disable=None)
    total = 0
    for path in files:
        for recs in iter_record_chunks(path, (args.json_key,), CHUNK):
            for rec, hits in zip(recs, pool.map(_train_hits, recs) if pool else [_train_hits(r) for r in recs]):
                if hits.size:
                    shared.update(int(x) for x in hits)
                    hits_of[path][rec.line] = hits
            total += len(recs)
            bar.update(len(recs))
    bar.close()
    return shared, hits_of, total


def write_decontaminated(args, path: str, offending: set[int]) -> None:
    """Second pass over one shard: every record except the offending ones (by line), byte for byte."""
    with jsonl_writer(os.path.join(args.output_dir, "train", output_name(path))) as out:
        for rec in iter_raw_records(path, (args.json_key,)):
            if rec.line not in offending:
                out.write(record_line(rec, parse_record(rec, (args.json_key,))))


def main(argv=None):
    args = parse_args(argv)
    train_files = expand_inputs(args.train, "--train")
    if args.decontaminate:
        check_outputs_spare_inputs([os.path.join(args.output_dir, "train", output_name(f)) for f in train_files],
                                   train_files, "--output-dir")
    t0 = time.time()
    evals = load_eval(args)
    eval_hashes = np.unique(np.concatenate([h for _, _, h in evals])) if evals else np.empty(0, np.uint64)
    pool = multiprocessing.Pool(args.workers, _init_worker, (eval_hashes, args.json_key, args.ngram)) \
        if args.workers > 1 else None
    _init_worker(eval_hashes, args.json_key, args.ngram)
    try:
        shared, hits_of, n_train = scan_train(args, train_files, pool)
    finally:
        if pool:
            pool.close()
            pool.join()
    shared_arr = np.fromiter(shared, dtype=np.uint64, count=len(shared))
    rows, dirty_hashes = [], []
    for path, doc_id, h in evals:
        share = contamination_share(h, shared_arr)
        rows.append({"file": path, "id": doc_id, "ngrams": int(h.size), "share": share,
                     "contaminated": share > args.threshold})
        if share > args.threshold:
            dirty_hashes.append(h)
    dirty = np.unique(np.concatenate(dirty_hashes)) if dirty_hashes else np.empty(0, np.uint64)
    offending = {path: {i for i, hits in hits_of[path].items() if np.isin(hits, dirty).any()}
                 for path in train_files}
    if args.decontaminate:
        for path in train_files:
            write_decontaminated(args, path, offending[path])
    sets = {}
    for r in rows:
        s = sets.setdefault(r["file"], {"documents": 0, "contaminated": 0, "share_sum": 0.0})
        s["documents"] += 1
        s["contaminated"] += r["contaminated"]
        s["share_sum"] += r["share"]
    summary = {f: {"documents": s["documents"], "contaminated": s["contaminated"],
                   "mean_share": s["share_sum"] / s["documents"]} for f, s in sets.items()}
    report = {"parameters": {"ngram": args.ngram, "threshold": args.threshold, "train": train_files},
              "train_documents": n_train, "offending_train_documents": sum(len(v) for v in offending.values()),
              "offending": {p: sorted(v) for p, v in offending.items() if v},
              "eval_sets": summary, "eval_documents": rows, "seconds": round(time.time() - t0, 3)}
    atomic_write_text(os.path.join(args.output_dir, "contamination_report.json"),
                      json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(args.output_dir, "contaminated_ids.txt"),
                      "".join(f"{r['file']}\t{r['id']}\n" for r in rows if r["contaminated"]))
    n_dirty = sum(r["contaminated"] for r in rows)
    print(f"contamination.py: {n_dirty} of {len(rows)} eval documents contaminated ({args.ngram}-grams, "
          f"share > {args.threshold:g}); {report['offending_train_documents']} of {report['train_documents']} training documents "
          f"offend{'; decontaminated shards in ' + os.path.join(args.output_dir, 'train') if args.decontaminate else ''}"
          f"; report {os.path.join(args.output_dir, 'contamination_report.json')}")
    return report


if __name__ == "__main__":
    sys.exit(run_tool("contamination.py", main))
