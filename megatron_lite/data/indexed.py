"""Memory-mapped token files, byte-compatible with Megatron-LM's ``MMapIndexedDataset``.

A dataset is a pair ``<prefix>.bin`` (all token ids back to back) and ``<prefix>.idx``:

==========  =====================  =========================================================
offset      type                   meaning
==========  =====================  =========================================================
0           9 bytes                magic ``b"MMIDIDX\\x00\\x00"``
9           ``<Q``                 version, always 1
17          ``<B``                 dtype code (see :data:`DTYPE_CODES`)
18          ``<Q``                 sequence count ``N``
26          ``<Q``                 document count ``M`` (= number of document-index entries)
34          int32[N]               sequence lengths, in tokens
..          int64[N]               byte offset of each sequence in the ``.bin`` file
..          int64[M]               document indices: document ``d`` is sequences
                                   ``[doc[d], doc[d+1])``; starts at 0, ends at ``N``
==========  =====================  =========================================================

This is the layout written by Megatron-LM's ``megatron/core/datasets/indexed_dataset.py``
(``_IndexWriter.write``), so files produced by either project read back identically in the other.
"""

from __future__ import annotations

import os
import shutil
import struct
from typing import Optional

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_BYTES = len(_MAGIC) + 8 + 1 + 8 + 8  # 34

#: Megatron-LM's dtype codes (``DType`` enum in indexed_dataset.py).
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def data_file_path(prefix: str) -> str:
    """Path of the token file for ``prefix``."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """Path of the index file for ``prefix``."""
    return prefix + ".idx"


def best_dtype(vocab_size: Optional[int]) -> type:
    """Smallest token dtype that holds every id of a vocabulary (Megatron's rule).

    Args:
        vocab_size: number of token ids (None means unknown).

    Returns:
        ``np.uint16`` when ``vocab_size < 65500``, else ``np.int32``.
    """
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dataset_exists(prefix: str) -> bool:
    """True when both ``<prefix>.bin`` and ``<prefix>.idx`` exist."""
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class IndexedDatasetError(ValueError):
    """Raised when a ``.bin``/``.idx`` pair is missing, truncated, foreign or inconsistent."""


def _read_index(idx_path: str):
    """Parse and validate an ``.idx`` file; returns (dtype, sizes, pointers, doc_indices, mmap)."""
    file_size = os.path.getsize(idx_path)
    if file_size < _HEADER_BYTES:
        raise IndexedDatasetError(
            f"{idx_path}: file is {file_size} bytes, shorter than the {_HEADER_BYTES}-byte "
            f"MMIDIDX header (truncated or not a Megatron index file)")
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if header[:9] != _MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: bad magic {header[:9]!r}, expected {_MAGIC!r} (not a Megatron "
            f"MMapIndexedDataset index; re-create it with tools/preprocess_data.py)")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != _VERSION:
        raise IndexedDatasetError(f"{idx_path}: index version {version}, only version 1 is supported")
    code = header[17]
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    dtype = np.dtype(DTYPE_CODES[code])
    n_seq, n_doc = struct.unpack("<QQ", header[18:34])
    expected = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if file_size == expected + n_seq and n_seq:
        raise IndexedDatasetError(
            f"{idx_path}: index carries per-sequence modes (Megatron multimodal format); only "
            f"text-only MMIDIDX files are supported")
    if file_size != expected:
        raise IndexedDatasetError(
            f"{idx_path}: {file_size} bytes on disk, but the header ({n_seq} sequences, {n_doc} "
            f"document-index entries) implies {expected} bytes (truncated or corrupt)")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    off = _HEADER_BYTES
    sizes = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=off)
    off += 4 * n_seq
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=off)
    off += 8 * n_seq
    doc_indices = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=off)
    return dtype, sizes, pointers, doc_indices, mm


class IndexedDataset:
    """Read-only memory-mapped view of a ``<prefix>.bin``/``.idx`` pair.

    ``ds[i]`` is sequence ``i`` as a zero-copy numpy view of shape ``[sizes[i]]`` (dtype of the
    file). On open the index is validated: magic, version, dtype code, index length against its
    header, byte pointers contiguous from 0, document indices monotone from 0 to the sequence
    count, and the ``.bin`` size equal to the total tokens times the item size.

    Args:
        path_prefix: path without ``.bin``/``.idx``.
        mmap_bin_files: memory-map the ``.bin`` (default); False reads it fully into memory.

    Raises:
        FileNotFoundError: ``<prefix>.idx`` or ``<prefix>.bin`` is missing.
        IndexedDatasetError: the files are truncated, foreign or inconsistent.
    """

    def __init__(self, path_prefix: str, mmap_bin_files: bool = True):
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"{p} does not exist: --data-path takes the prefix without .bin/.idx, e.g. "
                    f"'corpus_text_document' for corpus_text_document.bin/.idx")
        self._dtype, self._sizes, self._pointers, self._doc, self._idx_mm = _read_index(idx_path)
        n = len(self._sizes)
        if n and (self._sizes < 0).any():
            raise IndexedDatasetError(f"{idx_path}: negative sequence length")
        item = self._dtype.itemsize
        expected_ptr = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(self._sizes[:-1].astype(np.int64) * item, out=expected_ptr[1:])
        if not np.array_equal(expected_ptr, self._pointers):
            raise IndexedDatasetError(
                f"{idx_path}: byte pointers are not the running sum of sequence lengths x "
                f"{item} bytes ({self._dtype.name}): wrong dtype code or corrupt index")
        doc = self._doc
        if len(doc) == 0 or doc[0] != 0 or doc[-1] != n or (np.diff(doc) < 0).any():
            raise IndexedDatasetError(
                f"{idx_path}: document indices must rise from 0 to the sequence count {n}")
        total_bytes = int(self._sizes.astype(np.int64).sum()) * item
        bin_size = os.path.getsize(bin_path)
        if bin_size != total_bytes:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_size} bytes on disk, but {idx_path} describes "
                f"{total_bytes // item} tokens of {self._dtype.name} = {total_bytes} bytes "
                f"(truncated, or .bin and .idx come from different runs)")
        if total_bytes == 0:
            self._bin = np.zeros(0, dtype=self._dtype)
        elif mmap_bin_files:
            self._bin = np.memmap(bin_path, mode="r", dtype=self._dtype)
        else:
            self._bin = np.fromfile(bin_path, dtype=self._dtype)

    def __getstate__(self):
        # DataLoader workers started with "spawn" pickle the dataset: reopen the files there
        # instead of copying every mapped token into the pickle.
        return {"path_prefix": self.path_prefix, "mmap_bin_files": isinstance(self._bin, np.memmap)}

    def __setstate__(self, state):
        self.__init__(state["path_prefix"], state["mmap_bin_files"])

    @property
    def dtype(self) -> np.dtype:
        """Token dtype stored in the file."""
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """Sequence lengths in tokens, int32 ``[N]``."""
        return self._sizes

    @property
    def sequence_lengths(self) -> np.ndarray:
        """Alias of :attr:`sizes` (Megatron-core name)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """Byte offset of each sequence in the ``.bin``, int64 ``[N]``."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """Document boundaries over sequences, int64 ``[M]`` from 0 to ``N``."""
        return self._doc

    def num_tokens(self) -> int:
        """Total tokens in the file."""
        return int(self._sizes.astype(np.int64).sum())

    def __len__(self) -> int:
        return len(self._sizes)

    def _check(self, idx: int) -> int:
        n = len(self._sizes)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix} ({n} sequences)")
        return idx

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        idx = self._check(int(idx))
        start = int(self._pointers[idx]) // self._dtype.itemsize
        return self._bin[start:start + int(self._sizes[idx])]

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` as a zero-copy view.

        Raises:
            IndexError: ``idx`` out of range, or the span runs past the sequence end.
        """
        idx = self._check(int(idx))
        size = int(self._sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"span [{offset}, {offset + length}) outside sequence {idx} of "
                             f"length {size} in {self.path_prefix}")
        start = int(self._pointers[idx]) // self._dtype.itemsize + offset
        return self._bin[start:start + length]


class IndexedDatasetBuilder:
    """Writer for a ``.bin``/``.idx`` pair (Megatron-LM ``IndexedDatasetBuilder`` semantics).

    Tokens stream into ``bin_path`` as they are added; :meth:`finalize` writes the index. For an
    atomic pair, write to temporary names and ``os.replace`` both (``.idx`` last) — see
    :func:`finalize_atomic`.

    Args:
        bin_path: output ``.bin`` path (created/truncated).
        dtype: token dtype, one of :data:`DTYPE_CODES` values (use :func:`best_dtype`).

    Raises:
        ValueError: ``dtype`` has no Megatron dtype code.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        dt = np.dtype(dtype)
        if dt not in _CODE_OF:
            raise ValueError(f"dtype {dt} has no MMIDIDX code; use one of "
                             f"{[np.dtype(v).name for v in DTYPE_CODES.values()]}")
        self._dtype = dt
        self._bin_path = bin_path
        self._file = open(bin_path, "wb")
        self._sizes: list = []
        self._doc: list = [0]

    @property
    def dtype(self) -> np.dtype:
        """Token dtype written to the .bin (uint16 below 65,500 ids, else int32)."""
        return self._dtype

    def add_item(self, tokens) -> None:
        """Append one sequence (1-D ids) without closing the current document.

        Raises:
            ValueError: ``tokens`` is not 1-D or holds ids the dtype cannot represent.
        """
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"add_item expects a 1-D token array, got shape {arr.shape}")
        if arr.size and arr.dtype != self._dtype:
            info = np.iinfo(self._dtype) if self._dtype.kind in "iu" else None
            if info is not None and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"token ids [{arr.min()}, {arr.max()}] do not fit {self._dtype.name}; "
                                 f"use best_dtype(vocab_size) / int32")
        self._file.write(np.ascontiguousarray(arr, dtype=self._dtype).tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        """Close the current document (all sequences added since the previous call)."""
        self._doc.append(len(self._sizes))

    def add_document(self, tokens, lengths=None) -> None:
        """Append one document: ``tokens`` as one sequence, or split into ``lengths`` sequences."""
        arr = np.asarray(tokens)
        if lengths is None:
            self.add_item(arr)
        else:
            if sum(lengths) != arr.size:
                raise ValueError(f"lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
            start = 0
            for n in lengths:
                self.add_item(arr[start:start + n])
                start += n
        self.end_document()

    def merge_file_(self, prefix: str) -> None:
        """Append every sequence and document of another dataset (same dtype) to this one.

        Raises:
            ValueError: the other dataset's dtype differs.
        """
        other = IndexedDataset(prefix)
        if other.dtype != self._dtype:
            raise ValueError(f"{prefix}: dtype {other.dtype} differs from the builder's {self._dtype}")
        base = len(self._sizes)
        self._sizes.extend(other.sizes.tolist())
        self._doc.extend((other.document_indices[1:] + base).tolist())
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, 16 << 20)

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the index to ``idx_path``."""
        self._file.close()
        if self._doc[-1] != len(self._sizes):
            self._doc.append(len(self._sizes))  # an unterminated trailing document
        write_index(idx_path, self._dtype, np.asarray(self._sizes, dtype=np.int32),
                    np.asarray(self._doc, dtype=np.int64))


def write_index(idx_path: str, dtype, sizes: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an MMIDIDX index (header, int32 sizes, int64 pointers, int64 document indices)."""
    dt = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dt.itemsize, out=pointers[1:])
    doc = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(_MAGIC)
        f.write(struct.pack("<Q", _VERSION))
        f.write(struct.pack("<B", _CODE_OF[dt]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc.tobytes(order="C"))


def finalize_atomic(builder: IndexedDatasetBuilder, tmp_prefix: str, out_prefix: str) -> None:
    """Finalize a builder that wrote ``<tmp_prefix>.bin`` and publish the pair atomically.

    The ``.bin`` is moved first and the ``.idx`` last, so an interrupted run never leaves an
    index pointing at a partial token file (a stale ``.idx`` is removed before starting).
    """
    if os.path.exists(index_file_path(out_prefix)):
        os.remove(index_file_path(out_prefix))
    builder.finalize(index_file_path(tmp_prefix))
    os.replace(data_file_path(tmp_prefix), data_file_path(out_prefix))
    os.replace(index_file_path(tmp_prefix), index_file_path(out_prefix))
