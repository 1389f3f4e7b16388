"""Awkward inputs (tests/data/, see its README.md) through tools/preprocess_data.py: each test
states the exact outcome — an error naming file:line, the documented skip counts, or the exact
token ids written (checked against the tokenizer applied to the expected texts)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_lite.data.indexed import IndexedDataset, dataset_exists
from megatron_lite.data.tokenizer import build_tokenizer
from tests.fixtures_data import load_tool, tiny_corpus_and_tokenizer  # noqa: F401

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SP = "SentencePieceTokenizer"


def _run(name, model, out, *extra):
    path = name if os.path.isabs(name) else os.path.join(DATA, name)
    return load_tool("preprocess_data").main(
        ["--input", path, "--tokenizer-type", SP, "--tokenizer-model", model, "--output-prefix",
         str(out), "--append-eod", "--no-progress", *extra])


def _docs(out) -> list[list[int]]:
    ds = IndexedDataset(f"{out}_text_document")
    return [ds[i].tolist() for i in range(len(ds))]


def _stats(out) -> dict:
    with open(f"{out}.stats.json") as f:
        return json.load(f)


def _expect(model, texts):
    tok = build_tokenizer(SP, model)
    return [tok.encode(t) + [tok.eod] for t in texts]


@pytest.mark.parametrize("name,line,reason,kept,bad", [
    ("invalid_json.jsonl", 2, "malformed JSON: Unterminated string starting at (column 10)",
     ["first document", "third"], 1),
    ("wrong_key.jsonl", 2, "missing key 'text' (see --json-keys)", ["has text"], 1),
    ("non_string_text.jsonl", 2, "key 'text' is int, expected a string", ["a string"], 3),
    ("invalid_utf8.jsonl", 2, "invalid UTF-8: 'utf-8' codec can't decode byte 0xff in position "
     "19: invalid start byte", ["valid line", "after"], 1),
    ("nulls.parquet", 2, "key 'text' is NoneType, expected a string", ["row one", "row three"], 2),
])
def test_bad_record_stops_naming_file_and_line_or_is_skipped_and_counted(
        tiny_corpus_and_tokenizer, tmp_path, capsys, name, line, reason, kept, bad):  # noqa: F811
    _, model = tiny_corpus_and_tokenizer
    assert _run(name, model, tmp_path / "stop") == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"preprocess_data.py: error: {os.path.join(DATA, name)}:{line}: {reason}"
                                "; pass --skip-bad-lines to skip and count such records"]
    assert not dataset_exists(str(tmp_path / "stop_text_document"))     # nothing half-written
    assert _run(name, model, tmp_path / "skip", "--skip-bad-lines") == 0
    assert _docs(tmp_path / "skip") == _expect(model, kept)
    s = _stats(tmp_path / "skip")
    assert (s["bad_lines"], s["skipped"], s["docs"], s["records"]) == (bad, bad, len(kept), len(kept))


@pytest.mark.parametrize("name,texts", [
    # Raw line/paragraph separators and NEL are content, never record separators.
    ("u2028.jsonl", ["before\u2028after", "para\u2029graph and next\u0085line"]),
    # CRLF record endings are accepted; an escaped CRLF inside the string stays in the text.
    ("crlf.jsonl", ["windows line one", "text with\r\ninside"]),
    ("bom.jsonl", ["starts after a BOM", "second"]),                    # BOM dropped
])
def test_separators_crlf_bom_give_exact_tokens(tiny_corpus_and_tokenizer, tmp_path, name,
                                              texts):  # noqa: F811
    _, model = tiny_corpus_and_tokenizer
    assert _run(name, model, tmp_path / "o") == 0
    docs = _docs(tmp_path / "o")
    assert docs == _expect(model, texts)
    tok = build_tokenizer(SP, model)
    assert [tok.decode(d[:-1]) for d in docs] == texts              # lossless round trip
    assert _stats(tmp_path / "o")["skipped"] == 0


def test_empty_documents_skipped_and_counted(tiny_corpus_and_tokenizer, tmp_path):  # noqa: F811
    _, model = tiny_corpus_and_tokenizer
    assert _run("empty_docs.jsonl", model, tmp_path / "o") == 0
    assert _docs(tmp_path / "o") == _expect(model, ["the only real document"])
    s = _stats(tmp_path / "o")
    # "" and whitespace-only text are records skipped as empty; blank lines are not records.
    assert (s["records"], s["empty"], s["bad_lines"], s["docs"]) == (3, 2, 0, 1)


def test_enormous_document(tiny_corpus_and_tokenizer, tmp_path):  # noqa: F811
    """One 2 MB document on a single JSONL line (generated, not committed) next to a small one:
    written whole, as one document, token for token."""
    _, model = tiny_corpus_and_tokenizer
    rng = np.random.default_rng(0)
    words = ["data", "model", "token", "the", "of", "日本", "😀", "\n", "    ", "x" * 40]
    big = " ".join(words[i] for i in rng.integers(0, len(words), 400_000))
    assert len(big.encode("utf-8")) > 2_000_000
    path = tmp_path / "enormous.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": big},
                                                                 ensure_ascii=False) + "\n")
    assert _run(str(path), model, tmp_path / "o", "--workers", "2") == 0
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    tok = build_tokenizer(SP, model)
    assert len(ds) == 2 and ds[0].tolist() == tok.encode("small") + [tok.eod]
    assert tok.decode(ds[1][:-1].tolist()) == big and int(ds[1][-1]) == tok.eod
    s = _stats(tmp_path / "o")
    assert s["length_tokens"]["max"] == len(ds[1]) and s["docs"] == 2
