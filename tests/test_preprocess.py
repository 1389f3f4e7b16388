"""Input readers (megatron_lite.data.text_readers) and tools/preprocess_data.py."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_lite.data.indexed import IndexedDataset, dataset_exists
from megatron_lite.data.text_readers import (BadRecordError, expand_inputs, iter_raw_records,
                                             iter_texts)
from megatron_lite.data.tokenizer import build_tokenizer
from tests.fixtures_data import AWKWARD_TEXTS, ROOT, load_tool
from tests.fixtures_data import tiny_corpus_and_tokenizer  # noqa: F401  (pytest fixture)

preprocess_data = load_tool("preprocess_data")
SP = "SentencePieceTokenizer"


def _write_jsonl(path, texts, key="text", ending="\n"):
    with open(path, "w", encoding="utf-8", newline="") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + ending)
    return str(path)


def _run(inp, model, prefix, *extra, tokenizer_type=SP):
    inputs = inp if isinstance(inp, list) else [inp]
    argv = ["--input", *inputs, "--tokenizer-type", tokenizer_type, "--tokenizer-model", model,
            "--output-prefix", str(prefix), "--no-progress", *extra]
    return preprocess_data.main(argv)


def _read(prefix, key="text"):
    ds = IndexedDataset(f"{prefix}_{key}_document")
    return [ds[i].tolist() for i in range(len(ds))]


def _stats(prefix):
    with open(f"{prefix}.stats.json", encoding="utf-8") as f:
        return json.load(f)


def _wordlevel(tmp_path):
    """A hand-checkable HF tokenizer: one id per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "d": 6, "e": 7, "f": 8,
             "g": 9}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path / "wordlevel.json"
    t.save(str(path))
    return str(path)


# ---------------------------------------------------------------- readers

def test_jsonl_split_on_newline_only_bom_crlf(tmp_path):
    texts = ["a\u2028b", "c\u2029d\u0085e", "tab\there", "crlf inside\r\nstring"]
    path = tmp_path / "x.jsonl"
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts)
    assert "\u2028" in body  # written raw, not as an escape
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8") + b"\n  \n")
    counters = {}
    assert list(iter_texts([str(path)], counters=counters)) == [{"text": t} for t in texts]
    assert counters == {"records": 4, "bad_lines": 0}


def test_every_format_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = AWKWARD_TEXTS
    plain = _write_jsonl(tmp_path / "a.jsonl", texts)
    raw = open(plain, "rb").read()
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "a.json").write_bytes(raw)
    pq.write_table(pa.table({"text": texts, "other": list(range(len(texts)))}),
                   tmp_path / "a.parquet", row_group_size=4)
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.json", "a.parquet"):
        got = [d["text"] for d in iter_texts([str(tmp_path / name)])]
        assert got == texts, name
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts):
        (txt_dir / f"{i:02d}.txt").write_bytes((b"\xef\xbb\xbf" if i == 0 else b"")
                                               + t.encode("utf-8"))
    files = expand_inputs([str(txt_dir / "*.txt")])
    assert [d["text"] for d in iter_texts(files)] == texts  # CRLF kept, BOM dropped


def test_reader_errors_name_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["ok"])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": "unterminated}\n[1]\n{"title": "x"}\n{"text": 5}\n')
    with pytest.raises(BadRecordError) as e:
        list(iter_texts([path]))
    assert e.value.line == 2 and f"{path}:2: malformed JSON: Unterminated string" in str(e.value)
    counters = {}
    assert list(iter_texts([path], skip_bad_lines=True, counters=counters)) == [{"text": "ok"}]
    assert counters == {"records": 1, "bad_lines": 4}
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(BadRecordError, match=r"latin1.jsonl:1: invalid UTF-8"):
        list(iter_texts([str(tmp_path / "latin1.jsonl")]))
    with pytest.raises(ValueError, match="unsupported input file type"):
        expand_inputs([str(tmp_path / "x.csv")]) if (tmp_path / "x.csv").write_text("a") else None
    with pytest.raises(FileNotFoundError, match="matched nothing"):
        expand_inputs([str(tmp_path / "nope*.jsonl")])


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\].*--json-keys"):
        list(iter_raw_records(str(tmp_path / "p.parquet")))


# ---------------------------------------------------------------- preprocess_data.py

def test_roundtrip_and_eod(tiny_corpus_and_tokenizer, tmp_path):
    _, model = tiny_corpus_and_tokenizer
    texts = AWKWARD_TEXTS + ["x\u2028y"]
    inp = _write_jsonl(tmp_path / "in.jsonl", texts, ending="\r\n")
    assert _run(inp, model, tmp_path / "out", "--append-eod") == 0
    tok = build_tokenizer(SP, model)
    docs = _read(tmp_path / "out")
    assert len(docs) == len(texts)
    for text, ids in zip(texts, docs):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert ids[:-1] == tok.encode(text) and tok.decode(ids[:-1]) == text
    assert IndexedDataset(str(tmp_path / "out_text_document")).dtype == np.uint16
    # Without --append-eod the documents are the bare encodings.
    assert _run(inp, model, tmp_path / "noeod") == 0
    assert _read(tmp_path / "noeod") == [tok.encode(t) for t in texts]


def test_all_formats_give_identical_output(tiny_corpus_and_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    jsonl, model = tiny_corpus_and_tokenizer
    raw = open(jsonl, "rb").read()
    texts = [json.loads(line)["text"] for line in raw.decode("utf-8").split("\n") if line]
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet", row_group_size=50)
    assert _run(jsonl, model, tmp_path / "ref", "--append-eod") == 0
    ref = open(tmp_path / "ref_text_document.bin", "rb").read()
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        assert _run(str(tmp_path / name), model, tmp_path / name, "--append-eod") == 0
        assert open(tmp_path / f"{name}_text_document.bin", "rb").read() == ref, name


def test_workers_output_byte_identical(tiny_corpus_and_tokenizer, tmp_path):
    jsonl, model = tiny_corpus_and_tokenizer
    lines = open(jsonl, encoding="utf-8").read().split("\n")
    lines.insert(57, "{not json")
    lines.insert(150, json.dumps({"text": "   \n\t "}))
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text("\n".join(lines), encoding="utf-8")
    outs = {}
    for w in (1, 2):
        assert _run(str(noisy), model, tmp_path / f"w{w}", "--append-eod", "--workers", str(w),
                    "--chunk-size", "7", "--skip-bad-lines") == 0
        outs[w] = [open(tmp_path / f"w{w}_text_document.{ext}", "rb").read()
                   for ext in ("bin", "idx")]
        s = _stats(tmp_path / f"w{w}")
        assert (s["docs"], s["bad_lines"], s["empty"], s["workers"]) == (311, 1, 1, w)
    assert outs[1] == outs[2]


def test_stats_exact_for_hand_made_corpus(tmp_path):
    model = _wordlevel(tmp_path)
    lines = ['{"text": "a b c"}', '{"text": "a"}', '{"text": "   "}', "not json",
             '{"text": "a b c d e f g"}', '{"text": ""}', '{"text": "b  b"}', ""]
    inp = tmp_path / "hand.jsonl"
    inp.write_text("\n".join(lines), encoding="utf-8")
    for workers in ("2", "1"):
        assert _run(str(inp), model, tmp_path / "hand", "--append-eod", "--skip-bad-lines",
                    "--workers", workers, "--chunk-size", "2",
                    tokenizer_type="HuggingFaceTokenizer") == 0
        assert _read(tmp_path / "hand") == [[3, 4, 5, 2], [3, 2], [3, 4, 5, 6, 7, 8, 9, 2],
                                            [4, 4, 2]]
    s = _stats(tmp_path / "hand")
    # Records: every non-blank line that parsed (6); bytes: those 7 lines + their "\n" (the
    # last line has none), bad line included.
    nbytes = sum(len(line.encode()) + 1 for line in lines[:-1])
    assert (s["records"], s["docs"], s["tokens"]) == (6, 4, 17)
    assert (s["skipped"], s["bad_lines"], s["empty"]) == (3, 1, 2)
    assert s["bytes"] == nbytes
    assert s["text_bytes"] == len("a b c") + len("a") + len("a b c d e f g") + len("b  b")
    # Lengths [4, 2, 8, 3] -> sorted [2, 3, 4, 8]; nearest rank: p50 = 2nd, p90 = p99 = 4th.
    assert s["length_tokens"] == {"p50": 3, "p90": 8, "p99": 8, "max": 8, "mean": 4.25}
    assert s["per_key"]["text"]["docs"] == 4 and s["append_eod"] is True
    assert s["seconds"] > 0 and s["tokenizer"]["eod"] == 2 and s["dtype"] == "uint16"


def test_bad_line_stops_with_file_and_line(tiny_corpus_and_tokenizer, tmp_path, capsys):
    _, model = tiny_corpus_and_tokenizer
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": nope}\n', encoding="utf-8")
    for w in ("1", "2"):
        assert _run(str(inp), model, tmp_path / "bad", "--workers", w) == 2
        err = capsys.readouterr().err
        assert f"{inp}:3: malformed JSON: Expecting value (column 10)" in err
        assert "--skip-bad-lines" in err
        assert os.listdir(tmp_path) == ["bad.jsonl"]  # no outputs, no temporaries


def test_early_bad_line_with_many_chunks_in_flight(tiny_corpus_and_tokenizer, tmp_path, capsys):
    """The pool's feeder is blocked on the in-flight bound when the bad line surfaces; the run
    must still stop (not hang in Pool.terminate) and clean up."""
    import threading

    jsonl, model = tiny_corpus_and_tokenizer
    lines = open(jsonl, encoding="utf-8").read().split("\n")
    lines.insert(1, "{oops")
    inp = tmp_path / "early.jsonl"
    inp.write_text("\n".join(lines), encoding="utf-8")
    rc = []
    t = threading.Thread(target=lambda: rc.append(
        _run(str(inp), model, tmp_path / "early", "--workers", "2", "--chunk-size", "1")),
        daemon=True)
    t.start()
    t.join(timeout=120)
    assert rc == [2], "preprocess_data did not stop after the bad line"
    assert f"{inp}:2: malformed JSON" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["early.jsonl"]


def test_multiple_keys_and_inputs(tiny_corpus_and_tokenizer, tmp_path):
    _, model = tiny_corpus_and_tokenizer
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"text": "one", "title": "T1"}) + "\n"
                 + json.dumps({"text": "two", "title": " "}) + "\n", encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"text": "three", "title": "T3"}) + "\n", encoding="utf-8")
    assert _run([str(b), str(a)], model, tmp_path / "mk", "--json-keys", "text", "title") == 0
    tok = build_tokenizer(SP, model)
    assert _read(tmp_path / "mk", "text") == [tok.encode(t) for t in ("three", "one", "two")]
    assert _read(tmp_path / "mk", "title") == [tok.encode(t) for t in ("T3", "T1")]
    s = _stats(tmp_path / "mk")
    assert s["per_key"]["title"]["empty"] == 1 and s["per_key"]["text"]["empty"] == 0
    assert s["docs"] == 5 and s["empty"] == 1 and s["records"] == 3


def test_interrupted_run_leaves_no_pair(tiny_corpus_and_tokenizer, tmp_path, monkeypatch):
    from megatron_lite.data import indexed

    jsonl, model = tiny_corpus_and_tokenizer
    assert _run(jsonl, model, tmp_path / "old") == 0
    before = sorted(os.listdir(tmp_path))
    old_bin = open(tmp_path / "old_text_document.bin", "rb").read()
    real = indexed.IndexedDatasetBuilder.add_document
    calls = []

    def interrupt(self, tokens, lengths=None):
        calls.append(1)
        if len(calls) == 100:
            raise KeyboardInterrupt
        return real(self, tokens, lengths)

    monkeypatch.setattr(indexed.IndexedDatasetBuilder, "add_document", interrupt)
    for prefix in ("old", "new"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            _run(jsonl, model, tmp_path / prefix)
    # The new prefix never appeared, the old pair is the previous run's, no temporaries remain.
    assert sorted(os.listdir(tmp_path)) == before
    assert open(tmp_path / "old_text_document.bin", "rb").read() == old_bin
    assert not dataset_exists(str(tmp_path / "new_text_document"))


def test_killed_process_leaves_no_pair(tiny_corpus_and_tokenizer, tmp_path):
    """SIGKILL and Ctrl-C while the input is still arriving (a named pipe feeds it)."""
    jsonl, model = tiny_corpus_and_tokenizer
    lines = open(jsonl, "rb").read()
    for sig in (signal.SIGINT, signal.SIGKILL):
        fifo = tmp_path / f"pipe{int(sig)}.jsonl"
        os.mkfifo(fifo)
        prefix = tmp_path / f"k{int(sig)}"
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                                 "--input", str(fifo), "--tokenizer-type", SP,
                                 "--tokenizer-model", model, "--output-prefix", str(prefix),
                                 "--chunk-size", "1", "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with open(fifo, "wb") as w:  # blocks until the tool opens the pipe
            w.write(lines)
            w.flush()
            # Wait until the tool has created its temporary token file, then stop it mid-input.
            tmp_bin = None
            for _ in range(600):
                tmp_bin = [f for f in os.listdir(tmp_path) if f.startswith(prefix.name)]
                if tmp_bin:
                    break
                time.sleep(0.05)
            assert tmp_bin, "preprocess_data.py never started writing"
            proc.send_signal(sig)
            proc.wait(timeout=60)
        assert proc.returncode != 0
        assert not dataset_exists(f"{prefix}_text_document")
        leftovers = [f for f in os.listdir(tmp_path) if f.startswith(prefix.name)]
        if sig == signal.SIGINT:  # cleaned up
            assert leftovers == []
        else:  # only a temporary name survives a SIGKILL, never the output name
            assert all(".tmp-" in f for f in leftovers), leftovers


def test_kill_between_bin_and_idx_publish(tiny_corpus_and_tokenizer, tmp_path, monkeypatch):
    """Interrupted after the new .bin was renamed into place but before the .idx: the old .idx was
    removed first, so no pair is readable (never an old index over new tokens); a rerun succeeds."""
    from megatron_lite.data import indexed

    jsonl, model = tiny_corpus_and_tokenizer
    assert _run(jsonl, model, tmp_path / "p") == 0
    good = [x.tolist() for x in IndexedDataset(str(tmp_path / "p_text_document"))]
    real = os.replace

    def stop_before_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(indexed.os, "replace", stop_before_idx)
    with pytest.raises(KeyboardInterrupt):
        _run(jsonl, model, tmp_path / "p", "--append-eod")       # different tokens than before
    monkeypatch.setattr(indexed.os, "replace", real)
    assert os.path.exists(tmp_path / "p_text_document.bin")
    with pytest.raises(FileNotFoundError, match="p_text_document.idx does not exist"):
        IndexedDataset(str(tmp_path / "p_text_document"))
    assert _run(jsonl, model, tmp_path / "p") == 0
    assert [x.tolist() for x in IndexedDataset(str(tmp_path / "p_text_document"))] == good


def test_append_eod_needs_an_eod_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.save(str(tmp_path / "t.json"))
    inp = _write_jsonl(tmp_path / "i.jsonl", ["a"])
    assert _run(inp, str(tmp_path / "t.json"), tmp_path / "o", "--append-eod",
                tokenizer_type="HuggingFaceTokenizer") == 2
    assert _run(inp, str(tmp_path / "t.json"), tmp_path / "o",
                tokenizer_type="HuggingFaceTokenizer") == 0
    assert _read(tmp_path / "o") == [[1]]


def test_help_mentions_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        preprocess_data.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--input", "--json-keys", "--tokenizer-type", "--tokenizer-model",
                 "--output-prefix", "--workers", "--append-eod", "--skip-bad-lines",
                 "--chunk-size", "--no-progress", "SentencePieceTokenizer",
                 "HuggingFaceTokenizer"]:
        assert flag in out, flag
    for action in preprocess_data.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in out and action.help, opt


def test_output_feeds_the_gpt_dataset(tiny_corpus_and_tokenizer, tmp_path):
    """End to end: the packed samples are windows of the EOD-joined token stream of the corpus."""
    from megatron_lite.data.gpt_dataset import GPTDataset

    jsonl, model = tiny_corpus_and_tokenizer
    assert _run(jsonl, model, tmp_path / "e2e", "--append-eod") == 0
    tok = build_tokenizer(SP, model)
    stream = [i for line in open(jsonl, encoding="utf-8")
              for i in tok.encode(json.loads(line)["text"]) + [tok.eod]]
    L = 32
    ds = GPTDataset(str(tmp_path / "e2e_text_document"), (0, 311), L, num_samples=10,
                    eod_id=tok.eod, shuffle=False, cache_dir=str(tmp_path / "cache"))
    assert ds.tokens_per_epoch == len(stream)
    for i in (0, 1, 57, (len(stream) - 1) // L - 1):
        s = ds[i]
        assert s["tokens"].tolist() == stream[i * L:(i + 1) * L]
        assert s["labels"].tolist() == stream[i * L + 1:(i + 1) * L + 1]


# ---- what a new user meets (issue 15 #5, #12) -------------------------------------------------

def _run_cli(tmp_path, inp, model, prefix, *extra):
    """The tool as a user runs it (progress bar on, stderr not a terminal)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                        "--input", str(inp), "--json-keys", "text",
                        "--tokenizer-type", SP, "--tokenizer-model", model,
                        "--output-prefix", str(prefix), *extra],
                       capture_output=True, text=True, cwd=tmp_path)
    return r


def test_error_is_one_line_after_a_closed_bar_and_leaves_no_folder(tiny_corpus_and_tokenizer,
                                                                   tmp_path):
    _, model = tiny_corpus_and_tokenizer
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"text": "fine"}\n{"text": nope}\n', encoding="utf-8")
    for w in ("1", "2"):
        r = _run_cli(tmp_path, inp, model, tmp_path / "new" / "deeper" / "web", "--workers", w)
        assert r.returncode == 2
        lines = r.stderr.split("\n")
        err = [ln for ln in lines if "error" in ln]
        # the bar's last state ends with a newline before the error; no bar is drawn after it
        assert err == [f"preprocess_data.py: error: {inp}:2: malformed JSON: Expecting value "
                       f"(column 10); pass --skip-bad-lines to skip and count such records"]
        assert err[0] in lines and lines[-2:] == [err[0], ""], r.stderr
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no new/, no new/deeper/


def test_skip_bad_lines_bar_and_summary_agree(tiny_corpus_and_tokenizer, tmp_path):
    _, model = tiny_corpus_and_tokenizer
    inp = tmp_path / "mixed.jsonl"
    inp.write_text('{"text": "one"}\n{"text": nope}\n{"text": "two"}\n{"text": "   "}\n',
                   encoding="utf-8")
    r = _run_cli(tmp_path, inp, model, tmp_path / "o", "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    bar = r.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("2docs ") and "2 skipped" in bar, r.stderr
    assert ("docs=2 tokens=" in r.stdout and "skipped=2 (bad_lines=1 empty=1, of which "
            "whitespace-only 1)" in r.stdout), r.stdout


def test_lone_surrogate_is_a_file_line_error_or_a_counted_skip(tiny_corpus_and_tokenizer,
                                                               tmp_path, capsys):
    _, model = tiny_corpus_and_tokenizer
    inp = tmp_path / "sur.jsonl"
    # a valid escaped pair (an emoji) stays text; a lone \ud800 cannot be encoded by any tokenizer
    inp.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    for w in ("1", "2"):
        out = tmp_path / f"w{w}"
        assert _run(str(inp), model, out / "s", "--workers", w) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"preprocess_data.py: error: {inp}:2: key 'text' holds a lone surrogate \\ud800 at "
            f"character 1 (a \\uD800-\\uDFFF escape without its pair): not valid Unicode text; "
            f"pass --skip-bad-lines to skip and count such records"]
        assert not out.exists()
        assert _run(str(inp), model, out / "s", "--workers", w, "--skip-bad-lines") == 0
        s = _stats(out / "s")
        assert (s["docs"], s["bad_lines"], s["records"]) == (1, 1, 1)
        tok = build_tokenizer(SP, model)
        assert tok.detokenize(_read(out / "s")[0]) == "ok \U0001F600"


def test_whitespace_only_text_is_dropped_and_counted(tiny_corpus_and_tokenizer, tmp_path):
    # Decision (docstring, README): unlike Megatron-LM's tool, a whitespace-only text is not
    # written; it is counted in "empty" and, apart, in "whitespace_only".
    _, model = tiny_corpus_and_tokenizer
    inp = _write_jsonl(tmp_path / "ws.jsonl", ["text", " \n\t ", "", "more"])
    assert build_tokenizer(SP, model).tokenize(" \n\t ")  # the tokenizer would give it ids
    assert _run(inp, model, tmp_path / "w") == 0
    s = _stats(tmp_path / "w")
    assert (s["docs"], s["empty"], s["whitespace_only"], s["skipped"]) == (2, 2, 1, 2)
    assert s["per_key"]["text"]["whitespace_only"] == 1
