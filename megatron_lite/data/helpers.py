"""Index builders for packing and blending: C++ (``megatron_lite._data_helpers``) with NumPy references.

:func:`build_sample_idx`, :func:`build_packed_idx` and :func:`build_blending_indices` dispatch to the compiled extension when
it was built (``python setup.py build_ext --inplace``) and otherwise fall back, with one warning, to
the NumPy references below. Both implementations are exported explicitly
(``*_cpp`` / ``*_numpy``) for tests and ``bench/bench_data.py``.

Semantics are Megatron-LM's (``megatron/core/datasets/helpers.cpp``):

* sample index — documents are read in ``doc_idx`` order as one token stream; sample ``i`` is
  the stream tokens ``[i*L, i*L + L]`` (``L + 1`` tokens, ``L = seq_length``), so consecutive
  samples overlap by one token and every stream token after the first is a label exactly once.
  Row ``i`` of the index is ``(k, offset)``: the sample starts at token ``offset`` of document
  ``doc_idx[k]``. Row 0 is always ``(0, 0)``; row ``i`` for ``i >= 1`` names the first
  *non-empty* document that contains stream position ``i*L``.
* blending index — position ``i`` of the blended stream goes to the source ``j`` maximising
  ``w_j * max(i, 1) - taken_j`` (ties to the lowest ``j``), where ``taken_j`` counts the
  positions already given to ``j`` (Megatron uses ``max(i, 1)``, not ``i + 1``). Sources of
  weight 0 are never chosen (in Megatron a zero weight can win the tie at ``i == 1``).
* packed index (``--packing best-fit|none``) — one epoch's documents become bins of at most
  ``C = L + 1`` tokens (a sample reads ``L + 1`` tokens: inputs ``[0, L)``, labels ``[1, L]``,
  so a document of ``L + 1`` tokens fills one sample and all its ``L`` predictions are trained).
  See :func:`build_packed_idx_numpy` for the exact rules (best-fit decreasing of Ding et al.
  2024, "Fewer Truncations Improve Language Modeling", Algorithm 1, over windows of documents).
"""

from __future__ import annotations

import warnings
from bisect import bisect_left, insort
from typing import List, Optional, Tuple

import numpy as np

try:  # the compiled builder is optional: the NumPy reference gives identical results, slower
    import megatron_lite._data_helpers as _ext
except ImportError as _e:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = _e
_warned = False
_warned_packed = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        warnings.warn("megatron_lite._data_helpers is not built (run `python setup.py build_ext "
                      f"--inplace`); using the NumPy reference index builders ({_IMPORT_ERROR})")
        _warned = True


def have_cpp() -> bool:
    """True when the compiled extension is importable."""
    return _ext is not None


def _check_tokens(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int):
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")


def build_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                           num_samples: int) -> np.ndarray:
    """NumPy reference of the sample index (vectorised: a binary search per sample boundary).

    Args:
        sizes: int32 ``[n_docs]`` document lengths in tokens.
        doc_idx: int ``[K]`` document order (may repeat documents over epochs).
        seq_length: ``L``, tokens per sample excluding the extra label token.
        num_samples: samples to index.

    Returns:
        int64 ``[num_samples + 1, 2]`` of ``(position in doc_idx, token offset)``.

    Raises:
        ValueError: bad arguments, or fewer than ``num_samples * L + 1`` tokens in ``doc_idx``.
    """
    _check_tokens(sizes, doc_idx, seq_length, num_samples)
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx, dtype=np.int64)]
    ends = np.cumsum(lengths)  # ends[k]: stream position one past document k
    total = int(ends[-1]) if len(ends) else 0
    if num_samples > 0 and total < num_samples * seq_length + 1:
        raise ValueError(f"documents hold {total} tokens, fewer than the {num_samples * seq_length + 1} "
                         f"that {num_samples} samples need")
    pos = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    # first document whose end lies beyond the position; empty documents (end == previous end)
    # can never be that document, matching the C++ loop which steps over them
    k = np.searchsorted(ends, pos, side="right")
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    out[1:, 0] = k
    out[1:, 1] = pos - (ends[k] - lengths[k])
    return out


def build_blending_indices_numpy(weights, size: int, counts: Optional[np.ndarray] = None
                                 ) -> Tuple[np.ndarray, np.ndarray]:
    """NumPy reference of the greedy blending interleave (see module docstring).

    Args:
        weights: ``[n]`` normalised source weights.
        size: positions to assign (samples).
        counts: int64 ``[n]`` samples already taken from each source (sample indices continue
            from these); zeros by default.

    Returns:
        ``(dataset_index int16 [size], dataset_sample_index int64 [size])``.
    """
    w = np.asarray(weights, dtype=np.float64)
    c0 = np.zeros(len(w), np.int64) if counts is None else np.asarray(counts, np.int64)
    di = np.empty(size, dtype=np.int16)
    dsi = np.empty(size, dtype=np.int64)
    if not (w > 0).any():
        raise ValueError("at least one blend weight must be positive")
    taken = np.zeros(len(w), dtype=np.float64)
    never = w <= 0
    for i in range(size):
        err = w * max(float(i), 1.0) - taken
        err[never] = -np.inf  # a zero-weight source would otherwise tie at i == 1 (error 0)
        j = int(np.argmax(err))  # argmax returns the first maximum: ties go to the lowest index
        di[i] = j
        dsi[i] = c0[j] + int(taken[j])
        taken[j] += 1
    return di, dsi


def build_sample_idx_cpp(sizes, doc_idx, seq_length: int, num_samples: int) -> np.ndarray:
    """C++ sample index (same contract as :func:`build_sample_idx_numpy`).

    Raises:
        ImportError: the extension is not built.
    """
    if _ext is None:
        raise ImportError("megatron_lite._data_helpers is not built") from _IMPORT_ERROR
    try:
        return _ext.build_sample_idx(np.ascontiguousarray(sizes, dtype=np.int32),
                                     np.ascontiguousarray(doc_idx), int(seq_length), int(num_samples))
    except Exception as e:  # pybind maps std::invalid_argument to ValueError already; keep type
        raise ValueError(str(e)) from e


def build_blending_indices_cpp(weights, size: int, counts=None) -> Tuple[np.ndarray, np.ndarray]:
    """C++ blending interleave (same contract as :func:`build_blending_indices_numpy`).

    Raises:
        ImportError: the extension is not built.
    """
    if _ext is None:
        raise ImportError("megatron_lite._data_helpers is not built") from _IMPORT_ERROR
    w = np.ascontiguousarray(weights, dtype=np.float64)
    c = np.zeros(len(w), np.int64) if counts is None else np.ascontiguousarray(counts, dtype=np.int64)
    return _ext.build_blending_indices(w, int(size), c)


def build_sample_idx(sizes, doc_idx, seq_length: int, num_samples: int) -> np.ndarray:
    """Sample index, C++ when built else the NumPy reference (see :func:`build_sample_idx_numpy`)."""
    if _ext is not None:
        return build_sample_idx_cpp(sizes, doc_idx, seq_length, num_samples)
    _warn_fallback()
    return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples)


def build_blending_indices(weights, size: int, counts=None) -> Tuple[np.ndarray, np.ndarray]:
    """Blending interleave, C++ when built else the NumPy reference."""
    if _ext is not None:
        return build_blending_indices_cpp(weights, size, counts)
    _warn_fallback()
    return build_blending_indices_numpy(weights, size, counts)


PACK_MODES = {"none": 0, "best-fit": 1}


def _pieces(sizes: np.ndarray, docs: np.ndarray, cap: int) -> List[Tuple[int, int, int]]:
    """``(document, offset, length)`` pieces of ``docs`` in order: ``n // cap`` full pieces of a
    document of ``n`` tokens, then its remainder ``n % cap`` (if > 0); empty documents give none."""
    out = []
    for d in docs.tolist():
        n = int(sizes[d])
        full = max(n - 1, 0) // cap  # a document of exactly k*cap tokens ends in a full piece
        out += [(d, k * cap, cap) for k in range(full)]
        if n - full * cap > 0:
            out.append((d, full * cap, n - full * cap))
    return out


def _fill_bins(bins: List[List[list]], used: List[int], cap: int) -> None:
    # receivers: the fullest non-full bins (ties: earlier bin); donors: the least filled, from the back
    order = sorted((b for b in range(len(bins)) if used[b] < cap), key=lambda b: -used[b])
    i, j = 0, len(order) - 1
    while i < j:
        r, g = order[i], order[j]
        last = bins[g][-1]
        t = min(cap - used[r], last[2])
        bins[r].append([last[0], last[1] + last[2] - t, t])  # the donor segment's last t tokens
        last[2] -= t
        used[r] += t
        used[g] -= t
        if last[2] == 0:
            bins[g].pop()
        if used[r] == cap:
            i += 1
        if not bins[g]:
            j -= 1


def _best_fit(pieces: List[Tuple[int, int, int]], cap: int, fill: bool) -> List[List[list]]:
    bins: List[List[list]] = []
    used: List[int] = []
    open_bins: List[Tuple[int, int]] = []  # sorted (free space, bin)
    for d, off, n in sorted(pieces, key=lambda p: -p[2]):  # sorted() is stable: ties keep order
        k = bisect_left(open_bins, (n, -1))  # the least free space >= n, then the earliest bin
        if k == len(open_bins):
            b = len(bins)
            bins.append([])
            used.append(0)
        else:
            b = open_bins.pop(k)[1]
        bins[b].append([d, off, n])
        used[b] += n
        if used[b] < cap:
            insort(open_bins, (cap - used[b], b))
    if fill:
        _fill_bins(bins, used, cap)
    return [b for b in bins if b]


def build_packed_idx_numpy(sizes: np.ndarray, docs: np.ndarray, capacity: int, mode: str = "best-fit",
                           window: int = 1000, fill: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Python reference of one epoch's packed samples (``--packing best-fit|none``).

    Rules (the C++ builder follows them step by step, with the same tie-breaks):

    1. Pieces. A document of ``n <= C`` tokens (``C = capacity = L + 1``) is one piece; a longer
       one is cut at multiples of ``C`` into ``n // C`` full pieces (each exactly one sample) and
       a remainder of ``n % C`` tokens. The prediction across a cut is lost (one in ``C``), as in
       Ding et al., whose chunks are independent samples. Empty documents give no piece.
    2. ``none``: every piece is one sample, in document order (the un-packed mode).
    3. ``best-fit``: ``docs`` is cut into windows of ``window`` consecutive documents. In each
       window the pieces, sorted by length descending (stable: ties keep document order), go
       one by one into the open bin with the least free space that still holds the piece (ties:
       the bin opened first), else into a new bin (best-fit decreasing). A window's bins follow
       the previous window's, in the order they were opened; a bin's segments keep the order
       they were placed in.
    4. ``fill``: after step 3 the window's non-full bins are ordered fullest first (ties: opened
       first); the fullest takes, into its free space, the last ``t`` tokens of the last segment
       of the least-filled bin (``t`` = the smaller of its free space and that segment's length),
       and so on until the receivers and donors meet: at most one bin per window stays not
       full, every token still appears exactly once, and only documents in donor bins are
       split (the moved tokens are fragments: contiguous runs of one document).

    Args:
        sizes: int ``[n_docs]`` document lengths in tokens.
        docs: int ``[K]`` this epoch's document order (document ids, i.e. rows of ``sizes``).
        capacity: ``C`` tokens per sample (``seq_length + 1``).
        mode: ``"best-fit"`` or ``"none"``.
        window: documents per best-fit window (>= 1).
        fill: fill free space with fragments (step 4; best-fit only).

    Returns:
        ``(segments int64 [n_seg, 3], bin_starts int64 [n_bins + 1])``: sample ``b`` is the
        segments ``bin_starts[b]:bin_starts[b+1]``, each ``(document, token offset, length)``,
        read in order; their lengths sum to at most ``C`` (the rest is padding).

    Raises:
        ValueError: bad mode, capacity or window; a document id outside ``sizes``.
    """
    if mode not in PACK_MODES:
        raise ValueError(f"packing mode must be one of {sorted(PACK_MODES)}, got {mode!r}")
    if capacity <= 0 or window < 1:
        raise ValueError(f"capacity must be positive and window >= 1, got {capacity}, {window}")
    sizes = np.asarray(sizes)
    docs = np.asarray(docs, dtype=np.int64)
    if len(docs) and (docs.min() < 0 or docs.max() >= len(sizes)):
        raise ValueError("document id out of range of sizes")
    segs: List[list] = []
    starts = [0]
    step = len(docs) if mode == "none" else window
    for w in range(0, len(docs), max(step, 1)):
        pieces = _pieces(sizes, docs[w:w + step], capacity)
        bins = [[list(p)] for p in pieces] if mode == "none" else _best_fit(pieces, capacity, fill)
        for b in bins:
            segs += b
            starts.append(len(segs))
    return np.asarray(segs, dtype=np.int64).reshape(-1, 3), np.asarray(starts, dtype=np.int64)


def build_packed_idx_cpp(sizes, docs, capacity: int, mode: str = "best-fit", window: int = 1000,
                         fill: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """C++ packed index (same contract as :func:`build_packed_idx_numpy`).

    Raises:
        ImportError: the extension is not built (or predates the packed builder).
        ValueError: as the reference.
    """
    if _ext is None or not hasattr(_ext, "build_packed_idx"):
        raise ImportError("megatron_lite._data_helpers is not built (or is older than build_packed_idx)")
    if mode not in PACK_MODES:
        raise ValueError(f"packing mode must be one of {sorted(PACK_MODES)}, got {mode!r}")
    try:
        return _ext.build_packed_idx(np.ascontiguousarray(sizes, dtype=np.int32), np.ascontiguousarray(docs),
                                     int(capacity), PACK_MODES[mode], int(window), bool(fill))
    except (IndexError, RuntimeError) as e:  # std::out_of_range arrives as IndexError
        raise ValueError(str(e)) from e


def build_packed_idx(sizes, docs, capacity: int, mode: str = "best-fit", window: int = 1000,
                     fill: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Packed index, C++ when built else the NumPy reference (see :func:`build_packed_idx_numpy`)."""
    global _warned_packed
    if _ext is not None and hasattr(_ext, "build_packed_idx"):
        return build_packed_idx_cpp(sizes, docs, capacity, mode, window, fill)
    if _ext is None:
        _warn_fallback()
    elif not _warned_packed:  # an extension built before the packed builder existed
        warnings.warn("megatron_lite._data_helpers predates build_packed_idx (rebuild it: `python setup.py "
                      "build_ext --inplace`); using the NumPy reference packed index builder")
        _warned_packed = True
    return build_packed_idx_numpy(sizes, docs, capacity, mode, window, fill)
