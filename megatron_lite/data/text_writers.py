"""Writing raw-text corpora back out (filtered shards of ``tools/dedup.py`` and
``tools/contamination.py --decontaminate``): JSONL, optionally compressed, written atomically.

A JSONL input record is written back byte for byte (its original line), so the kept documents of
a filtered shard are exactly the input's; a Parquet row or ``.txt`` document becomes one JSON
object of the requested keys.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from typing import Iterator

from megatron_lite.data.text_readers import RawRecord
from megatron_lite.utils import atomic_output

WRITABLE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def output_name(input_path: str) -> str:
    """The file name a filtered copy of ``input_path`` gets: the same name for JSONL inputs
    (``.json`` read as JSONL keeps its suffix), ``<stem>.jsonl`` for Parquet and ``.txt``."""
    base = os.path.basename(input_path)
    lower = base.lower()
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst"):
        if lower.endswith(suffix):
            return base
    stem = base.rsplit(".", 1)[0]
    return stem + ".jsonl"


def check_outputs_spare_inputs(outputs: list[str], inputs: list[str], flag: str) -> None:
    """Refuse a filtered copy that would land on one of its own inputs.

    Raises:
        ValueError: naming ``flag``, the output and the input it would replace.
    """
    ins = {os.path.realpath(p) for p in inputs}
    for out in outputs:
        if os.path.realpath(out) in ins:
            raise ValueError(f"{flag}: the filtered copy {out} would replace the input shard of the same "
                             f"name; choose another folder")


def record_line(rec: RawRecord, texts: dict[str, str]) -> bytes:
    """The output line (with ``\\n``) for one record: the original bytes of a JSONL record, else
    the JSON object ``texts``."""
    if rec.kind == "jsonl":
        return bytes(rec.payload) + b"\n"
    return json.dumps(texts, ensure_ascii=False).encode("utf-8") + b"\n"


@contextlib.contextmanager
def jsonl_writer(path: str) -> Iterator:
    """Yield a binary stream for JSONL lines that lands at ``path`` atomically; compressed with
    zstd (``.zst``) or gzip (``.gz``, mtime 0 so equal content gives equal bytes) by suffix.

    Raises:
        ValueError: ``path`` does not end in one of :data:`WRITABLE_SUFFIXES` or ``.json*``.
        OSError: the folder cannot be written.
    """
    lower = path.lower()
    if not lower.endswith(WRITABLE_SUFFIXES + (".json", ".json.gz", ".json.zst")):
        raise ValueError(f"{path}: output must end in one of {', '.join(WRITABLE_SUFFIXES)}")
    with atomic_output(path) as raw:
        if lower.endswith(".zst"):
            import zstandard  # why: optional codec, imported only for .zst outputs

            with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as z:
                yield z
        elif lower.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
                yield g
        else:
            yield raw
