"""Readers for raw text corpora: JSONL (plain, .gz, .zst), Parquet and plain-text files.

Used by ``tools/train_tokenizer.py`` and ``tools/preprocess_data.py``. Reading is split in two steps
so the expensive half can run in worker processes:

1. :func:`iter_raw_records` (main process, cheap): yields :class:`RawRecord` objects in file order —
   for JSONL the undecoded bytes of one line, for Parquet one row's requested columns, for ``.txt``
   the whole file.
2. :func:`parse_record` (any process): turns a raw record into ``{json_key: text}`` or raises
   :class:`BadRecordError` naming ``file:line`` and the parser's message.

Format rules (see issue 2, item 3):

* JSONL records are separated by ``"\\n"`` only. A raw U+2028, U+2029 or U+0085 inside a JSON string
  is content, never a record separator (``str.splitlines`` would split on them, so it is never used).
  A trailing ``"\\r\\n"`` is accepted, and a UTF-8 byte-order mark at the start of a file is dropped.
  Lines that are empty or only whitespace (e.g. the last line of a file) are not records.
* ``.json`` / ``.json.gz`` / ``.json.zst`` files are read as JSONL, as Megatron-LM does.
* Parquet: one record per row; the columns named by ``json_keys`` must be string columns.
  Error positions are ``file:row N`` (1-based).
* ``.txt``: the whole file is one document (UTF-8, BOM dropped, line endings kept byte for byte).
  It supplies the text of every requested key, so use it with a single key.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
import re
from typing import Any, Iterator, Sequence

_BOM = b"\xef\xbb\xbf"
# A JSON \uXXXX escape of a UTF-16 surrogate: only a record holding one can decode to a str that
# is not valid Unicode (a lone surrogate), so only those records pay for the check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

# Suffix -> format name. Longest suffixes first so ".jsonl.gz" is not taken for ".gz".
_SUFFIXES = (
    (".jsonl.zst", "jsonl.zst"), (".json.zst", "jsonl.zst"),
    (".jsonl.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"),
    (".jsonl", "jsonl"), (".json", "jsonl"),
    (".parquet", "parquet"),
    (".txt", "txt"),
)
SUPPORTED_SUFFIXES = tuple(s for s, _ in _SUFFIXES)


class BadRecordError(ValueError):
    """A record that cannot be turned into text.

    Attributes:
        path: the input file.
        line: 1-based line number (JSONL) or row number (Parquet); 0 for a whole ``.txt`` file.
        reason: the parser's message.
    """

    def __init__(self, path: str, line: int, reason: str):
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One undecoded record, cheap to pickle to a worker process.

    Attributes:
        path: input file it came from.
        line: 1-based line (JSONL), row (Parquet) or 0 (``.txt``).
        kind: ``"jsonl"`` (payload: line bytes without the line ending), ``"row"`` (payload: dict of
            column -> value) or ``"text"`` (payload: bytes of a whole ``.txt`` file).
        payload: see ``kind``.
        nbytes: size of the record in the input, in bytes (for MB/s figures).
    """

    path: str
    line: int
    kind: str
    payload: Any
    nbytes: int


def detect_format(path: str) -> str:
    """Return the input format of ``path`` from its suffix.

    Raises:
        ValueError: the suffix is not one of :data:`SUPPORTED_SUFFIXES`.
    """
    lower = path.lower()
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unsupported input file type; expected one of "
                     f"{', '.join(SUPPORTED_SUFFIXES)}")


def expand_inputs(patterns: Sequence[str], flag: str = "--input") -> list[str]:
    """Expand files, directories and glob patterns into a sorted, de-duplicated file list.

    A pattern's matches are sorted so the document order is reproducible; patterns keep the order
    given. A directory contributes every supported file below it.

    Raises:
        FileNotFoundError: a pattern matches nothing (the message names the pattern).
        ValueError: a matched file has an unsupported suffix.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):  # checked first: a directory is never itself an input
            matches = sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                             if os.path.isfile(p) and p.lower().endswith(SUPPORTED_SUFFIXES))
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            # exists-and-not-a-directory (not isfile) so named pipes and /dev/fd/N work too.
            matches = [pattern] if os.path.exists(pattern) else []
        if not matches:
            raise FileNotFoundError(f"{flag} {pattern!r}: no such file (or the glob matched "
                                    f"nothing)")
        for path in matches:
            detect_format(path)
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _open_binary(path: str, fmt: str) -> io.BufferedIOBase:
    if fmt == "jsonl.gz":
        return gzip.open(path, "rb")
    if fmt == "jsonl.zst":
        import zstandard

        raw = open(path, "rb")
        # The zstd stream reader has no readline(); BufferedReader adds line iteration.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _iter_jsonl(path: str, fmt: str) -> Iterator[RawRecord]:
    with _open_binary(path, fmt) as f:
        # Iterating a binary file splits on b"\n" only, which is exactly the JSONL rule.
        for lineno, line in enumerate(f, start=1):
            nbytes = len(line)
            if lineno == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if line.endswith(b"\n"):
                line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            yield RawRecord(path, lineno, "jsonl", line, nbytes)


def _iter_parquet(path: str, json_keys: Sequence[str]) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    missing = [k for k in json_keys if k not in names]
    if missing:
        raise ValueError(f"{path}: parquet file has no column(s) {missing}; columns are {names}. "
                         f"Pass the right --json-keys.")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=list(json_keys)):
        columns = {k: batch.column(k).to_pylist() for k in json_keys}
        for i in range(batch.num_rows):
            row += 1
            values = {k: columns[k][i] for k in json_keys}
            nbytes = sum(len(v.encode("utf-8")) for v in values.values() if isinstance(v, str))
            yield RawRecord(path, row, "row", values, nbytes)


def iter_raw_records(path: str, json_keys: Sequence[str] = ("text",)) -> Iterator[RawRecord]:
    """Yield the records of one input file in order, undecoded.

    Args:
        path: input file (format from its suffix, see :func:`detect_format`).
        json_keys: the fields to read (Parquet reads only these columns).

    Raises:
        ValueError: unsupported suffix, or a Parquet file without a requested column.
        OSError: the file cannot be read (including corrupt gzip/zstd streams).
    """
    fmt = detect_format(path)
    if fmt.startswith("jsonl"):
        yield from _iter_jsonl(path, fmt)
    elif fmt == "parquet":
        yield from _iter_parquet(path, json_keys)
    else:
        with open(path, "rb") as f:
            data = f.read()
        yield RawRecord(path, 0, "text", data, len(data))


def iter_record_chunks(path: str, json_keys: Sequence[str] = ("text",), size: int = 256) -> Iterator[list[RawRecord]]:
    """:func:`iter_raw_records` of one file in lists of up to ``size`` records (the unit a tool
    hands to its worker pool), in order.

    Raises:
        As :func:`iter_raw_records`.
    """
    buf: list[RawRecord] = []
    for rec in iter_raw_records(path, json_keys):
        buf.append(rec)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def parse_record(rec: RawRecord, json_keys: Sequence[str] = ("text",)) -> dict[str, str]:
    """Decode a raw record into ``{key: text}`` for every key in ``json_keys``.

    Raises:
        BadRecordError: invalid UTF-8, malformed JSON (message from :mod:`json` with its column),
            a record that is not a JSON object, a missing key, a non-string value, or a string
            with a lone surrogate escape (``"a\\ud800b"``: no tokenizer can encode it).
    """
    if rec.kind == "text":
        data = rec.payload[len(_BOM):] if rec.payload.startswith(_BOM) else rec.payload
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecordError(rec.path, rec.line, f"invalid UTF-8: {e}") from None
        return {k: text for k in json_keys}
    if rec.kind == "jsonl":
        try:
            obj = json.loads(rec.payload.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRecordError(rec.path, rec.line, f"invalid UTF-8: {e}") from None
        except json.JSONDecodeError as e:
            raise BadRecordError(rec.path, rec.line,
                                 f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BadRecordError(rec.path, rec.line,
                                 f"expected a JSON object, got {type(obj).__name__}")
        check_unicode = _SURROGATE_ESCAPE.search(rec.payload) is not None
    else:
        obj = rec.payload
        check_unicode = False
    out = {}
    for key in json_keys:
        if key not in obj:
            raise BadRecordError(rec.path, rec.line, f"missing key {key!r} (see --json-keys)")
        value = obj[key]
        if not isinstance(value, str):
            raise BadRecordError(rec.path, rec.line,
                                 f"key {key!r} is {type(value).__name__}, expected a string")
        if check_unicode:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRecordError(rec.path, rec.line,
                                     f"key {key!r} holds a lone surrogate "
                                     f"{value[e.start].encode('unicode_escape').decode()} at "
                                     f"character {e.start} (a \\uD800-\\uDFFF escape without "
                                     f"its pair): not valid Unicode text") from None
        out[key] = value
    return out


def iter_texts(paths: Sequence[str], json_keys: Sequence[str] = ("text",),
               skip_bad_lines: bool = False,
               counters: dict[str, int] | None = None) -> Iterator[dict[str, str]]:
    """Yield ``{key: text}`` for every record of every file, in order (single process).

    Args:
        paths: input files (already expanded, see :func:`expand_inputs`).
        json_keys: fields to read.
        skip_bad_lines: skip records that fail :func:`parse_record` instead of raising.
        counters: if given, ``counters["bad_lines"]`` is incremented per skipped record and
            ``counters["records"]`` per good one.

    Raises:
        BadRecordError: a bad record when ``skip_bad_lines`` is False.
    """
    if counters is not None:
        counters.setdefault("bad_lines", 0)
        counters.setdefault("records", 0)
    for path in paths:
        for rec in iter_raw_records(path, json_keys):
            try:
                texts = parse_record(rec, json_keys)
            except BadRecordError:
                if not skip_bad_lines:
                    raise
                if counters is not None:
                    counters["bad_lines"] += 1
                continue
            if counters is not None:
                counters["records"] += 1
            yield texts
