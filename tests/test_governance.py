"""Light data governance (issue 18 item 3): tools/dedup.py, tools/contamination.py and
tools/data_stats.py on constructed corpora whose duplicates, overlaps and statistics are known."""

import gzip
import json
import os
import random

import numpy as np
import pytest

from megatron_lite.data import governance as gov
from megatron_lite.data.corpus_stats import document_lengths, length_histogram, length_percentiles
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from tests.fixtures_data import load_tool, tiny_corpus_and_tokenizer  # noqa: F401

WORDS = [f"w{i}" for i in range(20000)]


def _doc(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write_jsonl(path, recs, opener=open):
    with opener(path, "wt") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


def _corpus(tmp_path):
    """Two shards: 40 unique documents of 300 random words, plus known duplicates:
    x0 = d0 with other case/punctuation/whitespace (exact), n1 = d1 with 2 of 300 words changed
    (Jaccard of 5-gram shingles ~0.97: near), f2 = d2's first 150 words (Jaccard ~0.5: not a
    duplicate at 0.8), and in the second shard x5 = d5 again byte for byte (exact, across shards)."""
    rng = random.Random(0)
    base = [_doc(rng, 300) for _ in range(40)]
    a = [{"id": f"d{i}", "text": t} for i, t in enumerate(base[:30])]
    a.append({"id": "x0", "text": "  " + base[0].upper().replace(" ", " ,  ") + "!"})
    w = base[1].split()
    w[50], w[200] = "changed", "words"
    a.append({"id": "n1", "text": " ".join(w)})
    a.append({"id": "f2", "text": " ".join(base[2].split()[:150])})
    b = [{"id": f"d{i}", "text": t} for i, t in enumerate(base[30:], start=30)] + [{"id": "x5", "text": base[5]}]
    _write_jsonl(tmp_path / "a.jsonl", a)
    _write_jsonl(tmp_path / "b.jsonl.gz", b, opener=gzip.open)
    return base


def test_normalisation_and_ngram_hashes():
    assert gov.normalize_text("Hello,  WORLD!\n\tCafé_x") == "hello world café x"
    assert gov.exact_key("A b. C") == gov.exact_key("a   B, c!")
    h = gov.ngram_hashes("a b c d", 2)
    assert h.shape == (3,) and h.dtype == np.uint64
    # the same n-gram anywhere has the same hash; a shorter text is one n-gram of all its words
    assert gov.ngram_hashes("x a b", 2)[1] == h[0]
    assert gov.ngram_hashes("a b", 13).shape == (1,)
    assert gov.ngram_hashes("!!!", 3).size == 0
    with pytest.raises(ValueError):
        gov.ngram_hashes("a", 0)
    assert gov.contamination_share(np.array([1, 2, 3, 4], np.uint64), {2, 4, 9}) == 0.5


def test_near_duplicate_index_threshold_bounds():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="threshold"):
            gov.NearDuplicateIndex(bad, 64)


def test_dedup_finds_exactly_the_planted_duplicates(tmp_path):
    _corpus(tmp_path)
    out = tmp_path / "out"
    rep = load_tool("dedup").main(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
                                   "--output-dir", str(out), "--id-key", "id", "--workers", "2"])
    c = rep["counts"]
    assert (c["documents"], c["kept"], c["exact_duplicates"], c["near_duplicates"]) == (44, 41, 2, 1)
    clusters = {cl["kept"]: sorted((d["id"], d["match"]) for d in cl["dropped"]) for cl in rep["clusters"]}
    assert clusters == {"d0": [("x0", "exact")], "d1": [("n1", "near")], "d5": [("x5", "exact")]}
    kept_a = [json.loads(ln)["id"] for ln in open(out / "a.jsonl")]
    kept_b = [json.loads(ln)["id"] for ln in gzip.open(out / "b.jsonl.gz", "rt")]
    assert kept_a == [f"d{i}" for i in range(30)] + ["f2"] and kept_b == [f"d{i}" for i in range(30, 40)]
    # kept JSONL records are the input lines byte for byte
    assert open(out / "a.jsonl", "rb").read().splitlines()[3] == open(tmp_path / "a.jsonl", "rb").read().splitlines()[3]
    # one worker gives the same result; exact-only finds only the exact ones
    rep1 = load_tool("dedup").main(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
                                    "--output-dir", str(tmp_path / "o1"), "--id-key", "id"])
    assert rep1["clusters"] == rep["clusters"]
    rep2 = load_tool("dedup").main(["--input", str(tmp_path / "a.jsonl"), "--output-dir", str(tmp_path / "o2"),
                                    "--exact-only"])
    assert rep2["counts"]["exact_duplicates"] == 1 and rep2["counts"]["near_duplicates"] == 0


def test_dedup_bad_threshold_is_one_line(tmp_path, capsys):
    from megatron_lite.eval.tool_cli import run_tool

    _corpus(tmp_path)
    rc = run_tool("dedup.py", load_tool("dedup").main,
                  ["--input", str(tmp_path / "a.jsonl"), "--output-dir", str(tmp_path / "o"), "--threshold", "1.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["dedup.py: error: --threshold 1.2: a Jaccard similarity threshold must be in (0, 1]"]
    assert not (tmp_path / "o").exists()
    before = (tmp_path / "a.jsonl").read_bytes()
    rc = run_tool("dedup.py", load_tool("dedup").main, ["--input", str(tmp_path / "a.jsonl"), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "would replace the input shard" in err[0]
    assert (tmp_path / "a.jsonl").read_bytes() == before
    rc = run_tool("contamination.py", load_tool("contamination").main,
                  ["--train", str(tmp_path / "a.jsonl"), "--eval", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "c")])
    assert rc == 2 and capsys.readouterr().err.startswith("contamination.py: error: --eval ")


def test_contamination_shares_ids_and_decontaminated_shards(tmp_path):
    base = _corpus(tmp_path)
    ev = [{"id": "e_full", "text": " ".join(base[7].split()[100:140])},            # 40 words inside d7
          {"id": "e_half", "text": " ".join(base[8].split()[:20] + _doc(random.Random(5), 20).split())},
          {"id": "e_clean", "text": _doc(random.Random(6), 40)}]
    _write_jsonl(tmp_path / "ev.jsonl", ev)
    out = tmp_path / "c"
    rep = load_tool("contamination").main(["--train", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
                                           "--eval", str(tmp_path / "ev.jsonl"), "--eval-id-key", "id",
                                           "--output-dir", str(out), "--decontaminate", "--workers", "2"])
    shares = {d["id"]: d["share"] for d in rep["eval_documents"]}
    # e_full: all 28 of its 13-grams are in d7; e_half: the 8 13-grams inside d8's first 20 words
    # of 28; e_clean: none (random words from another seed)
    assert shares == {"e_full": 1.0, "e_half": pytest.approx(8 / 28), "e_clean": 0.0}
    assert open(out / "contaminated_ids.txt").read().splitlines() == \
        [f"{tmp_path / 'ev.jsonl'}\te_full", f"{tmp_path / 'ev.jsonl'}\te_half"]
    assert rep["offending_train_documents"] == 2 and rep["train_documents"] == 44
    assert rep["offending"] == {str(tmp_path / "a.jsonl"): [8, 9]}  # d7 and d8: lines 8 and 9
    kept = [json.loads(ln)["id"] for ln in open(out / "train" / "a.jsonl")]
    assert "d7" not in kept and "d8" not in kept and len(kept) == 31
    # a threshold above e_half's share leaves only e_full contaminated
    rep2 = load_tool("contamination").main(["--train", str(tmp_path / "a.jsonl"), "--eval", str(tmp_path / "ev.jsonl"),
                                            "--eval-id-key", "id", "--output-dir", str(tmp_path / "c2"),
                                            "--threshold", "0.5"])
    assert [d["id"] for d in rep2["eval_documents"] if d["contaminated"]] == ["e_full"]


def test_corpus_statistics_exact(tmp_path):
    prefix = str(tmp_path / "c_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = [[5, 6, 7, 2], [5, 2], [9] * 99 + [2], [6, 6, 2]]
    for d in docs:
        b.add_document(np.array(d, np.uint16))
    b.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    lengths = document_lengths(ds)
    assert lengths.tolist() == [4, 2, 100, 3]
    assert length_percentiles(lengths) == {"p50": 3, "p90": 100, "p99": 100, "max": 100, "mean": 27.25}
    h = length_histogram(lengths, bins=4)
    assert sum(h["counts"]) == 4 and h["edges"][0] == 1 and h["edges"][-1] == 100
    rep = load_tool("data_stats").main(["--data-path", f"tiny={prefix}", "--output-dir", str(tmp_path / "s"),
                                        "--top-k", "3"])
    s = rep["tiny"]
    assert (s["documents"], s["tokens"], s["distinct_tokens"]) == (4, 109, 5)
    assert [(t["id"], t["count"]) for t in s["top_tokens"]] == [(9, 99), (2, 4), (6, 3)]
    assert os.path.getsize(tmp_path / "s" / "tiny_lengths.png") > 1000
    assert json.load(open(tmp_path / "s" / "data_stats.json"))["corpora"]["tiny"]["tokens"] == 109


def test_tokens_per_character_with_a_tokenizer(tmp_path, tiny_corpus_and_tokenizer):  # noqa: F811
    from megatron_lite.data.tokenizer import build_tokenizer

    _, model = tiny_corpus_and_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", model)
    texts = ["hello world, a tiny corpus", "def f(x):\n    return x * 2\n"]
    prefix = str(tmp_path / "t_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for t in texts:
        b.add_document(np.array(tok.encode(t) + [tok.eod], np.uint16))
    b.finalize(prefix + ".idx")
    rep = load_tool("data_stats").main(["--data-path", prefix, "--output-dir", str(tmp_path / "s"),
                                        "--tokenizer-model", model])
    tpc = rep["t_text_document"]["tokens_per_char"]
    n_tok = sum(len(tok.encode(t)) for t in texts)
    n_chr = sum(len(tok.decode(tok.encode(t))) for t in texts)
    assert (tpc["tokens"], tpc["characters"]) == (n_tok, n_chr)
    assert tpc["tokens_per_char"] == pytest.approx(n_tok / n_chr)
    assert "piece" in rep["t_text_document"]["top_tokens"][0]
