"""Write a JSONL corpus from the Python standard library's own source files.

Every machine with Python has this text, so the quickstart needs no download. Each ``.py`` file is
one document (``{"text": ..., "path": ...}``); files are split deterministically into a training
corpus and a held-out corpus by a hash of their relative path (about ``--heldout-percent`` % of all
files held out; ``--max-mb`` caps the training corpus only).

Usage: python examples/make_stdlib_corpus.py --out-dir DIR [--max-mb 8] [--heldout-percent 5]
Writes DIR/stdlib_train.jsonl and DIR/stdlib_heldout.jsonl atomically and prints their sizes (bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig


def iter_stdlib_files(root: str):
    """Yield (relative path, text) for every UTF-8 decodable .py file under ``root``, sorted."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        yield os.path.relpath(path, root), text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, help="folder for stdlib_{train,heldout}.jsonl")
    p.add_argument("--max-mb", type=float, default=8.0,
                   help="stop after this many MB of training text (default 8)")
    p.add_argument("--heldout-percent", type=float, default=5.0,
                   help="share of files held out for evaluation, by path hash (default 5)")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                   help="standard library folder (default: this interpreter's)")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    train_path = os.path.join(args.out_dir, "stdlib_train.jsonl")
    held_path = os.path.join(args.out_dir, "stdlib_heldout.jsonl")
    budget = int(args.max_mb * 1e6)
    sizes = {"train": 0, "heldout": 0}
    docs = {"train": 0, "heldout": 0}
    with open(train_path + ".tmp", "w", encoding="utf-8") as ft, \
            open(held_path + ".tmp", "w", encoding="utf-8") as fh:
        for rel, text in iter_stdlib_files(args.stdlib):
            if not text.strip():
                continue
            bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 10000
            split = "heldout" if bucket < args.heldout_percent * 100 else "train"
            if split == "train" and sizes["train"] >= budget:
                continue
            line = json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n"
            (fh if split == "heldout" else ft).write(line)
            sizes[split] += len(text.encode("utf-8"))
            docs[split] += 1
    os.replace(train_path + ".tmp", train_path)
    os.replace(held_path + ".tmp", held_path)
    print(f"[corpus] {args.stdlib}: train {docs['train']} docs {sizes['train'] / 1e6:.1f} MB -> {train_path}; "
          f"held-out {docs['heldout']} docs {sizes['heldout'] / 1e6:.1f} MB -> {held_path}")


if __name__ == "__main__":
    main()
