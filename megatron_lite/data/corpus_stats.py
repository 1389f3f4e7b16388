"""Statistics of a tokenized corpus (a Megatron ``.bin``/``.idx`` pair): document lengths, their
percentiles and histogram, token frequencies, tokens per character.

Used by ``tools/data_stats.py`` and ``tools/preprocess_data.py`` (its stats file's percentiles).
"""

from __future__ import annotations

import math

import numpy as np

from megatron_lite.data.indexed import IndexedDataset, data_file_path


def length_percentiles(lengths: np.ndarray) -> dict:
    """p50/p90/p99 (nearest rank: ``p`` is the ``ceil(p/100 * n)``-th smallest), max and mean of
    ``lengths``; all None for an empty array."""
    if lengths.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    s = np.sort(lengths)
    n = s.size

    def rank(p: float) -> int:
        return int(s[max(1, math.ceil(p / 100 * n)) - 1])

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": int(s[-1]), "mean": float(s.mean())}


def document_lengths(ds: IndexedDataset) -> np.ndarray:
    """Tokens per document (a document may span several sequences), int64 ``[documents]``."""
    sizes = np.asarray(ds.sizes, dtype=np.int64)
    bounds = np.asarray(ds.document_indices, dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(sizes)])
    return csum[bounds[1:]] - csum[bounds[:-1]]


def length_histogram(lengths: np.ndarray, bins: int = 40) -> dict:
    """Histogram over log-spaced bins from 1 token to the longest document: ``{"edges": [bins+1]
    token counts (right-open bins, the last one closed), "counts": [bins]}``; documents of 0
    tokens are counted in ``"empty"``."""
    pos = lengths[lengths > 0]
    if pos.size == 0:
        return {"edges": [], "counts": [], "empty": int(lengths.size)}
    top = max(int(pos.max()), 2)
    edges = np.unique(np.round(np.logspace(0, math.log10(top), bins + 1)).astype(np.int64))
    edges[-1] = top
    counts, _ = np.histogram(pos, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "empty": int((lengths == 0).sum())}


def token_counts(ds: IndexedDataset, vocab_size: int | None = None, chunk: int = 1 << 26) -> np.ndarray:
    """Occurrences of every token id in the whole ``.bin``, int64 ``[max(vocab_size, max id + 1)]``,
    counted in chunks of ``chunk`` tokens (memory bounded for corpora of any size)."""
    tokens = np.memmap(data_file_path(ds.path_prefix), dtype=ds.dtype, mode="r")
    counts = np.zeros(vocab_size or 0, dtype=np.int64)
    for start in range(0, tokens.size, chunk):
        c = np.bincount(np.asarray(tokens[start:start + chunk]).astype(np.int64))
        if c.size > counts.size:
            counts = np.concatenate([counts, np.zeros(c.size - counts.size, np.int64)])
        counts[:c.size] += c
    return counts


def tokens_per_character(ds: IndexedDataset, tokenizer, sample: int, seed: int = 0,
                         eod: int | None = None) -> dict:
    """Tokens per character of decoded text on up to ``sample`` documents drawn without
    replacement (seeded): ``{"documents", "tokens", "characters", "tokens_per_char"}``. The EOD
    token, when given, is left out of both counts."""
    lengths = document_lengths(ds)
    n_docs = lengths.size
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n_docs, size=min(sample, n_docs), replace=False)) if n_docs else []
    bounds = np.asarray(ds.document_indices, dtype=np.int64)
    n_tok = n_chr = 0
    for d in picks:
        ids = np.concatenate([np.asarray(ds[i]) for i in range(bounds[d], bounds[d + 1])]) \
            if bounds[d + 1] > bounds[d] else np.zeros(0, np.int64)
        if eod is not None:
            ids = ids[ids != eod]
        n_tok += int(ids.size)
        n_chr += len(tokenizer.decode(ids.tolist()))
    return {"documents": int(len(picks)), "tokens": n_tok, "characters": n_chr,
            "tokens_per_char": n_tok / n_chr if n_chr else None}
