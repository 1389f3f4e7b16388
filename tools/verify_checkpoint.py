#!/usr/bin/env python
"""Check checkpoints offline against their manifests: every file present, with its recorded size
and checksum (``megatron_lite/checkpoint/verify.py``).

    python tools/verify_checkpoint.py runs/llama/ckpt              # every iter_ folder of a --save dir
    python tools/verify_checkpoint.py runs/llama/ckpt/iter_0001000 # one checkpoint

One line per checkpoint (``ok``, ``ok (sizes only: saved without checksums)`` or ``DAMAGED`` with
every damaged, truncated or missing file), then, for a save folder, what ``latest`` names and the
checkpoint ``--load`` would resume from. Temporary folders of unfinished saves (``.tmp_iter_*``)
are listed and ignored (``--load`` never takes them). Exit status 0 when every checkpoint is
intact, 1 when one is damaged, 2 for a path holding no checkpoint.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.checkpoint.layout import ITER_RE, MANIFEST, iter_of  # noqa: E402
from megatron_lite.checkpoint.verify import candidates, folder_report  # noqa: E402
from megatron_lite.eval.tool_cli import ToolArgumentParser, run_tool  # noqa: E402


def parse_args(argv=None):
    p = ToolArgumentParser(prog="verify_checkpoint.py", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a --save folder (all its checkpoints) or one iter_ folder")
    return p.parse_args(argv)


def check_one(path: str) -> bool:
    """Print one line for checkpoint folder ``path``; True when it is intact."""
    problems, man = folder_report(path)
    name = os.path.basename(os.path.normpath(path))
    if problems:
        print(f"{name}  DAMAGED  " + "; ".join(problems), flush=True)
        return False
    files = man["files"]
    how = (f"{man['checksum_algorithm']} checksums match" if man.get("checksums")
           else "sizes only: saved without checksums")
    print(f"{name}  ok  {len(files)} files, {sum(files.values()) / 1e6:.1f} MB ({how})",
          flush=True)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    path = args.path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (give a --save folder or an iter_ "
                                f"folder)")
    if os.path.isfile(os.path.join(path, MANIFEST)) or ITER_RE.match(os.path.basename(
            os.path.normpath(path))):
        return 0 if check_one(path) else 1
    tags = sorted((d for d in os.listdir(path) if ITER_RE.match(d)), key=iter_of)
    if not tags:
        raise ValueError(f"{path}: no checkpoint here (no iter_NNNNNNN folder, no {MANIFEST})")
    ok = [check_one(os.path.join(path, t)) for t in tags]
    for d in sorted(d for d in os.listdir(path) if d.startswith(".tmp_iter_")):
        print(f"{d}  unfinished save (no manifest; ignored by --load, removed by the next save)")
    latest = os.path.join(path, "latest")
    named = open(latest).read().strip() if os.path.isfile(latest) else "(no latest file)"
    good = {os.path.join(path, t) for t, fine in zip(tags, ok) if fine}
    pick = next((c for c in candidates(path) if c in good), None)
    print(f"latest: {named}; --load would resume from "
          f"{os.path.basename(pick) if pick else 'nothing (an error: no usable checkpoint)'}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(run_tool("verify_checkpoint.py", main))
