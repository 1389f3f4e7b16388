"""Fixed-seed training runs whose metrics.jsonl must not change when the code is restructured.

The architecture work (docs/architecture.md) promises that behaviour does not change: the same
flags give the same losses, grad norms and learning rates bit for bit. This script makes that
checkable. ``record`` trains the quickstart model (TP=2, ZeRO-1, fp32 on CPU, 20 steps, gloo,
2 processes) on a small standard-library corpus in four variants and keeps each run's
metrics.jsonl; ``compare`` checks two recordings field by field with ``==`` on the floats.

Variants:

* ``plain``: the quickstart's flags, validation every 10 steps, a checkpoint at step 10 and 20;
* ``extras``: the same with ``--spike-detection --spike-window 5`` and ``--noise-scale-interval 2``
  (A = 2 micro-batches per step, so the noise scale is measured);
* ``resume``: ``plain`` stopped at step 10 by ``--exit-interval 10`` and resumed to step 20 from
  its checkpoint (the resumed steps must equal the uninterrupted ones too);
* ``nan``: ``plain`` without checkpoints, where step 4 is made non-finite on rank 0 through the
  fault-injection hook, so the skip path (a logged NaN loss, skipped_steps 1) is compared.

Usage::

    python bench/behaviour_baseline.py record --data DIR --out bench/baselines/before
    python bench/behaviour_baseline.py compare bench/baselines/before bench/baselines/after

``--data DIR`` holds the corpus, tokenizer and .bin/.idx (made on first use, reused after, so the
two recordings read identical token ids). ``compare`` exits 1 and names the first difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("loss", "grad_norm", "lr", "consumed_samples", "skipped_steps", "val_loss",
          "noise_scale/b_simple", "noise_scale/g2", "noise_scale/trace_sigma", "spikes")

MODEL = ["--tp", "2", "--zero-stage", "1", "--model-size", "tiny", "--hidden-size", "256",
         "--num-layers", "4", "--num-attention-heads", "8", "--num-query-groups", "4",
         "--ffn-hidden-size", "704", "--seq-length", "256", "--max-position-embeddings", "256",
         "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", "20",
         "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "5", "--lr-decay-style", "cosine",
         "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "1", "--seed", "1234",
         "--num-workers", "0", "--split", "98,2,0"]


def _run(cmd: list[str], env: dict | None = None) -> None:
    full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    res = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"behaviour_baseline: {' '.join(cmd[:4])} ... failed ({res.returncode})")


def prepare_data(data: str) -> tuple[str, str]:
    """Corpus -> tokenizer -> .bin/.idx under ``data`` (reused when present)."""
    tok, prefix = os.path.join(data, "spm.model"), os.path.join(data, "train")
    if os.path.isfile(prefix + "_text_document.idx") and os.path.isfile(tok):
        return tok, prefix + "_text_document"
    os.makedirs(data, exist_ok=True)
    py = sys.executable
    _run([py, "examples/make_stdlib_corpus.py", "--out-dir", data, "--max-mb", "1"])
    corpus = os.path.join(data, "stdlib_train.jsonl")
    _run([py, "tools/train_tokenizer.py", "--input", corpus, "--json-keys", "text",
          "--model-prefix", os.path.join(data, "spm"), "--vocab-size", "4096", "--model-type", "bpe",
          "--input-sentence-size", "100000", "--num-threads", "2"])
    _run([py, "tools/preprocess_data.py", "--input", corpus, "--json-keys", "text",
          "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
          "--output-prefix", prefix, "--workers", "1", "--append-eod"])
    return tok, prefix + "_text_document"


def _train(argv: list[str], env: dict | None = None) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "pretrain_llama.py", *argv], env)


def record(data: str, out: str) -> None:
    """Train every variant and copy its metrics.jsonl to ``out/<variant>.jsonl``."""
    tok, prefix = prepare_data(data)
    common = MODEL + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
                      "--data-path", prefix]
    scratch = os.path.join(out, "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    runs = {
        "plain": [common + ["--save", f"{scratch}/plain", "--save-interval", "10"]],
        "extras": [common + ["--save", f"{scratch}/extras", "--save-interval", "10",
                             "--spike-detection", "--spike-window", "5",
                             "--noise-scale-interval", "2"]],
        "resume": [common + ["--save", f"{scratch}/resume", "--save-interval", "10",
                             "--exit-interval", "10"],
                   common + ["--save", f"{scratch}/resume", "--save-interval", "10",
                             "--load", f"{scratch}/resume"]],
        "nan": [common + ["--metrics-file", f"{scratch}/nan/metrics.jsonl"]],
    }
    for name, launches in runs.items():
        for argv in launches:
            _train(argv, {"MEGATRON_LITE_INJECT_NAN": "4:0"} if name == "nan" else None)
        src = os.path.join(scratch, name, "metrics.jsonl")
        shutil.copyfile(src, os.path.join(out, f"{name}.jsonl"))
        print(f"recorded {name}: {sum(1 for _ in open(src))} records", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(before: str, after: str) -> int:
    """0 when every variant's step and eval records agree on :data:`FIELDS` exactly, else 1."""
    status = 0
    for name in sorted(f for f in os.listdir(before) if f.endswith(".jsonl")):
        a, b = _records(os.path.join(before, name)), _records(os.path.join(after, name))
        key = lambda rs: [(r.get("type"), r.get("step")) for r in rs]  # noqa: E731
        if key(a) != key(b):
            print(f"{name}: different records: {key(a)[:6]}... vs {key(b)[:6]}...")
            status = 1
            continue
        diffs = [(ra.get("step"), f, ra.get(f), rb.get(f)) for ra, rb in zip(a, b) for f in FIELDS
                 if not _same(ra.get(f), rb.get(f))]
        if diffs:
            print(f"{name}: {len(diffs)} differences, first: step {diffs[0][0]} {diffs[0][1]} "
                  f"{diffs[0][2]!r} vs {diffs[0][3]!r}")
            status = 1
        else:
            n = sum(1 for r in a for f in FIELDS if f in r)
            print(f"{name}: {len(a)} records, {n} values equal bit for bit")
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="train the variants and keep their metrics.jsonl")
    r.add_argument("--data", required=True, help="folder for the corpus/tokenizer/.bin (reused)")
    r.add_argument("--out", required=True, help="folder for <variant>.jsonl")
    c = sub.add_parser("compare", help="compare two recordings bit for bit")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(os.path.abspath(args.data), os.path.abspath(args.out))
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
