#!/usr/bin/env python
"""Data-pipeline throughput: preprocessing and the packed-sample index builder.

Prints (no assertions; figures depend on the machine):

1. ``tools/preprocess_data.py`` MB/s and tokens/s with ``--workers 1`` and ``--workers 2`` next to
   a plain single-process SentencePiece encode of the same JSONL file (read + ``json.loads`` +
   ``encode`` per line, nothing written), and their ratios. Issue 2 aims at >= 1.7x for 2 workers.
   The corpus is this interpreter's standard library (``Lib/**/*.py``, one document per file).
2. Sample-index build time for a synthetic corpus of ``--index-tokens`` tokens (default 10^10):
   the C++ builder vs its vectorised NumPy reference (``megatron_lite.data.helpers``) and vs
   the same walk written as a Python loop (:func:`sample_idx_loop`), equality checked, ratios
   printed. Issue 2 aims at >= 20x. Both the C++ walk and the vectorised reference are bound by
   one random read of ``sizes`` per shuffled document, so their ratio stays at a few x; the
   loop ratio is what compiling the scalar algorithm buys.

MB are 10^6 bytes of the JSONL input. Usage::

    python bench/bench_data.py [--max-mb 16] [--vocab-size 8000] [--index-tokens 1e10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import sysconfig
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def fmt_seconds(t: float) -> str:
    """``t`` seconds to 4 significant digits in s, ms or us, so a sub-millisecond build does not
    print as ``0.000 s``."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if t >= scale or unit == "us":
            return f"{t / scale:.4g} {unit}"


def fmt_ratio(slow: float, fast: float) -> str:
    """``slow / fast`` from the unrounded times, to 3 significant digits (``n/a`` if fast <= 0)."""
    return f"{slow / fast:.3g}x" if fast > 0 else "n/a"


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}",
                                                  os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # worker processes unpickle functions by module name
    spec.loader.exec_module(mod)
    return mod


def write_stdlib_corpus(path: str, max_mb: float) -> tuple[int, int]:
    """Write the stdlib's ``.py`` files (sorted, UTF-8 decodable, non-empty) as JSONL documents
    until ``max_mb`` MB; returns (documents, bytes)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    docs = nbytes = 0
    with open(path, "w", encoding="utf-8") as out:
        for fpath in sorted(files):
            try:
                with open(fpath, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            docs += 1
            nbytes += len(line.encode("utf-8"))
            if nbytes >= max_mb * 1e6:
                break
    return docs, nbytes


def plain_encode(jsonl: str, model: str) -> tuple[float, int]:
    """The baseline: one process, read + json.loads + SentencePiece encode;
    (wall seconds, tokens, CPU seconds)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    with open(jsonl, "rb") as f:
        for line in f:
            tokens += len(sp.encode(json.loads(line)["text"]))
    return time.perf_counter() - start, tokens, time.process_time() - cpu


def _spin(n: int) -> int:
    return sum(range(n))


def parallel_capacity(n: int = 2 * 10**7) -> float:
    """How many times faster 2 processes finish 2 equal CPU-bound jobs than 1 process does
    (2.0 on an idle machine with >= 2 free cores; about 1.0 when others already use the cores).
    Puts the 2-worker ratio below in context."""
    import multiprocessing

    t0 = time.perf_counter()
    _spin(n)
    _spin(n)
    serial = time.perf_counter() - t0
    with multiprocessing.Pool(2) as pool:
        pool.map(_spin, [1, 1])  # start-up outside the timing
        t0 = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        parallel = time.perf_counter() - t0
    return serial / parallel


def bench_preprocess(args, work: str) -> None:
    jsonl = os.path.join(work, "stdlib.jsonl")
    docs, nbytes = write_stdlib_corpus(jsonl, args.max_mb)
    print(f"corpus: {docs} stdlib files, {nbytes / 1e6:.2f} MB JSONL ({jsonl})")
    model = args.tokenizer_model
    if model is None:
        train = _load_tool("train_tokenizer")
        prefix = os.path.join(work, "sp")
        t0 = time.perf_counter()
        rc = train.main(["--input", jsonl, "--model-prefix", prefix, "--vocab-size",
                         str(args.vocab_size), "--input-sentence-size", "200000",
                         "--num-threads", "2"])
        if rc:
            raise SystemExit(f"tokenizer training failed (exit {rc})")
        print(f"trained tokenizer (vocab {args.vocab_size}) in {time.perf_counter() - t0:.1f} s")
        model = prefix + ".model"
    plain_s, plain_tok, plain_cpu = plain_encode(jsonl, model)
    plain_mbs = nbytes / 1e6 / plain_s
    rows = [("plain sentencepiece encode (1 process)", plain_s, plain_tok, plain_mbs,
             plain_cpu, 0.0)]
    pre = _load_tool("preprocess_data")
    for workers in (1, 2):
        out = os.path.join(work, f"out_w{workers}")
        argv = ["--input", jsonl, "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", model, "--output-prefix", out, "--workers", str(workers),
                "--append-eod", "--no-progress"]
        cpu0 = time.process_time()
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        s = pre.preprocess(pre.build_parser().parse_args(argv))
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        kids = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        rows.append((f"preprocess_data --workers {workers}", s["seconds"],
                     s["tokens"] - s["docs"], s["mb_per_second"], time.process_time() - cpu0,
                     kids))
    print(f"\n{'':40s} {'wall s':>7s} {'MB/s':>7s} {'tokens/s':>10s} {'vs plain':>8s} "
          f"{'CPU s main':>10s} {'CPU s workers':>13s}")
    for name, sec, tok, mbs, cpu, kids in rows:
        print(f"{name:40s} {sec:7.4g} {mbs:7.4g} {tok / sec:10.0f} {mbs / plain_mbs:7.3g}x "
              f"{cpu:10.2f} {kids:13.2f}")
    print("(tokens exclude the appended EOD; MB/s over the JSONL bytes; CPU seconds show where\n"
          " the work went when other processes share the cores and wall-clock ratios are noisy)")
    cap = parallel_capacity()
    print(f"2-process capacity of this machine right now: {cap:.2f}x (2.00 when two cores are "
          f"free); the --workers 2 speed-up cannot exceed it")


def sample_idx_loop(sizes, doc_idx, seq_length: int, num_samples: int) -> np.ndarray:
    """Megatron-LM's sample-index walk written as a plain Python loop over documents and samples.

    The scalar algorithm the C++ builder compiles (megatron/core/datasets/helpers.cpp
    ``build_sample_idx``), i.e. what one writes without a compiler or a vectorised formulation;
    printed beside the vectorised NumPy reference so both ratios are visible. Same contract as
    :func:`megatron_lite.data.helpers.build_sample_idx_numpy` (no error checks).
    """
    sizes_l, doc_l = sizes.tolist(), doc_idx.tolist()
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    k, offset = 0, 0
    for i in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining:
            length = sizes_l[doc_l[k]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                k += 1
                offset = 0
        out[i, 0] = k
        out[i, 1] = offset
    return out


def bench_sample_index(args) -> dict[str, float]:
    """Time the index builders; prints them and returns the best times in seconds
    (``numpy``, ``cpp``, ``loop``; absent when not measured)."""
    from megatron_lite.data import helpers

    total = int(float(args.index_tokens))
    rng = np.random.default_rng(0)
    n_docs = max(1, total // args.mean_doc_tokens)
    # Document lengths around the mean, adjusted so they sum to exactly `total`.
    sizes = rng.integers(1, 2 * args.mean_doc_tokens, size=n_docs, dtype=np.int64)
    sizes[-1] += total - int(sizes.sum())
    while sizes[-1] <= 0:  # keep every length positive after the adjustment
        k = int(rng.integers(0, n_docs - 1))
        take = min(int(sizes[k]) - 1, 1 - int(sizes[-1]))
        sizes[k] -= take
        sizes[-1] += take
    sizes = sizes.astype(np.int32)
    doc_idx = rng.permutation(n_docs).astype(np.int32)
    num_samples = (total - 1) // args.seq_length
    print(f"\nsample index: {total:.3g} tokens, {n_docs} documents, seq_length {args.seq_length}, "
          f"{num_samples} samples")
    def best_of(fn):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn(sizes, doc_idx, args.seq_length, num_samples)
            times.append(time.perf_counter() - t0)
        return out, min(times)

    ref, t_np = best_of(helpers.build_sample_idx_numpy)
    times = {"numpy": t_np}
    print(f"  NumPy reference: {fmt_seconds(t_np):>10s} (best of {args.repeat})")
    if not helpers.have_cpp():
        print("  C++ builder: not built (python setup.py build_ext --inplace); no ratio")
        return times
    got, t_cpp = best_of(helpers.build_sample_idx_cpp)
    times["cpp"] = t_cpp
    same = np.array_equal(np.asarray(got, dtype=np.int64), ref)
    print(f"  C++ builder:     {fmt_seconds(t_cpp):>10s}   speed-up {fmt_ratio(t_np, t_cpp)} vs "
          f"the NumPy reference   identical: {same}")
    if args.skip_loop:
        return times
    t0 = time.perf_counter()  # one run: the loop takes tens of seconds at 1e10 tokens
    loop = sample_idx_loop(sizes, doc_idx, args.seq_length, num_samples)
    times["loop"] = t_loop = time.perf_counter() - t0
    print(f"  Python loop:     {fmt_seconds(t_loop):>10s}   C++ speed-up {fmt_ratio(t_loop, t_cpp)} "
          f"vs the loop   identical: {np.array_equal(loop, ref)}")
    # The vectorised ratio stays small because both builders are bound by the random reads of
    # sizes[doc_idx[k]] (one cache miss per document for a shuffled order), not by arithmetic:
    # the C++ walk spends ~12-15 ns per document, about one prefetched DRAM access.
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-mb", type=float, default=16.0, help="JSONL corpus size, MB")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer trained for the bench")
    p.add_argument("--tokenizer-model", default=None, help="use this .model instead of training")
    p.add_argument("--index-tokens", default="1e10", help="synthetic corpus size for the index")
    p.add_argument("--mean-doc-tokens", type=int, default=1000, help="mean synthetic doc length")
    p.add_argument("--seq-length", type=int, default=4096, help="sample length, tokens")
    p.add_argument("--repeat", type=int, default=3, help="index builds timed (best is printed)")
    p.add_argument("--skip-preprocess", action="store_true", help="only the index benchmark")
    p.add_argument("--skip-loop", action="store_true", help="do not time the Python-loop walk")
    p.add_argument("--skip-index", action="store_true", help="only the preprocess benchmark")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args(argv)
    import sentencepiece

    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}, "
          f"sentencepiece {sentencepiece.__version__}")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        if not args.skip_preprocess:
            bench_preprocess(args, work)
        if not args.skip_index:
            bench_sample_index(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
