#!/usr/bin/env python
"""Train a lossless SentencePiece tokenizer (BPE by default, unigram optional) on raw text.

Example::

    python tools/train_tokenizer.py --input 'corpus/*.jsonl.zst' --json-keys text \\
        --model-prefix tok/sp32k --vocab-size 32000 --num-threads 16

Writes ``<model-prefix>.model``, ``<model-prefix>.vocab`` and ``<model-prefix>.stats.json``.

Lossless by construction: the text is not normalised (``normalization_rule_name=identity``),
whitespace is not collapsed (``remove_extra_whitespaces=False``), runs of spaces may form pieces
(``allow_whitespace_only_pieces``), no dummy-prefix space is added, and characters outside the
vocabulary become UTF-8 byte pieces (``--byte-fallback``, on by default) instead of ``<unk>``, so
``decode(encode(t)) == t`` for any text. SentencePiece's own defaults are lossy (NFKC and
whitespace collapsing break indentation and repeated spaces; issue 2 measured most code lines
failing the round trip).

Documents are cut into training "sentences" at newline boundaries (each keeps its ``"\\n"`` so
newlines are learned as a piece), each at most ``--max-sentence-length`` bytes. A held-out sample
(every k-th document, ``k = round(1 / --held-out-fraction)``, at most ``--held-out-max-docs``
documents) is excluded from training and used for the statistics: tokens per character and the
fraction of documents that survive ``decode(encode(t))``.

Deterministic: the same input and flags give a byte-identical ``.model`` and ``.vocab``
(SentencePiece's sampling seed is fixed; the model records ``--model-prefix``, not the temporary
file it was trained under).

Special ids: ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos / eod) = 2, no pad id (the wrapper
reports ``pad`` as None).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Iterable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402

from megatron_lite.data.text_readers import BadRecordError, expand_inputs, iter_texts  # noqa: E402
from megatron_lite.utils import atomic_write_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag documented in ``--help``)."""
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="input files, directories or globs (.jsonl, .json, .jsonl.gz, .jsonl.zst, "
                        ".parquet, .txt = one document per file)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON keys / Parquet columns whose text is used (all keys are trained on)")
    p.add_argument("--model-prefix", required=True,
                   help="output path prefix: writes <prefix>.model, <prefix>.vocab, "
                        "<prefix>.stats.json")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="vocabulary size in pieces, including 3 specials and 256 byte pieces when "
                        "--byte-fallback is on")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe",
                   help="SentencePiece algorithm")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="fraction of characters covered by character pieces; the rest become byte "
                        "pieces (with --byte-fallback) or <unk>")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode out-of-vocabulary characters as UTF-8 byte pieces (lossless); "
                        "--no-byte-fallback maps them to <unk>")
    p.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True,
                   help="split numbers into single-digit pieces")
    p.add_argument("--user-defined-symbols", nargs="+", default=[],
                   help="pieces always kept whole and matched in text (e.g. '<|im_start|>')")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="max training sentences (chunks of whole lines, see "
                        "--max-sentence-length), a uniform sample of the input with a fixed "
                        "seed; 0 = use all. "
                        "Trainer memory grows with this times the mean sentence size")
    p.add_argument("--max-sentence-length", type=int, default=4192,
                   help="max bytes of one training sentence; lines are grouped up to this size and "
                        "longer lines are cut")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1,
                   help="trainer threads")
    p.add_argument("--held-out-fraction", type=float, default=0.01,
                   help="fraction of documents held out of training for the stats (0 = none)")
    p.add_argument("--held-out-max-docs", type=int, default=2000,
                   help="cap on held-out documents; later would-be held-out documents are trained on")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed input records instead of stopping")
    return p


def training_sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Cut a document into training sentences of at most ``max_bytes`` UTF-8 bytes.

    Cuts fall after a ``"\\n"`` (kept) so newline-adjacent context is learned; a single line longer
    than ``max_bytes`` is cut every ``max_bytes // 4`` characters (a character is at most 4 bytes).
    Splitting uses ``"\\n"`` only: U+2028 and friends are content.
    """
    buf: list[str] = []
    size = 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i < len(lines) - 1:
            line += "\n"
        if not line:
            continue
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > max_bytes:
            step = max(1, max_bytes // 4)
            for j in range(0, len(line), step):
                yield line[j:j + step]
            continue
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _split_held_out(docs: Iterable[dict[str, str]], fraction: float, max_docs: int,
                    held_out: list[str]) -> Iterator[str]:
    """Yield training documents' texts; append held-out ones to ``held_out``."""
    every = round(1 / fraction) if fraction > 0 else 0
    for i, rec in enumerate(docs):
        hold = every > 0 and i % every == every - 1 and len(held_out) < max_docs
        for text in rec.values():
            if hold:
                held_out.append(text)
            else:
                yield text


_SEED = 1234  # of the sentence sample (_sample)


def _sample(stream: Iterable[str], k: int) -> Iterator[str]:
    """A uniform sample of ``k`` sentences of ``stream`` (all of them when it has no more),
    drawn with a fixed seed (reservoir sampling, Vitter's algorithm R).

    SentencePiece's own sampling (``shuffle_input_sentence``) draws from a generator seeded by the
    clock, which ``set_random_generator_seed`` does not reach in this path, so the same corpus
    gave a different tokenizer on each run. The sample is handed over last-first, each sentence
    dropped here as SentencePiece takes its copy.
    """
    if k <= 0:  # --input-sentence-size 0: every sentence
        yield from stream
        return
    rng = random.Random(_SEED)
    pool: list[str] = []
    for i, s in enumerate(stream):
        if i < k:
            pool.append(s)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                pool[j] = s
    while pool:
        yield pool.pop()


def _record_prefix(model_file: str, model_prefix: str) -> None:
    """Put ``--model-prefix`` into the model's ``trainer_spec.model_prefix`` in place of the
    temporary prefix (with its process id) the model was trained under, so that a rerun with the
    same input and flags writes the same bytes."""
    from sentencepiece import sentencepiece_model_pb2  # why: needs protobuf, only here

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = model_prefix
    with open(model_file, "wb") as f:
        f.write(proto.SerializeToString(deterministic=True))


def _replace_all(pairs: list[tuple[str, str]]) -> None:
    for src, dst in pairs:
        os.replace(src, dst)


def _write_json_atomic(path: str, obj: dict) -> None:
    # atomic_write_text, not mkstemp: the stats file follows the umask like the model beside it
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def train(args: argparse.Namespace) -> dict:
    """Train the model described by ``args`` and write model, vocab and stats atomically.

    Returns:
        The stats dict written to ``<model-prefix>.stats.json``.

    Raises:
        ValueError: bad flag values, or SentencePiece rejects the settings (e.g. a vocabulary too
            small for the characters plus byte pieces, or too large for the corpus).
        BadRecordError: a malformed input record without ``--skip-bad-lines``.
    """
    import sentencepiece as spm

    from megatron_lite.data.tokenizer import SentencePieceTokenizer

    if args.vocab_size <= 3 + (256 if args.byte_fallback else 0):
        raise ValueError(f"--vocab-size {args.vocab_size} is too small: it must exceed the 3 "
                         f"special pieces{' + 256 byte pieces (--byte-fallback)' if args.byte_fallback else ''}")
    if not 0 <= args.held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction {args.held_out_fraction} must be in [0, 1)")
    if not 0 < args.character_coverage <= 1:
        raise ValueError(f"--character-coverage {args.character_coverage} must be in (0, 1]")
    files = expand_inputs(args.input)
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    counters: dict[str, int] = {}
    held_out: list[str] = []
    n_sentences = 0

    reader_error: list[BaseException] = []

    def sentences() -> Iterator[str]:
        nonlocal n_sentences
        docs = iter_texts(files, args.json_keys, args.skip_bad_lines, counters)
        try:
            for text in _split_held_out(docs, args.held_out_fraction, args.held_out_max_docs,
                                        held_out):
                for s in training_sentences(text, args.max_sentence_length):
                    n_sentences += 1
                    yield s
        except Exception as e:  # re-raised below: SentencePiece's C++ loop would mangle it
            reader_error.append(e)

    tmp_prefix = os.path.join(out_dir, f".tmp-{os.getpid()}-{os.path.basename(args.model_prefix)}")
    start = time.perf_counter()
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sample(sentences(), args.input_sentence_size),
                model_prefix=tmp_prefix,
                vocab_size=args.vocab_size, model_type=args.model_type,
                character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                split_digits=args.split_digits,
                user_defined_symbols=list(args.user_defined_symbols),
                input_sentence_size=args.input_sentence_size, shuffle_input_sentence=False,
                max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
                # Lossless settings (see module docstring).
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, add_dummy_prefix=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        except RuntimeError as e:
            if reader_error:
                raise reader_error[0] from None
            raise ValueError(f"SentencePiece rejected the settings: {e} (adjust --vocab-size or "
                             f"--character-coverage)") from None
        if reader_error:
            raise reader_error[0]
        seconds = time.perf_counter() - start
        _record_prefix(tmp_prefix + ".model", args.model_prefix)
        # The .model is the file users point at; rename it last so its presence implies the rest.
        _replace_all([(tmp_prefix + ".vocab", args.model_prefix + ".vocab"),
                      (tmp_prefix + ".model", args.model_prefix + ".model")])
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.unlink(tmp_prefix + ext)

    tok = SentencePieceTokenizer(args.model_prefix + ".model")
    chars = sum(len(t) for t in held_out)
    tokens = 0
    lossless = 0
    for text in held_out:
        ids = tok.encode(text)
        tokens += len(ids)
        lossless += tok.decode(ids) == text
    stats = {
        "model": args.model_prefix + ".model",
        "model_type": args.model_type,
        "vocab_size": tok.vocab_size,
        "training_seconds": round(seconds, 3),
        "input_files": files,
        "records": counters.get("records", 0),
        "bad_lines": counters.get("bad_lines", 0),
        "training_sentences": n_sentences,
        "held_out": {
            "docs": len(held_out),
            "chars": chars,
            "tokens": tokens,
            "tokens_per_char": tokens / chars if chars else None,
            "roundtrip_lossless_fraction": lossless / len(held_out) if held_out else None,
        },
        "settings": {k: getattr(args, k) for k in (
            "character_coverage", "byte_fallback", "split_digits", "user_defined_symbols",
            "input_sentence_size", "max_sentence_length", "json_keys")},
        "special_ids": {"unk": tok.unk, "bos": tok.bos, "eos": tok.eos, "eod": tok.eod,
                        "pad": tok.pad},
    }
    _write_json_atomic(args.model_prefix + ".stats.json", stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from megatron_lite.config.checks import check_output_path

    try:
        check_output_path("--model-prefix", args.model_prefix, "prefix")  # before the training
        stats = train(args)
    except (BadRecordError, ValueError, FileNotFoundError) as e:
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    h = stats["held_out"]
    tpc = f"{h['tokens_per_char']:.4f}" if h["tokens_per_char"] is not None else "n/a"
    print(f"vocab_size={stats['vocab_size']} training_seconds={stats['training_seconds']:.2f} "
          f"records={stats['records']} bad_lines={stats['bad_lines']} "
          f"held_out_docs={h['docs']} tokens_per_char={tpc} "
          f"roundtrip_lossless_fraction={h['roundtrip_lossless_fraction']}")
    print(f"wrote {args.model_prefix}.model, .vocab, .stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
