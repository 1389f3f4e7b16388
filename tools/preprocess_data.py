#!/usr/bin/env python
"""Tokenize raw text into Megatron-LM ``.bin``/``.idx`` token files (Megatron's preprocess_data.py
interface).

Example::

    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --json-keys text \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/sp32k.model \\
        --output-prefix data/corpus --workers 16 --append-eod

writes ``data/corpus_text_document.bin/.idx`` (one pair per ``--json-keys`` entry) and
``data/corpus.stats.json``.

Behaviour:

* Inputs: .jsonl/.json (+ .gz, .zst), .parquet, .txt (one document per file); see
  :mod:`megatron_lite.data.text_readers` for the exact rules (records split on ``"\\n"`` only,
  CRLF and a UTF-8 BOM accepted).
* ``--workers N`` tokenizes in N processes; documents are written in input order whatever N is, so
  the output is byte-identical for every N. ``--workers 1`` runs in this process.
* Empty-document policy: a text that is empty or whitespace-only (``str.isspace``), or that
  tokenizes to no ids, is *skipped and counted* as ``empty`` (whitespace-only texts also as
  ``whitespace_only``); no zero-length document is written. Megatron-LM's tool keeps a
  whitespace-only text (a lossless tokenizer gives it ids); it carries no content to learn from and
  would be packed as a few space tokens and an EOD, so it is dropped here on purpose.
  (Datasets written by other tools may still contain zero-length documents; the GPT dataset
  accepts them.)
* A malformed record (bad JSON or UTF-8, a missing key, a non-string value, a string with a lone
  surrogate escape such as ``"\\ud800"``) stops the run with ``file:line`` and the parser's
  message on one line; ``--skip-bad-lines`` skips it and counts it as ``bad_lines`` instead.
  On any error the progress bar is closed first, and nothing the run created stays behind
  (temporary files, and the output folder when the run made it).
* Output is atomic: tokens go to temporary files that are renamed only after every input was read
  (``.bin`` first, ``.idx`` last, an older ``.idx`` removed first), so an interrupted run leaves no
  readable pair under the output name; temporaries are removed on error or Ctrl-C.

Stats (printed and in ``<output-prefix>.stats.json``): ``records`` read, ``docs`` and ``tokens``
written (EOD included), ``skipped`` (= ``bad_lines`` + ``empty``), ``whitespace_only`` (within
``empty``), ``bytes`` (uncompressed input
bytes read: JSONL line bytes with line ending, Parquet UTF-8 bytes of the requested columns, .txt
file bytes), ``text_bytes`` (UTF-8 bytes of the written documents' text), ``seconds`` (wall),
rates, and document-length percentiles in tokens (nearest-rank: ``p`` is the
``ceil(p/100 * n)``-th smallest length), totals over all keys plus a ``per_key`` breakdown.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
from typing import Iterator, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

import numpy as np  # noqa: E402

from megatron_lite.data.text_readers import (BadRecordError, RawRecord, expand_inputs,  # noqa: E402
                                             iter_raw_records, parse_record)
from megatron_lite.data.corpus_stats import length_percentiles  # noqa: E402
from megatron_lite.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

_BAD, _EMPTY, _BLANK = -2, -1, -3  # length codes in a chunk result (_BLANK: whitespace-only text)
# A chunk also ends at this many input bytes, so corpora of long documents (source files, books)
# still split into enough tasks to keep every worker busy until the end.
_CHUNK_BYTES = 1 << 18


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (Megatron-LM flag names; every flag documented in ``--help``)."""
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="input files, directories or globs (.jsonl, .json, .jsonl.gz, .jsonl.zst, "
                        ".parquet, .txt = one document per file), read in the order given")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys / Parquet columns to tokenize; one output pair per key")
    p.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZER_TYPES),
                   help="tokenizer implementation")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file, or HuggingFace tokenizer.json (or its directory)")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx and <prefix>.stats.json")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (1 = tokenize in this process)")
    p.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's end-of-document id (= eos) to every document")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed records instead of stopping at the first one")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="max records per task sent to a worker process (a task also ends at "
                        "256 KiB of input)")
    p.add_argument("--no-progress", action="store_true",
                   help="do not show the tqdm progress bar (docs/s, MB/s) on stderr")
    return p


# --------------------------------------------------------------------------------------------
# Worker side: parse + tokenize one chunk of records.

_STATE: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, json_keys: Sequence[str],
                 append_eod: bool, pool_worker: bool = False) -> None:
    if pool_worker:
        # One tokenizer thread per worker process: HF tokenizers would start a pool in each.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _STATE.update(tok=tok, keys=list(json_keys), eod=tok.eod if append_eod else None)


def encode_chunk(records: list[RawRecord]) -> dict:
    """Parse and tokenize a chunk of records with the worker's tokenizer.

    Returns:
        ``{"bad": [(i, path, line, reason)], "keys": {key: (lengths int64 [n], flat token ids int32 [sum],
        text_bytes)}}`` where ``lengths[i]`` is the token count of record ``i`` (EOD included),
        -1 for an empty document, -3 for a whitespace-only one and -2 for a bad record; ``flat`` holds the written documents'
        ids back to back; plus ``"nbytes"``, the chunk's input bytes.
    """
    tok, keys, eod = _STATE["tok"], _STATE["keys"], _STATE["eod"]
    n = len(records)
    bad: list[tuple[int, str, int, str]] = []
    parsed: list[dict | None] = []
    for i, rec in enumerate(records):
        try:
            parsed.append(parse_record(rec, keys))
        except BadRecordError as e:
            bad.append((i, e.path, e.line, e.reason))
            parsed.append(None)
    out = {}
    for key in keys:
        lengths = np.full(n, _BAD, dtype=np.int64)
        todo = [i for i, d in enumerate(parsed) if d is not None]
        texts = []
        for i in todo:
            t = parsed[i][key]
            if not t or t.isspace():
                lengths[i] = _BLANK if t else _EMPTY
            else:
                texts.append((i, t))
        encoded = tok.tokenize_batch([t for _, t in texts]) if texts else []
        flat: list[int] = []
        text_bytes = 0
        for (i, t), ids in zip(texts, encoded):
            if not ids:
                lengths[i] = _EMPTY
                continue
            flat.extend(ids)
            if eod is not None:
                flat.append(eod)
            lengths[i] = len(ids) + (eod is not None)
            text_bytes += len(t.encode("utf-8"))
        out[key] = (lengths, np.asarray(flat, dtype=np.int32), text_bytes)
    return {"bad": bad, "keys": out, "nbytes": sum(r.nbytes for r in records)}


# --------------------------------------------------------------------------------------------
# Main side: read, dispatch, write in order.

class _Throttle:
    """Bounds the chunks in flight to the pool (Pool.imap's feeder thread would otherwise read
    the whole corpus into memory) and lets the main thread unblock the feeder when it stops."""

    def __init__(self, limit: int):
        self._sem = threading.Semaphore(limit)
        self.stopped = threading.Event()

    def acquire(self) -> bool:
        """Wait for a free slot; False once :meth:`stop` was called."""
        while not self._sem.acquire(timeout=0.1):
            if self.stopped.is_set():
                return False
        return not self.stopped.is_set()

    def release(self) -> None:
        self._sem.release()

    def stop(self) -> None:
        self.stopped.set()


def _chunks(files: list[str], keys: Sequence[str], size: int, box: list,
            throttle: _Throttle | None) -> Iterator[list[RawRecord]]:
    """Yield chunks of at most ``size`` records / ~``_CHUNK_BYTES`` bytes; a read error is stored
    in ``box`` and ends the stream (the pool's feeder thread would report it out of order)."""
    try:
        buf: list[RawRecord] = []
        nbytes = 0
        for path in files:
            for rec in iter_raw_records(path, keys):
                buf.append(rec)
                nbytes += rec.nbytes
                if len(buf) >= size or nbytes >= _CHUNK_BYTES:
                    if throttle is not None and not throttle.acquire():
                        return
                    yield buf
                    buf, nbytes = [], 0
        if buf and (throttle is None or throttle.acquire()):
            yield buf
    except Exception as e:
        box.append(e)


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, outermost first."""
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing[::-1]


def preprocess(args: argparse.Namespace) -> dict:
    """Run the preprocessing described by ``args``; returns the stats dict (also written).

    Raises:
        BadRecordError: a malformed record without ``--skip-bad-lines``.
        ValueError / FileNotFoundError: bad flags, missing inputs, unreadable tokenizer.
    """
    import json

    from megatron_lite.data.indexed import (IndexedDatasetBuilder, best_dtype, data_file_path,
                                            finalize_atomic, index_file_path)

    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size {args.chunk_size} must be >= 1")
    files = expand_inputs(args.input)
    keys = list(args.json_keys)
    if len(set(keys)) != len(keys):
        raise ValueError(f"--json-keys {keys} lists a key twice")
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    if args.append_eod and tok.eod is None:
        raise ValueError(f"--append-eod: tokenizer {args.tokenizer_model} defines no eos/eod id")
    dtype = best_dtype(tok.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    created = _missing_folders(out_dir)  # removed again if the run fails: it leaves nothing behind
    os.makedirs(out_dir, exist_ok=True)
    out_prefix = {k: f"{args.output_prefix}_{k}_document" for k in keys}
    tmp_prefix = {k: f"{p}.tmp-{os.getpid()}" for k, p in out_prefix.items()}

    start = time.perf_counter()
    counts = {"records": 0, "bad_lines": 0, "bytes": 0}
    per_key = {k: {"docs": 0, "tokens": 0, "empty": 0, "whitespace_only": 0, "text_bytes": 0,
                   "lengths": []} for k in keys}
    builders: dict = {}
    pool = None
    throttle: _Throttle | None = None
    box: list = []
    published = False
    bar = None
    try:
        for k in keys:
            builders[k] = IndexedDatasetBuilder(data_file_path(tmp_prefix[k]), dtype)
        init = (args.tokenizer_type, args.tokenizer_model, keys, args.append_eod)
        if args.workers == 1:
            _init_worker(*init)
            results = map(encode_chunk, _chunks(files, keys, args.chunk_size, box, None))
        else:
            throttle = _Throttle(4 * args.workers)
            pool = multiprocessing.Pool(args.workers, initializer=_init_worker,
                                        initargs=init + (True,))
            results = pool.imap(encode_chunk,
                                _chunks(files, keys, args.chunk_size, box, throttle))
        from tqdm import tqdm

        # Counts written documents (all keys), as the summary's docs= does; skipped records are
        # in the postfix.
        bar = tqdm(unit="docs", disable=args.no_progress, mininterval=1.0, smoothing=0.1,
                   file=sys.stderr)
        for res in results:
            if throttle is not None:
                throttle.release()
            n = len(res["keys"][keys[0]][0])
            docs_before = sum(st["docs"] for st in per_key.values())
            if res["bad"]:
                if not args.skip_bad_lines:
                    raise BadRecordError(*res["bad"][0][1:])
                counts["bad_lines"] += len(res["bad"])
            counts["records"] += n - len(res["bad"])
            counts["bytes"] += res["nbytes"]
            for key in keys:
                lengths, flat, text_bytes = res["keys"][key]
                st = per_key[key]
                written = lengths[lengths > 0]
                st["empty"] += int(((lengths == _EMPTY) | (lengths == _BLANK)).sum())
                st["whitespace_only"] += int((lengths == _BLANK).sum())
                st["docs"] += int(written.size)
                st["tokens"] += int(written.sum())
                st["text_bytes"] += text_bytes
                st["lengths"].append(written)
                flat = flat.astype(dtype, copy=False)
                offset = 0
                b = builders[key]
                for length in written.tolist():
                    b.add_document(flat[offset:offset + length])
                    offset += length
            bar.update(sum(st["docs"] for st in per_key.values()) - docs_before)
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            skipped = counts["bad_lines"] + sum(st["empty"] for st in per_key.values())
            bar.set_postfix_str(f"{counts['bytes'] / elapsed / 1e6:.2f} MB/s"
                                + (f", {skipped} skipped" if skipped else ""), refresh=False)
        bar.close()
        if box:
            raise box[0]
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for key in keys:
            finalize_atomic(builders[key], tmp_prefix[key], out_prefix[key])
        published = True
    finally:
        if bar is not None:
            bar.close()  # its last line ends before an error is printed (a second close is a no-op)
        if throttle is not None:
            throttle.stop()  # a feeder blocked on a slot would keep terminate() from returning
        if pool is not None:
            pool.terminate()
            pool.join()
        if not published:
            for key in keys:
                if key in builders:
                    try:  # closes the .bin; the index it writes is deleted just below
                        builders[key].finalize(index_file_path(tmp_prefix[key]))
                    except Exception:
                        pass
                for path in (data_file_path(tmp_prefix[key]), index_file_path(tmp_prefix[key])):
                    if os.path.exists(path):
                        os.unlink(path)
            for folder in reversed(created):  # deepest first; one holding other files stays
                try:
                    os.rmdir(folder)
                except OSError:
                    break
    seconds = time.perf_counter() - start

    key_stats = {}
    all_lengths = []
    for key in keys:
        st = per_key[key]
        lengths = np.concatenate(st.pop("lengths")) if st["lengths"] else np.zeros(0, np.int64)
        all_lengths.append(lengths)
        key_stats[key] = dict(st, output_prefix=out_prefix[key],
                              length_tokens=length_percentiles(lengths))
    docs = sum(s["docs"] for s in key_stats.values())
    tokens = sum(s["tokens"] for s in key_stats.values())
    empty = sum(s["empty"] for s in key_stats.values())
    stats = {
        "input_files": files,
        "records": counts["records"],
        "docs": docs,
        "tokens": tokens,
        "skipped": counts["bad_lines"] + empty,
        "bad_lines": counts["bad_lines"],
        "empty": empty,
        "whitespace_only": sum(s["whitespace_only"] for s in key_stats.values()),
        "bytes": counts["bytes"],
        "text_bytes": sum(s["text_bytes"] for s in key_stats.values()),
        "seconds": seconds,
        "docs_per_second": docs / seconds if seconds > 0 else None,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "mb_per_second": counts["bytes"] / 1e6 / seconds if seconds > 0 else None,
        "length_tokens": length_percentiles(np.concatenate(all_lengths)),
        "per_key": key_stats,
        "append_eod": bool(args.append_eod),
        "workers": args.workers,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tok.describe(),
    }
    _write_json_atomic(args.output_prefix + ".stats.json", stats, json)
    return stats


def _write_json_atomic(path: str, obj: dict, json) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    from megatron_lite.config.checks import check_output_path

    try:
        check_output_path("--output-prefix", args.output_prefix, "prefix")  # before the work
        s = preprocess(args)
    except BadRecordError as e:
        print(f"preprocess_data.py: error: {e}; pass --skip-bad-lines to skip and count such "
              f"records", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    lt = s["length_tokens"]
    print(f"docs={s['docs']} tokens={s['tokens']} skipped={s['skipped']} "
          f"(bad_lines={s['bad_lines']} empty={s['empty']}, of which whitespace-only "
          f"{s['whitespace_only']}) bytes={s['bytes']} "
          f"seconds={s['seconds']:.2f} docs/s={s['docs_per_second'] or 0:.1f} "
          f"MB/s={s['mb_per_second'] or 0:.2f} tokens/s={s['tokens_per_second'] or 0:.0f}")
    print(f"doc length (tokens): p50={lt['p50']} p90={lt['p90']} p99={lt['p99']} max={lt['max']}")
    for key, ks in s["per_key"].items():
        print(f"wrote {ks['output_prefix']}.bin/.idx ({ks['docs']} docs, {ks['tokens']} tokens)")
    print(f"wrote {args.output_prefix}.stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
