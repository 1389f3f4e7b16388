"""tools/extend_tokenizer.py: appended pieces keep every old id, old ids decode identically, new
pieces shorten the domain text, pieces already present are skipped, the stats are exact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from tests.fixtures_data import AWKWARD_TEXTS, load_tool, make_tiny_corpus_and_tokenizer
from tests.test_cpt import DOMAIN_WORDS, make_domain_corpus


def _proto(path):
    m = pb.ModelProto()
    with open(path, "rb") as f:
        m.ParseFromString(f.read())
    return m


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ext_tok"))
    jsonl, base = make_tiny_corpus_and_tokenizer(os.path.join(root, "tok"))
    domain = os.path.join(root, "domain.jsonl")
    make_domain_corpus(domain)
    prefix = os.path.join(root, "ext")
    rc = load_tool("extend_tokenizer").main([
        "--base-model", base, "--input", domain, "--num-new-pieces", "40",
        "--output-prefix", prefix, "--num-threads", "1"])
    assert rc == 0
    with open(prefix + ".stats.json") as f:
        stats = json.load(f)
    return {"root": root, "base": base, "ext": prefix + ".model", "domain": domain,
            "tiny": jsonl, "stats": stats}


def test_old_pieces_unchanged_and_new_ones_appended(ext):
    base, new = _proto(ext["base"]), _proto(ext["ext"])
    v0 = len(base.pieces)
    assert v0 == 512 and len(new.pieces) == v0 + 40 == ext["stats"]["vocab_size"]
    for a, b in zip(base.pieces, new.pieces[:v0]):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    added = [p.piece for p in new.pieces[v0:]]
    assert len(set(added)) == 40 and not set(added) & {p.piece for p in base.pieces}
    assert all(p.type == pb.ModelProto.SentencePiece.NORMAL for p in new.pieces[v0:])
    # BPE: appended scores rank above every base score, in the domain merge order.
    assert [p.score for p in new.pieces[v0:]] == \
        [max(p.score for p in base.pieces) + 40.0 - k for k in range(40)]
    assert added[:20] == ext["stats"]["first_added"]
    # Same normaliser / trainer settings (lossless identity normalisation kept).
    assert new.normalizer_spec == base.normalizer_spec


def test_old_ids_decode_identically(ext):
    base = spm.SentencePieceProcessor(model_file=ext["base"])
    new = spm.SentencePieceProcessor(model_file=ext["ext"])
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(3, 512, size=int(rng.integers(1, 40))).tolist()
        assert new.decode(ids) == base.decode(ids)
    with open(ext["tiny"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:100]
    for t in texts + AWKWARD_TEXTS:
        ids = base.encode(t)
        assert new.decode(ids) == base.decode(ids) == t


def test_new_pieces_shorten_domain_text_and_stay_lossless(ext):
    from megatron_lite.data.tokenizer import SentencePieceTokenizer

    base, new = SentencePieceTokenizer(ext["base"]), SentencePieceTokenizer(ext["ext"])
    with open(ext["domain"], encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    n_base = sum(len(base.encode(d)) for d in docs)
    n_new = sum(len(new.encode(d)) for d in docs)
    chars = sum(len(d) for d in docs)
    assert n_new < n_base
    s = ext["stats"]
    assert s["eval_docs"] == len(docs) and s["eval_chars"] == chars
    assert s["tokens_per_char_before"] == n_base / chars
    assert s["tokens_per_char_after"] == n_new / chars
    for d in docs[:50] + AWKWARD_TEXTS:
        assert new.decode(new.encode(d)) == d
    # A whole domain word that became a piece is now one token with a new id.
    sp = spm.SentencePieceProcessor(model_file=ext["ext"])
    whole = [w for w in DOMAIN_WORDS if sp.piece_to_id(w) >= 512]
    assert whole, "expected at least one whole domain word among the new pieces"
    for w in whole:
        assert new.encode(w) == [sp.piece_to_id(w)]


def test_second_extension_skips_present_pieces(ext):
    prefix = os.path.join(ext["root"], "ext2")
    assert load_tool("extend_tokenizer").main([
        "--base-model", ext["ext"], "--input", ext["domain"], "--num-new-pieces", "10",
        "--output-prefix", prefix, "--num-threads", "1"]) == 0
    first, second = _proto(ext["ext"]), _proto(prefix + ".model")
    with open(prefix + ".stats.json") as f:
        stats = json.load(f)
    have = {p.piece for p in first.pieces}
    added = [p.piece for p in second.pieces[len(first.pieces):]]
    assert not set(added) & have and len(added) == stats["added_pieces"] <= 10
    # The 40 pieces added the first time are found again and skipped (plus the base's own).
    assert stats["skipped_existing"] >= 40 + ext["stats"]["skipped_existing"]


def test_bad_input_is_a_clear_error_and_writes_nothing(ext, tmp_path, capsys):
    tool = load_tool("extend_tokenizer")
    out = str(tmp_path / "x")
    assert tool.main(["--base-model", str(tmp_path / "missing.model"), "--input", ext["domain"],
                      "--num-new-pieces", "5", "--output-prefix", out]) == 2
    assert "missing.model: file not found" in capsys.readouterr().err
    assert tool.main(["--base-model", ext["base"], "--input", ext["domain"],
                      "--num-new-pieces", "0", "--output-prefix", out]) == 2
    assert "--num-new-pieces must be >= 1" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
