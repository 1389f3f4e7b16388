#!/usr/bin/env python
"""Concatenate several ``.bin``/``.idx`` datasets into one (Megatron-LM's merge_datasets.py).

Example::

    python tools/merge_datasets.py --input data/shard_000_text_document data/shard_001_text_document \\
        --output-prefix data/all_text_document

``--input`` takes prefixes, or directories (every ``*.idx`` with a matching ``.bin`` inside, in
sorted order). Documents keep their order: inputs in the order given. All inputs must share one
token dtype. The output pair is written atomically (temporary names, ``.idx`` renamed last).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.data.indexed import (IndexedDataset, IndexedDatasetBuilder, data_file_path,  # noqa: E402
                                        finalize_atomic)


def expand(inputs):
    """Prefixes from prefixes and directories.

    Raises:
        FileNotFoundError: an input is neither a directory nor a prefix with .bin/.idx.
    """
    out = []
    for x in inputs:
        if os.path.isdir(x):
            found = sorted(os.path.join(x, f[:-4]) for f in os.listdir(x) if f.endswith(".idx")
                           and os.path.isfile(os.path.join(x, f[:-4] + ".bin")))
            if not found:
                raise FileNotFoundError(f"--input {x}: directory holds no .bin/.idx pairs")
            out.extend(found)
        elif os.path.isfile(x + ".idx") and os.path.isfile(x + ".bin"):
            out.append(x)
        else:
            raise FileNotFoundError(f"--input {x}: no {x}.bin/{x}.idx (give prefixes without the extension)")
    return out


def merge(prefixes, output_prefix: str) -> dict:
    """Merge ``prefixes`` into ``output_prefix``; returns counts (sequences, documents, tokens).

    Raises:
        ValueError: inputs with different token dtypes, or the output among the inputs.
    """
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    first = IndexedDataset(prefixes[0])
    for p in prefixes[1:]:
        dt = IndexedDataset(p).dtype
        if dt != first.dtype:
            raise ValueError(f"{p}: dtype {dt.name} differs from {prefixes[0]}'s {first.dtype.name}")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(data_file_path(tmp), first.dtype)
    try:
        for p in prefixes:
            builder.merge_file_(p)
        finalize_atomic(builder, tmp, output_prefix)
    finally:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    out = IndexedDataset(output_prefix)
    return {"sequences": len(out), "documents": len(out.document_indices) - 1, "tokens": out.num_tokens()}


def main(argv=None) -> int:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories, in order")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    args = p.parse_args(argv)
    from megatron_lite.config.checks import check_output_path

    try:
        check_output_path("--output-prefix", args.output_prefix, "prefix")
        stats = merge(expand(args.input), args.output_prefix)
    except (ValueError, FileNotFoundError) as e:
        print(f"merge_datasets.py: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.input)} input(s) into {args.output_prefix}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
