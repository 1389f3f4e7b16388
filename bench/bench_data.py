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

3. With ``--vs-megatron-core``: the loader against Megatron-core's (pip ``megatron-core``, its
   prebuilt C++ helpers; installed with ``--no-deps`` into the work folder when not importable).
   The same blend is built by both: 3 synthetic corpora (``--blend-corpus-tokens`` each, uint16,
   lognormal document lengths), weights 0.5/0.3/0.2, ``--seq-length`` 4096, enough train samples
   for ``--blend-index-tokens`` (1e9) tokens, seed 1234, cold caches. Printed side by side: index
   build time (ours: GPTDatasets + blend; theirs: ``BlendedMegatronDatasetBuilder.build()``), and
   samples/s read through a ``torch.utils.data.DataLoader`` with 2 workers (micro-batch 8,
   ``--loader-samples`` samples; Megatron-core without its dense attention mask, as runs with
   flash attention use it); then whether the two yield the same token sequences for the same
   sample indices, per corpus (GPTDataset alone) and for the blend.

MB are 10^6 bytes of the JSONL input. Usage::

    python bench/bench_data.py [--max-mb 16] [--vocab-size 8000] [--index-tokens 1e10]
    python bench/bench_data.py --skip-preprocess --skip-index --vs-megatron-core
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


MCORE_VERSION = "0.14.0"
BLEND_WEIGHTS = (0.5, 0.3, 0.2)


def _import_megatron_core(work: str, path: str | None):
    """``megatron.core.datasets`` modules, installing megatron-core (no deps) into ``work`` when
    it is not importable (its wheel ships the compiled helpers)."""
    import importlib
    import subprocess

    for extra in ([path] if path else []) + [os.path.join(work, "mcore")]:
        if extra not in sys.path and os.path.isdir(extra):
            sys.path.insert(0, extra)
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")  # unused here
    try:
        importlib.import_module("megatron.core.datasets.gpt_dataset")
    except ImportError:
        target = os.path.join(work, "mcore")
        print(f"installing megatron-core=={MCORE_VERSION} (--no-deps) into {target}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                        f"megatron-core=={MCORE_VERSION}"], check=True)
        sys.path.insert(0, target)
    gpt = importlib.import_module("megatron.core.datasets.gpt_dataset")
    builder = importlib.import_module("megatron.core.datasets.blended_megatron_dataset_builder")
    return gpt, builder


def make_blend_corpora(work: str, tokens: int, mean_doc: int) -> list[str]:
    """Three synthetic corpora of ``tokens`` tokens each (ids in [1, 32000), EOD 0 ending each
    document, lognormal lengths with mean ``mean_doc``); returns their prefixes."""
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    prefixes = []
    for c in range(3):
        rng = np.random.default_rng(100 + c)
        prefix = os.path.join(work, f"corpus{c}_text_document")
        lengths = np.maximum(rng.lognormal(np.log(mean_doc) - 0.5, 1.0, size=2 * tokens // mean_doc).astype(np.int64), 2)
        lengths = lengths[:np.searchsorted(np.cumsum(lengths), tokens) + 1]
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        flat = rng.integers(1, 32000, size=int(lengths.sum()), dtype=np.uint16)
        ends = np.cumsum(lengths)
        flat[ends - 1] = 0
        starts = ends - lengths
        for a, e in zip(starts.tolist(), ends.tolist()):
            b.add_document(flat[a:e])
        b.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


class _Tok:
    """What Megatron-core's GPTDataset reads from a tokenizer (ids, and the identity it hashes
    into its cache key)."""
    eod, pad = 0, -1
    unique_identifiers = {"class": "bench_data.synthetic", "eod": 0}


def _loader_rate(loader, n_batches: int, batch: int, warmup: int = 4) -> float:
    """Samples/s of ``n_batches`` batches after ``warmup`` (one per worker at least: each worker's
    first batch carries its start-up, which is not the loader's steady rate)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def bench_vs_megatron_core(args, work: str) -> dict:
    """Section 3 of the module docstring."""
    import torch

    from megatron_lite.data.builder import build_data_loader, build_train_valid_test_datasets
    from megatron_lite.data.data_config import DataConfig

    gpt_mod, builder_mod = _import_megatron_core(work, args.megatron_core_path)
    if not torch.distributed.is_initialized():  # Megatron-core's BlendedDataset asks for the rank
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    seq = args.seq_length
    n_samples = int(float(args.blend_index_tokens)) // seq
    t0 = time.perf_counter()
    prefixes = make_blend_corpora(work, int(float(args.blend_corpus_tokens)), args.mean_doc_tokens)
    print(f"\n3. loader vs Megatron-core {MCORE_VERSION}: 3 corpora x {float(args.blend_corpus_tokens):.3g} "
          f"tokens (made in {time.perf_counter() - t0:.1f} s), weights {BLEND_WEIGHTS}, seq {seq}, "
          f"{n_samples} train samples ({n_samples * seq:.3g} tokens)")
    blend_arg = [x for w, p in zip(BLEND_WEIGHTS, prefixes) for x in (str(w), p)]
    t_ours = t_theirs = float("inf")
    for r in range(args.repeat):  # best of --repeat cold builds each, alternating: load hits both alike
        ours_cfg = DataConfig(data_path=blend_arg, split="100,0,0", data_cache_path=os.path.join(work, f"cache_ours{r}"))
        t0 = time.perf_counter()
        ours, _, _ = build_train_valid_test_datasets(ours_cfg, seq, (n_samples, 0, 0), seed=1234, eod_id=0)
        t_ours = min(t_ours, time.perf_counter() - t0)
        mc_cfg = gpt_mod.GPTDatasetConfig(
            random_seed=1234, sequence_length=seq, blend=(prefixes, list(BLEND_WEIGHTS)), split="100,0,0",
            path_to_cache=os.path.join(work, f"cache_mcore{r}"), tokenizer=_Tok(), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        t0 = time.perf_counter()
        theirs = builder_mod.BlendedMegatronDatasetBuilder(gpt_mod.GPTDataset, [n_samples, 0, 0],
                                                           lambda: True, mc_cfg).build()[0]
        t_theirs = min(t_theirs, time.perf_counter() - t0)
    print(f"   index build (cold cache, best of {args.repeat}): ours {fmt_seconds(t_ours)}, Megatron-core {fmt_seconds(t_theirs)}, "
          f"Megatron-core / ours {fmt_ratio(t_theirs, t_ours)}")
    mb, batches = 8, max(1, args.loader_samples // 8)
    torch.set_num_threads(1)
    idx = np.random.default_rng(0).integers(0, min(len(ours), len(theirs)), args.loader_samples)
    per_item = {"ours": [], "theirs": []}
    rates = {"ours": [], "theirs": []}
    for _ in range(args.repeat):  # alternating rounds; medians printed
        for name, ds in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            for i in idx:
                ds[int(i)]
            per_item[name].append((time.perf_counter() - t0) / len(idx))
        rates["ours"].append(_loader_rate(build_data_loader(ours, 0, mb, 0, 1, num_workers=2), batches, mb))
        rates["theirs"].append(_loader_rate(torch.utils.data.DataLoader(theirs, batch_size=mb, num_workers=2,
                                                                        shuffle=False), batches, mb))
    med = {k: float(np.median(v)) for k, v in per_item.items()}
    r_ours, r_theirs = float(np.median(rates["ours"])), float(np.median(rates["theirs"]))
    print(f"   one sample in process (__getitem__, {len(idx)} random indices, median of {args.repeat}): ours "
          f"{fmt_seconds(med['ours'])}, Megatron-core {fmt_seconds(med['theirs'])}, Megatron-core / ours "
          f"{fmt_ratio(med['theirs'], med['ours'])}")
    print(f"   DataLoader, 2 workers, micro-batch {mb}, {batches * mb} samples (median of {args.repeat}): ours "
          f"{r_ours:.0f} samples/s, Megatron-core {r_theirs:.0f} samples/s, ours / Megatron-core "
          f"{fmt_ratio(r_ours, r_theirs)}")
    same = _same_samples(ours, theirs, prefixes, seq, gpt_mod, mc_cfg, work)
    return {"build_s": (t_ours, t_theirs), "getitem_s": (med["ours"], med["theirs"]),
            "samples_per_s": (r_ours, r_theirs), "same": same}


def _same_samples(ours, theirs, prefixes, seq, gpt_mod, mc_cfg, work) -> dict:
    """Where the two algorithms coincide, do they give the same result? The blend's source of
    every position (both use Megatron's greedy interleave, ``build_blending_indices``) and the
    position within that source; and, per corpus, the samples per epoch ((T - 1) // L in both).
    The samples' contents differ by design: ours shuffles documents per epoch and samples per
    epoch block from ``(seed, e)`` (so a blended source can grow on resume without reordering,
    ``data/gpt_dataset.py``), Megatron-core shuffles with one ``RandomState(seed)`` over all epochs."""
    m = min(len(ours.dataset_index), len(theirs.dataset_index))
    src_same = bool(np.array_equal(np.asarray(ours.dataset_index[:m]), np.asarray(theirs.dataset_index[:m])))
    pos_same = bool(np.array_equal(np.asarray(ours.dataset_sample_index[:m]),
                                   np.asarray(theirs.dataset_sample_index[:m])))
    per_epoch = []
    for j, p in enumerate(prefixes):
        mine = ours.datasets[j]
        other = theirs.datasets[j]
        theirs_b = (other._get_num_tokens_per_epoch() - 1) // seq  # their own epoch arithmetic
        per_epoch.append((int(mine.samples_per_epoch), theirs_b))
    print(f"   same result where the algorithms coincide: blend source of each of {m} positions "
          f"{'identical' if src_same else 'DIFFERENT'}, position within the source "
          f"{'identical' if pos_same else 'DIFFERENT'}; samples per epoch (ours, Megatron-core): {per_epoch}")
    print("   sample contents differ by design (document/sample shuffles; see data/gpt_dataset.py)")
    return {"blend_sources": src_same, "blend_positions": pos_same, "samples_per_epoch": per_epoch}


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
    p.add_argument("--vs-megatron-core", action="store_true", help="section 3: ours vs Megatron-core's loader")
    p.add_argument("--megatron-core-path", default=None, help="folder holding an installed megatron-core")
    p.add_argument("--blend-corpus-tokens", default="5e7", help="tokens per corpus of the section-3 blend")
    p.add_argument("--blend-index-tokens", default="1e9", help="train tokens the section-3 index covers")
    p.add_argument("--loader-samples", type=int, default=2000, help="samples read per loader in section 3")
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
        if args.vs_megatron_core:
            bench_vs_megatron_core(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
