"""Index builders for packing and blending: C++ (``megatron_lite._data_helpers``) with NumPy references.

:func:`build_sample_idx` and :func:`build_blending_indices` dispatch to the compiled extension when
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
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np

try:  # the compiled builder is optional: the NumPy reference gives identical results, slower
    import megatron_lite._data_helpers as _ext
except ImportError as _e:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = _e
_warned = False


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
