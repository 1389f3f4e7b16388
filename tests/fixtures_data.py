"""Shared test data: a tiny deterministic JSONL corpus and a SentencePiece model trained on it.

Usage from any test module::

    from tests.fixtures_data import make_tiny_corpus_and_tokenizer
    jsonl_path, model_path = make_tiny_corpus_and_tokenizer(tmp_path)

or the session-scoped pytest fixture ``tiny_corpus_and_tokenizer`` (import it into the module:
``from tests.fixtures_data import tiny_corpus_and_tokenizer  # noqa: F401``).

The tokenizer is a lossless BPE model (vocab 512: 3 specials, 256 byte pieces, the rest learned)
trained by ``tools/train_tokenizer.py``; ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (eod), no pad.
Training happens once per process; later calls copy the files into the new directory (< 10 ms).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys

import pytest

TINY_VOCAB_SIZE = 512

# Texts that stress lossless tokenization; they are also part of the corpus.
AWKWARD_TEXTS = [
    "line one\nline two\n\n\nafter blank lines\n",
    "tabs\tbetween\t\twords and trailing tab\t",
    "repeated     spaces    inside   ",
    "windows\r\nline\r\nendings\r\n",
    "accents: café naïve résumé Ångström Straße",
    "emoji: 😀 🚀 👩‍💻 and CJK 日本語 中文 한국어",
    "def f(x):\n    if x > 0:\n        return x * 2  # double\n    return -x\n",
    "special-looking text </s> <s> <unk> <pad> must stay text",
    "   leading spaces and a trailing newline\n",
    "unicode separators \u2028 \u2029 \u0085 stay inside",
    "digits 0123456789 and 3.14159 and 1,000,000",
]

_WORDS = ("the of and to in is that for it as with was on be by this are from at or an which "
          "data model token train loss layer value return import class self print sum range "
          "café naïve 日本 語 😀").split()


def _tiny_docs(n: int = 300, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    docs = list(AWKWARD_TEXTS)
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            indent = " " * (4 * rng.randint(0, 2))
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 14)))
            if rng.random() < 0.2:
                words += f" {rng.randint(0, 99999)}"
            lines.append(indent + words)
        docs.append("\n".join(lines) + ("\n" if rng.random() < 0.5 else ""))
    return docs


_CACHE: dict[str, str] = {}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools/ is not a package), once per process."""
    mod_name = f"_tool_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name,
                                                      os.path.join(ROOT, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


def make_tiny_corpus_and_tokenizer(tmpdir) -> tuple[str, str]:
    """Write ``tiny.jsonl`` and train ``tiny_sp.model`` under ``tmpdir``.

    Args:
        tmpdir: a directory (str or path-like), e.g. pytest's ``tmp_path``.

    Returns:
        (jsonl_path, model_path): the corpus (one ``{"text": ...}`` per line, UTF-8) and the
        SentencePiece model.
    """
    tmpdir = str(tmpdir)
    os.makedirs(tmpdir, exist_ok=True)
    jsonl = os.path.join(tmpdir, "tiny.jsonl")
    prefix = os.path.join(tmpdir, "tiny_sp")
    if _CACHE:
        shutil.copyfile(_CACHE["jsonl"], jsonl)
        for ext in (".model", ".vocab", ".stats.json"):
            shutil.copyfile(_CACHE["prefix"] + ext, prefix + ext)
        return jsonl, prefix + ".model"
    with open(jsonl, "w", encoding="utf-8", newline="\n") as f:
        for doc in _tiny_docs():
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    rc = load_tool("train_tokenizer").main(["--input", jsonl, "--model-prefix", prefix, "--vocab-size",
                               str(TINY_VOCAB_SIZE), "--num-threads", "1",
                               "--character-coverage", "1.0", "--held-out-fraction", "0.1"])
    if rc != 0:
        raise RuntimeError(f"training the tiny tokenizer failed (exit code {rc})")
    _CACHE.update(jsonl=jsonl, prefix=prefix)
    return jsonl, prefix + ".model"


@pytest.fixture(scope="session")
def tiny_corpus_and_tokenizer(tmp_path_factory) -> tuple[str, str]:
    """Session-scoped ``(jsonl_path, model_path)`` from :func:`make_tiny_corpus_and_tokenizer`."""
    return make_tiny_corpus_and_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))
