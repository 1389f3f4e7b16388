#!/usr/bin/env python
"""Extend a SentencePiece tokenizer with pieces learned on a domain corpus (existing ids kept).

Example::

    python tools/extend_tokenizer.py --base-model tok/spm.model --input 'domain/*.jsonl' \\
        --num-new-pieces 8000 --output-prefix tok/spm_domain

Method: a SentencePiece model of the base's type (BPE or unigram) and normalisation settings
(read from the base ModelProto: normaliser rule, whitespace handling, digit splitting, dummy
prefix) is trained on the domain corpus with ``--domain-vocab-size`` pieces. Its ordinary pieces
that the base does not have are appended, in the domain model's score order, to the base's
ModelProto (``sentencepiece_model_pb2``) until ``--num-new-pieces`` are added; pieces already in
the base are skipped. Ids ``0 .. V_base - 1`` keep their piece, type and score, so old ids decode
exactly as before. Scores of appended pieces: BPE - above every base score, in the domain model's
merge order (``max_base + n - k`` for the k-th of n): SentencePiece's BPE encoder merges the
adjacent pair with the highest-scoring result first, so domain merges win and a domain word is
cut as the domain model cuts it (below the base scores, the base merges would first split it into
base pieces that the new pieces cannot be built from: measured on the test corpus 0.495 vs 0.387
tokens per character). Unigram - the domain model's log probability. Chinese-LLaMA (Cui et al.
2023) likewise appended its pieces above LLaMA's (score 0 against LLaMA's negative scores).

Writes ``<output-prefix>.model`` / ``.vocab`` (atomically) and ``<output-prefix>.stats.json`` with
tokens per character of the domain corpus (``--max-eval-docs`` documents) before and after.
Initialising the new embedding rows: ``cpt_llama.py --extended-vocab-init`` (README, "Continued
pretraining (CPT)").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lite.utils import use_project_venv  # noqa: E402
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how
from megatron_lite.eval.tool_cli import ToolArgumentParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", required=True, help="the base SentencePiece .model")
    p.add_argument("--input", nargs="+", required=True, help="domain corpus files/globs "
                   "(.jsonl[.gz/.zst], .parquet, .txt)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields holding text")
    p.add_argument("--num-new-pieces", type=int, required=True,
                   help="pieces to add at most (fewer when the domain model has fewer new ones)")
    p.add_argument("--domain-vocab-size", type=int, default=None,
                   help="vocabulary of the domain model trained to find them (default: 2x "
                        "--num-new-pieces + 300); larger finds longer pieces")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model/.vocab/.stats.json")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="training sentences sampled at most")
    p.add_argument("--max-sentence-length", type=int, default=4192, help="bytes per sentence")
    p.add_argument("--max-eval-docs", type=int, default=2000,
                   help="domain documents used for the tokens-per-character report")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1,
                   help="SentencePiece training threads")
    return p


def _docs(files: list[str], keys: list[str]) -> Iterator[str]:
    from megatron_lite.data.text_readers import iter_texts

    for rec in iter_texts(files, keys):
        for k in keys:
            if rec.get(k):
                yield rec[k]


def train_domain_model(base_proto, files: list[str], keys: list[str], vocab_size: int,
                       args) -> "object":
    """Train the domain SentencePiece model with the base's settings; returns its ModelProto."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec, norm = base_proto.trainer_spec, base_proto.normalizer_spec
    train_tok = _load_train_tokenizer_module()

    def sentences():
        for text in _docs(files, keys):
            yield from train_tok.training_sentences(text, args.max_sentence_length)

    model_type = {pb.TrainerSpec.BPE: "bpe", pb.TrainerSpec.UNIGRAM: "unigram"}.get(spec.model_type)
    if model_type is None:
        raise ValueError(f"--base-model {args.base_model}: model type "
                         f"{pb.TrainerSpec.ModelType.Name(spec.model_type)} is not supported "
                         "(BPE or UNIGRAM)")
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_prefix=os.path.join(tmp, "domain"),
            vocab_size=vocab_size, model_type=model_type, hard_vocab_limit=False,
            character_coverage=spec.character_coverage, byte_fallback=False,
            split_digits=spec.split_digits, split_by_whitespace=spec.split_by_whitespace,
            split_by_number=spec.split_by_number, split_by_unicode_script=spec.split_by_unicode_script,
            treat_whitespace_as_suffix=spec.treat_whitespace_as_suffix,
            allow_whitespace_only_pieces=spec.allow_whitespace_only_pieces,
            max_sentencepiece_length=spec.max_sentencepiece_length,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
            normalization_rule_name=norm.name or "identity",
            remove_extra_whitespaces=norm.remove_extra_whitespaces,
            add_dummy_prefix=norm.add_dummy_prefix, minloglevel=2)
        proto = pb.ModelProto()
        with open(os.path.join(tmp, "domain.model"), "rb") as f:
            proto.ParseFromString(f.read())
    return proto


def _load_train_tokenizer_module():
    import importlib.util

    name = "_megatron_lite_train_tokenizer"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_tokenizer.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def append_pieces(base_proto, domain_proto, max_new: int) -> tuple[list[str], int]:
    """Append the domain model's ordinary pieces missing from ``base_proto`` (in place).

    Returns:
        ``(added pieces, skipped count)``: skipped = ordinary domain pieces already in the base.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    have = {p.piece for p in base_proto.pieces}
    normal = [p for p in domain_proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    normal.sort(key=lambda p: -p.score)  # BPE: merge order; unigram: most probable first
    bpe = base_proto.trainer_spec.model_type == pb.TrainerSpec.BPE
    top = max((p.score for p in base_proto.pieces), default=0.0)
    added, skipped, new_pieces = [], 0, []
    for p in normal:
        if len(added) >= max_new:
            break
        if p.piece in have:
            skipped += 1
            continue
        new = base_proto.pieces.add()
        new.piece, new.type = p.piece, pb.ModelProto.SentencePiece.NORMAL
        new.score = p.score
        have.add(p.piece)
        added.append(p.piece)
        new_pieces.append(new)
    if bpe:  # domain merge order, all above the base (module docstring)
        for k, new in enumerate(new_pieces):
            new.score = top + float(len(new_pieces) - k)
    base_proto.trainer_spec.vocab_size = len(base_proto.pieces)
    return added, skipped


def tokens_per_char(model_path: str, texts: list[str]) -> float:
    """Tokens per character of ``texts`` under a SentencePiece model (our lossless wrapper)."""
    from megatron_lite.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(model_path)
    chars = sum(len(t) for t in texts)
    return sum(len(tok.encode(t)) for t in texts) / chars if chars else float("nan")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def extend(args: argparse.Namespace) -> dict:
    """Run the extension; returns the stats written to ``<output-prefix>.stats.json``.

    Raises:
        FileNotFoundError: base model or inputs missing.
        ValueError: bad sizes, an unsupported base model type, or an empty corpus.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    from megatron_lite.data.text_readers import expand_inputs

    if args.num_new_pieces < 1:
        raise ValueError(f"--num-new-pieces must be >= 1 (got {args.num_new_pieces})")
    if not os.path.isfile(args.base_model):
        raise FileNotFoundError(f"--base-model {args.base_model}: file not found")
    files = expand_inputs(args.input)
    base = pb.ModelProto()
    with open(args.base_model, "rb") as f:
        try:
            base.ParseFromString(f.read())
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"--base-model {args.base_model}: not a SentencePiece model ({e})")
    v_base = len(base.pieces)
    eval_docs = []
    for text in _docs(files, args.json_keys):
        eval_docs.append(text)
        if len(eval_docs) >= args.max_eval_docs:
            break
    if not eval_docs:
        raise ValueError(f"--input {' '.join(args.input)}: no text found")
    dvs = args.domain_vocab_size or 2 * args.num_new_pieces + 300
    domain = train_domain_model(base, files, args.json_keys, dvs, args)
    added, skipped = append_pieces(base, domain, args.num_new_pieces)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    vocab_lines = "".join(f"{p.piece}\t{p.score:g}\n" for p in base.pieces)
    _write_atomic(args.output_prefix + ".vocab", vocab_lines.encode("utf-8"))
    _write_atomic(args.output_prefix + ".model", base.SerializeToString())
    before = tokens_per_char(args.base_model, eval_docs)
    after = tokens_per_char(args.output_prefix + ".model", eval_docs)
    stats = {"base_model": args.base_model, "model": args.output_prefix + ".model",
             "base_vocab_size": v_base, "vocab_size": len(base.pieces),
             "added_pieces": len(added), "skipped_existing": skipped,
             "domain_vocab_size": len(domain.pieces), "eval_docs": len(eval_docs),
             "eval_chars": sum(len(t) for t in eval_docs),
             "tokens_per_char_before": before, "tokens_per_char_after": after,
             "first_added": added[:20]}
    _write_atomic(args.output_prefix + ".stats.json",
                  (json.dumps(stats, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return stats


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from megatron_lite.config.checks import check_output_path

    try:
        check_output_path("--output-prefix", args.output_prefix, "prefix")  # before the work
        s = extend(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"extend_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    print(f"vocab {s['base_vocab_size']} -> {s['vocab_size']} (+{s['added_pieces']} pieces, "
          f"{s['skipped_existing']} domain pieces already present); domain tokens per character "
          f"{s['tokens_per_char_before']:.4f} -> {s['tokens_per_char_after']:.4f} "
          f"({s['eval_docs']} docs, {s['eval_chars']} chars)")
    print(f"wrote {args.output_prefix}.model, .vocab, .stats.json")
    if s["added_pieces"] < args.num_new_pieces:
        print(f"extend_tokenizer.py: warning: only {s['added_pieces']} of --num-new-pieces "
              f"{args.num_new_pieces} were added: the domain tokenizer's other pieces are already "
              f"in the base; raise --domain-vocab-size (this run: {s['domain_vocab_size']})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
