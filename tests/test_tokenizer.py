"""Tokenizer training (tools/train_tokenizer.py) and the tokenizer wrappers (megatron_lite.data.tokenizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_lite.data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer,
                                          build_tokenizer)
from tests.fixtures_data import (AWKWARD_TEXTS, ROOT, TINY_VOCAB_SIZE, load_tool,
                                 make_tiny_corpus_and_tokenizer)
from tests.fixtures_data import tiny_corpus_and_tokenizer  # noqa: F401  (pytest fixture)

train_tokenizer = load_tool("train_tokenizer")


def _docs(jsonl):
    with open(jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _train(tmp_path, corpus, *extra, name="m", vocab=400):
    prefix = str(tmp_path / name)
    rc = train_tokenizer.main(["--input", corpus, "--model-prefix", prefix, "--vocab-size",
                               str(vocab), "--num-threads", "1", "--held-out-fraction", "0"]
                              + list(extra))
    assert rc == 0
    return prefix


# ---------------------------------------------------------------- SentencePiece wrapper

def test_special_ids_and_vocab(tiny_corpus_and_tokenizer):
    _, model = tiny_corpus_and_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == TINY_VOCAB_SIZE
    assert (tok.unk, tok.bos, tok.eos, tok.eod, tok.pad) == (0, 1, 2, 2, None)
    assert tok.id_to_piece(2) == "</s>" and tok.id_to_piece(1) == "<s>"


@pytest.mark.parametrize("text", AWKWARD_TEXTS + ["", " ", "\n", "\t\t", "x" * 3000,
                                                  "never seen: ☃ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x01"])
def test_roundtrip_awkward_texts(tiny_corpus_and_tokenizer, text):
    _, model = tiny_corpus_and_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", model)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk not in ids  # byte fallback, never <unk>
    assert tok.tokenize(text) == ids and tok.detokenize(ids) == text


def test_roundtrip_whole_corpus_and_batch(tiny_corpus_and_tokenizer):
    jsonl, model = tiny_corpus_and_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", model)
    docs = _docs(jsonl)
    batch = tok.tokenize_batch(docs)
    assert batch == [tok.encode(d) for d in docs]
    assert [tok.decode(ids) for ids in batch] == docs


def test_special_token_text_is_plain_text(tiny_corpus_and_tokenizer):
    _, model = tiny_corpus_and_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", model)
    for text in ["</s>", "<s>", "<unk>", "a</s>b", "text </s> <s> more"]:
        ids = tok.encode(text)
        assert not {tok.bos, tok.eos, tok.unk} & set(ids), text
        assert tok.decode(ids) == text
    # "</s>" is at least as many ids as its 4 characters' pieces allow, never the single eos id.
    assert len(tok.encode("</s>")) >= 2


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer'"):
        build_tokenizer("GPT2BPETokenizer", "x")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(junk))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))


# ---------------------------------------------------------------- HuggingFace wrapper

def _hf_bytelevel(tmp_path, docs, config=None):
    """Train a byte-level BPE tokenizer.json (lossless) with ``tokenizers`` itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(docs, trainer)
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    t.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_hf_tokenizer_roundtrip_and_special_ids(tiny_corpus_and_tokenizer, tmp_path):
    jsonl, _ = tiny_corpus_and_tokenizer
    docs = _docs(jsonl)
    d = _hf_bytelevel(tmp_path, docs)
    tok = build_tokenizer("HuggingFaceTokenizer", str(d / "tokenizer.json"))
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.unk, tok.bos, tok.eos, tok.eod, tok.pad) == (0, 1, 2, 2, 3)
    assert tok.vocab_size == 400
    for text in AWKWARD_TEXTS + docs[:50]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not {0, 1, 2, 3} & set(ids), text  # "</s>" etc. in the text stay plain text
    assert tok.tokenize_batch(AWKWARD_TEXTS) == [tok.encode(t) for t in AWKWARD_TEXTS]
    # Directory form loads the same file.
    assert build_tokenizer("HuggingFaceTokenizer", str(d)).encode("hello") == tok.encode("hello")


def test_hf_tokenizer_matches_transformers(tiny_corpus_and_tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    jsonl, _ = tiny_corpus_and_tokenizer
    docs = _docs(jsonl)
    d = _hf_bytelevel(tmp_path, docs)
    ours = build_tokenizer("HuggingFaceTokenizer", str(d))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    plain = [t for t in docs[:60] if "<" not in t]
    assert len(plain) >= 50
    for text in plain:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    # Where they differ on purpose: transformers matches "</s>" written in the text as eos.
    assert 2 in ref.encode("a </s> b", add_special_tokens=False)
    assert 2 not in ours.encode("a </s> b")


def test_hf_special_ids_from_tokenizer_config(tiny_corpus_and_tokenizer, tmp_path):
    jsonl, _ = tiny_corpus_and_tokenizer
    # The config names <s>/<pad> the other way round; the config wins over the name heuristics.
    d = _hf_bytelevel(tmp_path, _docs(jsonl),
                      config={"bos_token": {"content": "<pad>"}, "eos_token": "<s>"})
    tok = build_tokenizer("HuggingFaceTokenizer", str(d))
    assert (tok.bos, tok.eos, tok.eod, tok.pad) == (3, 1, 1, 3)


# ---------------------------------------------------------------- train_tokenizer.py

def test_train_stats_exact(tiny_corpus_and_tokenizer):
    jsonl, model = tiny_corpus_and_tokenizer
    stats_path = model[:-len(".model")] + ".stats.json"
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    docs = _docs(jsonl)
    # --held-out-fraction 0.1 -> every 10th document (index 9, 19, ...) is held out.
    held = [d for i, d in enumerate(docs) if i % 10 == 9]
    tok = build_tokenizer("SentencePieceTokenizer", model)
    tokens = sum(len(tok.encode(d)) for d in held)
    chars = sum(len(d) for d in held)
    assert stats["vocab_size"] == TINY_VOCAB_SIZE
    assert stats["records"] == len(docs)
    assert stats["held_out"]["docs"] == len(held) == 31
    assert stats["held_out"]["chars"] == chars
    assert stats["held_out"]["tokens"] == tokens
    assert stats["held_out"]["tokens_per_char"] == pytest.approx(tokens / chars, rel=1e-12)
    assert stats["held_out"]["roundtrip_lossless_fraction"] == 1.0
    assert stats["training_seconds"] >= 0
    assert stats["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": None}


def test_training_sentences_cuts_at_newlines():
    cut = list(train_tokenizer.training_sentences("ab\ncd\n\nef", max_bytes=6))
    assert cut == ["ab\ncd\n", "\nef"]
    assert "".join(cut) == "ab\ncd\n\nef"
    long = list(train_tokenizer.training_sentences("é" * 10, max_bytes=8))  # 2 chars per cut
    assert long == ["éé"] * 5
    # U+2028 is content, not a line break.
    assert list(train_tokenizer.training_sentences("a\u2028b", max_bytes=100)) == ["a\u2028b"]


def test_flags_change_the_model(tiny_corpus_and_tokenizer, tmp_path):
    jsonl, _ = tiny_corpus_and_tokenizer
    base = SentencePieceTokenizer(_train(tmp_path, jsonl, name="base") + ".model")
    # --no-byte-fallback: an unseen character becomes <unk> and the round trip is lossy.
    nobf = SentencePieceTokenizer(_train(tmp_path, jsonl, "--no-byte-fallback", name="nobf",
                                         vocab=200) + ".model")
    assert 0 in nobf.encode("snowman ☃") and nobf.decode(nobf.encode("☃")) != "☃"
    assert 0 not in base.encode("snowman ☃")
    # --split-digits (default): no learned piece holds two digits; off: some do.
    def digit_pieces(tok):
        return [tok.id_to_piece(i) for i in range(tok.vocab_size)
                if not tok.id_to_piece(i).startswith("<0x")  # byte pieces like <0x0A>
                and sum(c.isdigit() for c in tok.id_to_piece(i)) >= 2]
    digits = tmp_path / "digits.jsonl"
    digits.write_text("".join(json.dumps({"text": f"year 2024 and 1999 and {i % 7}{i % 3}"}) + "\n"
                              for i in range(200)) + open(jsonl, encoding="utf-8").read(),
                      encoding="utf-8")
    split = SentencePieceTokenizer(_train(tmp_path, str(digits), name="split") + ".model")
    nosplit = SentencePieceTokenizer(_train(tmp_path, str(digits), "--no-split-digits",
                                            name="nosplit") + ".model")
    assert digit_pieces(base) == [] and digit_pieces(split) == []
    assert "2024" in digit_pieces(nosplit) or "▁2024" in digit_pieces(nosplit)
    # --user-defined-symbols are one id each, matched in text.
    uds = SentencePieceTokenizer(_train(tmp_path, jsonl, "--user-defined-symbols", "<|im_start|>",
                                        "<|im_end|>", name="uds") + ".model")
    ids = uds.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == uds._sp.piece_to_id("<|im_start|>") and ids[-1] == uds._sp.piece_to_id(
        "<|im_end|>")
    assert uds.decode(ids) == "<|im_start|>hi<|im_end|>"
    # --model-type unigram trains a lossless unigram model.
    uni = SentencePieceTokenizer(_train(tmp_path, jsonl, "--model-type", "unigram",
                                        name="uni") + ".model")
    assert all(uni.decode(uni.encode(t)) == t for t in AWKWARD_TEXTS)
    # BPE scores are minus the merge rank (integers); unigram scores are log-probabilities.
    assert all(float(base._sp.get_score(i)).is_integer() for i in range(300, 400))
    assert not all(float(uni._sp.get_score(i)).is_integer() for i in range(300, 400))


def test_flags_are_passed_to_sentencepiece(tiny_corpus_and_tokenizer, tmp_path, monkeypatch):
    import sentencepiece as spm

    jsonl, _ = tiny_corpus_and_tokenizer
    seen = {}
    real = spm.SentencePieceTrainer.train

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", spy)
    _train(tmp_path, jsonl, "--input-sentence-size", "123", "--num-threads", "1",
           "--character-coverage", "0.99", "--max-sentence-length", "999")
    assert seen["input_sentence_size"] == 123 and seen["num_threads"] == 1
    assert seen["character_coverage"] == 0.99 and seen["max_sentence_length"] == 999
    assert seen["normalization_rule_name"] == "identity"
    assert seen["remove_extra_whitespaces"] is False
    assert seen["allow_whitespace_only_pieces"] is True
    assert seen["byte_fallback"] is True and seen["split_digits"] is True


def test_held_out_cap_and_bad_lines(tiny_corpus_and_tokenizer, tmp_path):
    jsonl, _ = tiny_corpus_and_tokenizer
    bad = tmp_path / "bad.jsonl"
    with open(jsonl, encoding="utf-8") as f:
        lines = f.readlines()
    bad.write_text(lines[0] + "{broken\n" + "".join(lines[1:]) + "[1, 2]\n", encoding="utf-8")
    prefix = str(tmp_path / "cap")
    assert train_tokenizer.main(["--input", str(bad), "--model-prefix", prefix, "--vocab-size",
                                 "400", "--num-threads", "1", "--held-out-fraction", "0.5",
                                 "--held-out-max-docs", "7"]) == 2
    assert not os.path.exists(prefix + ".model")
    assert train_tokenizer.main(["--input", str(bad), "--model-prefix", prefix, "--vocab-size",
                                 "400", "--num-threads", "1", "--held-out-fraction", "0.5",
                                 "--held-out-max-docs", "7", "--skip-bad-lines"]) == 0
    with open(prefix + ".stats.json", encoding="utf-8") as f:
        stats = json.load(f)
    assert stats["bad_lines"] == 2 and stats["records"] == len(lines)
    assert stats["held_out"]["docs"] == 7


def test_failed_training_writes_nothing(tiny_corpus_and_tokenizer, tmp_path, capsys):
    jsonl, _ = tiny_corpus_and_tokenizer
    prefix = str(tmp_path / "huge")
    rc = train_tokenizer.main(["--input", jsonl, "--model-prefix", prefix, "--vocab-size",
                               "100000", "--num-threads", "1"])
    assert rc == 2
    assert "--vocab-size" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert train_tokenizer.main(["--input", jsonl, "--model-prefix", prefix, "--vocab-size",
                                 "200"]) == 2  # too small for 256 byte pieces
    assert train_tokenizer.main(["--input", str(tmp_path / "nothing*.jsonl"), "--model-prefix",
                                 prefix]) == 2


def test_help_mentions_every_flag(capsys):
    # In-process (a subprocess pays the package's torch import); this is the text --help prints.
    with pytest.raises(SystemExit) as e:
        train_tokenizer.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--input", "--json-keys", "--model-prefix", "--vocab-size", "--model-type",
                 "--character-coverage", "--byte-fallback", "--no-byte-fallback",
                 "--split-digits", "--no-split-digits", "--user-defined-symbols",
                 "--input-sentence-size", "--num-threads", "--max-sentence-length",
                 "--held-out-fraction", "--held-out-max-docs", "--skip-bad-lines"]:
        assert flag in out, flag
    parser = train_tokenizer.build_parser()
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in out and (action.help or opt in ("-h", "--help")), opt


def test_fixture_is_reusable(tmp_path):
    jsonl, model = make_tiny_corpus_and_tokenizer(tmp_path / "again")
    assert os.path.isfile(jsonl) and os.path.isfile(model)
    assert SentencePieceTokenizer(model).vocab_size == TINY_VOCAB_SIZE


def test_rerun_writes_the_same_bytes(tiny_corpus_and_tokenizer, tmp_path):
    """Issue 15 #13: two processes (other pids, other clocks) training on the same input with the
    same flags write byte-identical files, also when SentencePiece samples the sentences."""
    jsonl, _ = tiny_corpus_and_tokenizer
    prefix = tmp_path / "tok" / "spm"
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"),
                            "--input", jsonl, "--model-prefix", str(prefix), "--vocab-size", "400",
                            "--num-threads", "2", "--input-sentence-size", "101"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        runs.append({ext: (tmp_path / "tok" / f"spm{ext}").read_bytes()
                     for ext in (".model", ".vocab")})
    with open(f"{prefix}.stats.json") as f:
        assert json.load(f)["training_sentences"] > 101  # so SentencePiece sampled
    assert runs[0] == runs[1]
    assert str(prefix).encode() in runs[0][".model"] and b".tmp-" not in runs[0][".model"]
