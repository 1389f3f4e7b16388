"""Light data governance: exact and near-duplicate detection, and train/eval n-gram overlap.

Used by ``tools/dedup.py`` and ``tools/contamination.py``; every function here works on one
document's text so the tools can run it in worker processes.

Text normalisation (:func:`normalize_text`, shared by both): Unicode NFKC, lower case, every run
of characters that are neither letters nor digits becomes one space, stripped. Two documents that
differ only in case, punctuation or whitespace therefore have the same normalised text. This is
the "ignore capitalisation and punctuation" rule of GPT-3's overlap test (Brown et al. 2020,
appendix C) and the usual normalisation before MinHash (Lee et al. 2022, "Deduplicating Training
Data Makes Language Models Better").

* Exact duplicates: the 128-bit BLAKE2b digest of the normalised text.
* Near duplicates: MinHash (Broder 1997) over word n-gram shingles of the normalised text, with
  ``datasketch``'s ``MinHash`` and ``MinHashLSH`` (banding tuned for a Jaccard threshold).
  :class:`NearDuplicateIndex` keeps the first document of every cluster in input order.
* Contamination: 64-bit hashes of word n-grams (default 13, as GPT-3's test); an evaluation
  document's contamination share is the fraction of its n-grams that also occur in training data.
  A document shorter than ``n`` words contributes its whole word sequence as one n-gram.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Sequence

import numpy as np

_NON_ALNUM = re.compile(r"[\W_]+", re.UNICODE)
# Odd 64-bit multiplier for the polynomial n-gram hash (any odd constant with mixed bits works;
# this is the 64-bit golden-ratio constant).
_MULT = np.uint64(0x9E3779B97F4A7C15)


def normalize_text(text: str) -> str:
    """NFKC, lower case, non-alphanumeric runs -> one space, stripped (module docstring)."""
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def words(text: str) -> list[str]:
    """The words of the normalised text."""
    norm = normalize_text(text)
    return norm.split(" ") if norm else []


def exact_key(text: str) -> bytes:
    """16-byte BLAKE2b digest of the normalised text: equal for texts that differ only in case,
    punctuation and whitespace."""
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).digest()


def _word_hashes(ws: Sequence[str]) -> np.ndarray:
    cache: dict[str, int] = {}
    out = np.empty(len(ws), dtype=np.uint64)
    for i, w in enumerate(ws):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
        out[i] = h
    return out


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the word ``n``-grams of ``text``, uint64 ``[max(words - n + 1, 1)]``
    (empty for a text without words). Hash of words w_0..w_{n-1}: sum_i H(w_i) * M^(n-1-i) mod 2^64
    with H = 8-byte BLAKE2b of the word: deterministic across processes and runs.

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    ws = words(text)
    if not ws:
        return np.empty(0, dtype=np.uint64)
    h = _word_hashes(ws)
    k = min(n, len(h))
    acc = np.zeros(len(h) - k + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            acc = acc * _MULT + h[j:j + len(acc)]
    return acc


def shingles(text: str, n: int) -> list[bytes]:
    """Word ``n``-gram shingles of the normalised text as UTF-8 bytes (the whole text as one
    shingle when it has fewer than ``n`` words; none for a text without words)."""
    ws = words(text)
    if not ws:
        return []
    if len(ws) < n:
        return [" ".join(ws).encode("utf-8")]
    return [" ".join(ws[i:i + n]).encode("utf-8") for i in range(len(ws) - n + 1)]


def minhash_signature(text: str, n: int, num_perm: int, seed: int = 1) -> np.ndarray:
    """MinHash signature (``datasketch.MinHash.hashvalues``, uint64 ``[num_perm]``) of the word
    ``n``-gram shingles of ``text``. An empty text gets datasketch's empty signature."""
    from datasketch import MinHash  # why: optional heavy import, only the dedup tool needs it

    m = MinHash(num_perm=num_perm, seed=seed)
    sh = shingles(text, n)
    if sh:
        m.update_batch(sh)
    return m.hashvalues


class NearDuplicateIndex:
    """Streaming near-duplicate clustering: each new document is compared (through LSH buckets)
    with the documents kept so far; one whose estimated Jaccard similarity with a kept document is
    at least ``threshold`` joins that document's cluster, else it is kept and indexed.

    Args:
        threshold: Jaccard threshold in (0, 1].
        num_perm: MinHash permutations (signature length).
        seed: MinHash seed (signatures must have been made with the same one).

    Raises:
        ValueError: threshold outside (0, 1], num_perm < 2.
    """

    def __init__(self, threshold: float, num_perm: int, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"--threshold {threshold}: a Jaccard similarity threshold must be in (0, 1]")
        if num_perm < 2:
            raise ValueError(f"--num-perm {num_perm}: need at least 2 permutations")
        from datasketch import MinHash, MinHashLSH  # why: optional heavy import, only the dedup tool needs it

        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # the permutation scheme minhash_signature's MinHash used (datasketch >= 2 asks for it)
        self._scheme = MinHash(num_perm=num_perm, seed=seed).scheme
        # datasketch's MinHashLSH accepts thresholds in [0, 1); at 1.0 it would refuse, and a
        # threshold of 1 means identical shingle sets, which a slightly lower band tuning still finds.
        self._lsh = MinHashLSH(threshold=min(threshold, 0.999), num_perm=num_perm)
        self._kept: dict[int, object] = {}

    def add(self, doc_id: int, hashvalues: np.ndarray) -> int | None:
        """Offer document ``doc_id``; return the id of the kept document it duplicates (the
        most similar candidate at or above the threshold), or None when it is kept."""
        from datasketch import MinHash  # why: see __init__

        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues, scheme=self._scheme)
        best, best_sim = None, -1.0
        for cand in self._lsh.query(m):
            sim = m.jaccard(self._kept[cand])
            if sim >= self.threshold and (sim > best_sim or (sim == best_sim and cand < best)):
                best, best_sim = cand, sim
        if best is not None:
            return best
        self._lsh.insert(doc_id, m)
        self._kept[doc_id] = m
        return None


def contamination_share(eval_hashes: np.ndarray, hit: set[int] | np.ndarray) -> float:
    """Fraction of an evaluation document's distinct n-gram hashes found in ``hit`` (0.0 for a
    document without n-grams)."""
    uniq = np.unique(eval_hashes)
    if uniq.size == 0:
        return 0.0
    hit_arr = np.fromiter(hit, dtype=np.uint64) if isinstance(hit, set) else np.asarray(hit, dtype=np.uint64)
    return float(np.isin(uniq, hit_arr).sum()) / float(uniq.size)
