"""tools/preprocess_data.py killed mid-run (SIGKILL to its whole process group, 2 worker
processes, while the temporary token file grows): no .bin/.idx pair a reader accepts is left under
the output name, nothing keeps running, and rerunning the same command succeeds with the output of
an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_lite.data.indexed import IndexedDataset
from tests.faults.harness import ROOT
from tests.fixtures_data import make_tiny_corpus_and_tokenizer

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _cmd(corpus, model, prefix):
    return [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--output-prefix", prefix, "--append-eod", "--workers", "2", "--chunk-size", "16",
            "--no-progress"]


def test_preprocess_killed_mid_run_then_rerun(tmp_path):
    import psutil

    jsonl, model = make_tiny_corpus_and_tokenizer(tmp_path / "tok")
    corpus = str(tmp_path / "big.jsonl")
    with open(jsonl, "rb") as f:
        lines = f.read()
    with open(corpus, "wb") as f:
        for _ in range(60):                        # ~2.8 MB: several seconds on 2 workers
            f.write(lines)
    prefix = str(tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(_cmd(corpus, model, prefix), env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        tmp_bin = []
        while time.time() < deadline and p.poll() is None:
            tmp_bin = [f for f in os.listdir(tmp_path) if f.startswith("out_text_document.tmp-")
                       and f.endswith(".bin") and os.path.getsize(tmp_path / f) > 20_000]
            if tmp_bin:
                break
            time.sleep(0.02)
        assert tmp_bin and p.poll() is None, "preprocess_data.py finished before it was killed"
        group = psutil.Process(p.pid).children(recursive=True)
        assert len(group) >= 2                     # the two tokenizer workers
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)       # the node dies: main process and workers
        except ProcessLookupError:                 # it had already finished (assert above)
            pass
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    # SIGKILL is delivered asynchronously: give the workers a moment to be gone (or zombies)
    _, alive = psutil.wait_procs(group, timeout=30)
    assert all(c.status() == psutil.STATUS_ZOMBIE for c in alive if c.is_running()), alive
    with pytest.raises(FileNotFoundError, match="out_text_document.idx does not exist"):
        IndexedDataset(prefix + "_text_document")
    left = sorted(os.listdir(tmp_path))
    assert not [f for f in left if f in ("out_text_document.bin", "out_text_document.idx")]
    # The same command again: succeeds; its output equals a run that was never interrupted.
    assert subprocess.run(_cmd(corpus, model, prefix), env=env, capture_output=True,
                          timeout=300).returncode == 0
    ds = IndexedDataset(prefix + "_text_document")
    assert len(ds) == 60 * lines.count(b"\n")
    ref = str(tmp_path / "ref")
    assert subprocess.run(_cmd(corpus, model, ref), env=env, capture_output=True,
                          timeout=300).returncode == 0
    for ext in (".bin", ".idx"):
        with open(prefix + "_text_document" + ext, "rb") as a, \
                open(ref + "_text_document" + ext, "rb") as b:
            assert a.read() == b.read(), ext
