"""Packing GPT dataset: documents concatenated and cut into ``seq_length + 1``-token samples.

Each sequence of the :class:`~megatron_lite.data.indexed.IndexedDataset` is one document (as in
Megatron-LM's GPTDataset; tools/preprocess_data.py writes one sequence per document, ending in EOD
with ``--append-eod``). A split is a contiguous document range (see :func:`split_document_ranges`).

Order. The document order of epoch ``e`` is a permutation of the split's documents drawn from
``(seed, e)``; the epochs are concatenated into ``doc_idx`` and cut into samples by
:func:`~megatron_lite.data.helpers.build_sample_idx` (sample ``i`` = stream tokens
``[i*L, i*L + L]``). With ``T`` tokens per epoch the dataset has ``B = (T - 1) // L`` samples per
epoch block, and the sample order is a permutation of each block ``[b*B, (b+1)*B)`` drawn from
``(seed, b)``. Unlike Megatron's single shuffle over all epochs, block-wise shuffling makes
sample ``i`` independent of how many epochs were built, so a blended source can be grown on
resume without reordering samples already seen. ``shuffle=False`` (``--no-shuffle``) keeps disk
order for both.

Index arrays are cached as .npy files under ``cache_dir`` named by a SHA-256 of everything they
depend on; global rank 0 builds them while other ranks wait at a barrier.

Packing (``--packing``). ``concat`` (the default) is the scheme above, Megatron-LM's. ``best-fit``
and ``none`` keep each epoch's document order (the same permutation from ``(seed, e)``) but
place the documents into samples of ``L + 1`` token slots with
:func:`~megatron_lite.data.helpers.build_packed_idx` (best-fit decreasing over windows of
``--packing-window`` documents, or one document piece per sample); the unused slots at the end
of a sample are padding: input token = EOD (0 without an EOD id), label -100, loss mask 0, and,
under ``--reset-attention-mask``, a segment of their own. Epoch ``e`` gives ``B_e`` samples (it
varies with the order), shuffled within its block from ``(seed, e)`` as above, so sample ``i``
still does not depend on how many epochs were built and a run resumed at ``consumed_samples``
reads the same samples. The cache entry (key: everything above plus mode, window and fill; not
the epoch count) records ``B_e`` per epoch and is rebuilt with more epochs when a run needs them;
``len(ds)`` is the samples of the fewest epochs that reach ``num_samples``, whatever the cache holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from megatron_lite.data.helpers import build_packed_idx, build_sample_idx
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.utils import atomic_write_text, follow_umask

_INDEX_VERSION = "gpt-index-v1"
_PACKED_VERSION = "gpt-packed-index-v1"
PACKING_MODES = ("concat", "best-fit", "none")


def split_document_ranges(num_docs: int, weights) -> Tuple[Tuple[int, int], ...]:
    """Megatron's document split: cumulative ``round(w * n)`` bounds, drift folded into the last.

    Args:
        num_docs: documents in the corpus.
        weights: three normalised fractions (train, valid, test).

    Returns:
        Three ``(start, end)`` document ranges covering ``[0, num_docs)``.
    """
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_docs))))
    diff = bounds[-1] - num_docs
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    bounds = [min(max(b, 0), num_docs) for b in bounds]
    return tuple((bounds[i], bounds[i + 1]) for i in range(3))


def get_ltor_position_ids_and_masks(tokens: np.ndarray, eod_id: Optional[int], reset_position_ids: bool,
                                    reset_attention_mask: bool, eod_mask_loss: bool):
    """Loss mask, position ids and segment boundaries for one sample (Megatron semantics).

    Follows Megatron-LM ``get_ltor_masks_and_position_ids``: a position whose *input* token is EOD
    gets loss mask 0 under ``eod_mask_loss``; after an EOD at position ``i`` a new document starts at
    ``i + 1`` (positions restart at 0 under ``reset_position_ids``; a cu_seqlens boundary is added
    under ``reset_attention_mask``).

    Args:
        tokens: int ``[s]`` input tokens.

    Returns:
        ``(loss_mask float32 [s], position_ids int64 [s], cu_seqlens int32 [n+1])``.
    """
    s = len(tokens)
    loss_mask = np.ones(s, dtype=np.float32)
    position_ids = np.arange(s, dtype=np.int64)
    starts = np.zeros(0, dtype=np.int64)
    if eod_id is not None:
        eod_pos = np.flatnonzero(tokens == eod_id)
        if eod_mask_loss:
            loss_mask[eod_pos] = 0.0
        starts = eod_pos[eod_pos + 1 < s] + 1  # documents that begin inside this sample
        if reset_position_ids and len(starts):
            seg = np.zeros(s, dtype=np.int64)
            seg[starts] = 1
            seg_start = np.concatenate([[0], starts])[np.cumsum(seg)]
            position_ids = position_ids - seg_start
    if reset_attention_mask:
        cu = np.concatenate([[0], starts, [s]]).astype(np.int32)
    else:
        cu = np.array([0, s], dtype=np.int32)
    return loss_mask, position_ids, cu


def get_padded_sample_fields(text: np.ndarray, real: int, eod_id: Optional[int], reset_position_ids: bool,
                             reset_attention_mask: bool, eod_mask_loss: bool) -> Dict[str, np.ndarray]:
    """Inputs, labels and masks of a packed sample whose first ``real`` of ``L + 1`` tokens are data.

    Positions ``i < real - 1`` are data predictions, with Megatron's EOD rules applied to the
    data inputs ``[0, min(real, L))`` exactly as :func:`get_ltor_position_ids_and_masks` does (a
    padding token is never read as an EOD). From ``real - 1`` on the label is padding: label
    -100 and loss mask 0. The padding inputs ``[real, L)`` continue the position ids (restart at
    0 under ``reset_position_ids``) and form their own cu_seqlens segment under
    ``reset_attention_mask``; attention is causal, so data tokens never see padding either way.

    Args:
        text: int64 ``[L + 1]`` tokens (padding already written after ``real``).
        real: data tokens, ``1 <= real <= L + 1``.

    Returns:
        dict with ``tokens``/``labels`` int64 ``[L]``, ``loss_mask`` float32 ``[L]``,
        ``position_ids`` int64 ``[L]``, ``cu_seqlens`` int32 ``[n+1]``.
    """
    s = len(text) - 1
    r = min(real, s)
    loss_mask = np.zeros(s, dtype=np.float32)
    position_ids = np.arange(s, dtype=np.int64)
    lm, pos, cu = get_ltor_position_ids_and_masks(text[:r], eod_id, reset_position_ids, reset_attention_mask,
                                                  eod_mask_loss)
    loss_mask[:r], position_ids[:r] = lm, pos
    loss_mask[real - 1:] = 0.0
    labels = text[1:].copy()
    labels[real - 1:] = -100
    if r < s:
        if reset_position_ids:
            position_ids[r:] -= r
        cu = np.concatenate([cu, [s]]) if reset_attention_mask else np.array([0, s])
    return {"tokens": text[:-1], "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "cu_seqlens": cu.astype(np.int32)}


def _atomic_save(path: str, arr: np.ndarray) -> None:
    # Streamed to a temporary file (an index can be GBs); mkstemp makes it 0600, but the cache is
    # shared by every rank and teammate of a run, so it follows the umask like the .json beside it.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _dist_rank() -> Tuple[int, bool]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), True
    return 0, False


class GPTDataset(torch.utils.data.Dataset):
    """Packed samples over a document range of one indexed dataset.

    Args:
        indexed: an :class:`IndexedDataset` or its path prefix.
        document_range: ``(start, end)`` sequence indices of this split.
        seq_length: ``L``, tokens per sample (each sample reads ``L + 1``).
        num_samples: minimum samples wanted; the dataset holds whole epoch blocks, so
            ``len(ds) >= num_samples`` (0 gives an empty dataset).
        seed: shuffling seed.
        eod_id: end-of-document token id (None: no EOD handling).
        shuffle: False keeps document and sample order as on disk.
        reset_position_ids, reset_attention_mask, eod_mask_loss: Megatron flags, see
            :func:`get_ltor_position_ids_and_masks`.
        cache_dir: directory for index arrays (default ``<prefix dir>/index_cache``).
        name: split name, used in messages and cache file names.
        packing: ``"concat"`` (Megatron's concatenate-and-split), ``"best-fit"`` or ``"none"``
            (see the module docstring and :func:`~megatron_lite.data.helpers.build_packed_idx_numpy`).
        packing_window: documents per best-fit window.
        packing_fill: best-fit fills the free slots with fragments instead of padding.

    Raises:
        ValueError: the split holds fewer than ``L + 1`` tokens (concat; packed modes: no token)
            but samples were asked for; unknown packing mode; window < 1.
    """

    def __init__(self, indexed, document_range: Tuple[int, int], seq_length: int, num_samples: int,
                 seed: int = 1234, eod_id: Optional[int] = None, *, shuffle: bool = True,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 eod_mask_loss: bool = False, cache_dir: Optional[str] = None, name: str = "train",
                 packing: str = "concat", packing_window: int = 2000, packing_fill: bool = False):
        if packing not in PACKING_MODES:
            raise ValueError(f"--packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}")
        if int(packing_window) < 1:
            raise ValueError(f"--packing-window must be >= 1 documents, got {packing_window}")
        self.packing, self.packing_window, self.packing_fill = packing, int(packing_window), bool(packing_fill)
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.prefix = self.indexed.path_prefix
        start, end = int(document_range[0]), int(document_range[1])
        if not 0 <= start <= end <= len(self.indexed):
            raise ValueError(f"document range {document_range} outside [0, {len(self.indexed)}] of {self.prefix}")
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.document_range = (start, end)
        self.seq_length, self.seed, self.eod_id, self.shuffle, self.name = \
            int(seq_length), int(seed), eod_id, bool(shuffle), name
        self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss = \
            reset_position_ids, reset_attention_mask, eod_mask_loss
        self.cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.prefix)), "index_cache")
        sizes = self.indexed.sizes[start:end]
        self.tokens_per_epoch = int(sizes.astype(np.int64).sum())
        self.cache_hit = False
        if self.packing != "concat":
            self._init_packed(int(num_samples))
            return
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // self.seq_length
        num_samples = int(num_samples)
        if num_samples > 0 and self.samples_per_epoch == 0:
            raise ValueError(
                f"{self.prefix} split '{name}' (documents [{start}, {end})) holds {self.tokens_per_epoch} "
                f"tokens, fewer than seq_length + 1 = {self.seq_length + 1}: change --split or --seq-length")
        self.num_epochs = -(-num_samples // self.samples_per_epoch) if num_samples > 0 else 0
        if self.num_epochs == 0:
            self.doc_idx = np.zeros(0, np.int64)
            self.sample_idx = np.zeros((1, 2), np.int64)
            self.shuffle_idx = np.zeros(0, np.int64)
        else:
            self._load_or_build(sizes)

    # ------------------------------------------------------------------ index arrays
    def _cache_key(self, sizes: np.ndarray) -> str:
        h = hashlib.sha256()
        desc = {"version": _INDEX_VERSION, "prefix": os.path.abspath(self.prefix),
                "range": list(self.document_range), "seq_length": self.seq_length, "seed": self.seed,
                "shuffle": self.shuffle, "epochs": self.num_epochs, "dtype": self.indexed.dtype.name}
        h.update(json.dumps(desc, sort_keys=True).encode())
        h.update(np.ascontiguousarray(sizes).tobytes())  # corpus change -> new key
        self._desc = desc
        return h.hexdigest()[:32]

    def _paths(self, key: str) -> Dict[str, str]:
        base = os.path.join(self.cache_dir, f"{key}-{self.name}")
        return {k: f"{base}-{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")} | \
            {"desc": f"{base}-description.json"}

    def _load_or_build(self, sizes: np.ndarray) -> None:
        key = self._cache_key(sizes)
        paths = self._paths(key)
        rank, dist = _dist_rank()
        self._built, self._mem = False, None
        if rank == 0 and not os.path.isfile(paths["desc"]):
            self._build_and_save(paths)
        if dist:
            torch.distributed.barrier()  # others wait for rank 0's files
        if not os.path.isfile(paths["desc"]) and self._mem is None:  # e.g. node-local cache elsewhere
            self._build_and_save(paths)
        self.cache_hit = not self._built
        if self._mem is not None:  # cache directory not writable: keep this process's arrays
            self.doc_idx, self.sample_idx, self.shuffle_idx = self._mem
            return
        self.doc_idx = np.load(paths["doc_idx"], mmap_mode="r")
        self.sample_idx = np.load(paths["sample_idx"], mmap_mode="r")
        self.shuffle_idx = np.load(paths["shuffle_idx"], mmap_mode="r")
        if len(self.shuffle_idx) != self.num_epochs * self.samples_per_epoch:
            raise ValueError(f"{paths['shuffle_idx']}: cached index has the wrong length; delete "
                             f"{self.cache_dir} and rerun")

    def _build_and_save(self, paths: Dict[str, str]) -> None:
        doc_idx, sample_idx, shuffle_idx = self.build_indices()
        self._built = True
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            for k, arr in (("doc_idx", doc_idx), ("sample_idx", sample_idx), ("shuffle_idx", shuffle_idx)):
                _atomic_save(paths[k], arr)
            # written last: its presence marks a complete cache entry
            atomic_write_text(paths["desc"], json.dumps(self._desc, indent=1), fsync=False)
        except OSError as e:
            warnings.warn(f"cannot write the index cache in {self.cache_dir} ({e}); keeping the index "
                          f"in memory (set --data-cache-path to a writable directory to reuse it)")
            self._mem = (doc_idx, sample_idx, shuffle_idx)

    def build_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Build ``(doc_idx [E*n_docs], sample_idx [E*B + 1, 2], shuffle_idx [E*B])`` (no caching)."""
        start, end = self.document_range
        docs = np.arange(start, end, dtype=np.int32 if end < 2**31 else np.int64)
        epochs = []
        for e in range(self.num_epochs):
            epochs.append(np.random.default_rng([self.seed, e, 0]).permutation(docs) if self.shuffle else docs)
        doc_idx = np.concatenate(epochs)
        n = self.num_epochs * self.samples_per_epoch
        sample_idx = build_sample_idx(self.indexed.sizes, doc_idx, self.seq_length, n)
        B = self.samples_per_epoch
        if self.shuffle:
            shuffle_idx = np.concatenate([b * B + np.random.default_rng([self.seed, b, 1]).permutation(B)
                                          for b in range(self.num_epochs)]).astype(np.int64)
        else:
            shuffle_idx = np.arange(n, dtype=np.int64)
        return doc_idx, sample_idx, shuffle_idx

    # ------------------------------------------------------------------ packed modes (best-fit, none)
    def _init_packed(self, num_samples: int) -> None:
        start, end = self.document_range
        if num_samples > 0 and self.tokens_per_epoch == 0:
            raise ValueError(f"{self.prefix} split '{self.name}' (documents [{start}, {end})) holds no token: "
                             f"change --split")
        self.doc_idx = self.sample_idx = None  # concat's arrays; packed samples use segments/bin_starts
        self.segments, self.bin_starts = np.zeros((0, 3), np.int64), np.zeros(1, np.int64)
        self.shuffle_idx, self.epoch_samples = np.zeros(0, np.int64), []
        self.num_epochs, self.samples_per_epoch = 0, 0
        if num_samples > 0:
            self._packed_load_or_build(num_samples)

    def _packed_desc_path(self) -> str:
        desc = {"version": _PACKED_VERSION, "prefix": os.path.abspath(self.prefix),
                "range": list(self.document_range), "seq_length": self.seq_length, "seed": self.seed,
                "shuffle": self.shuffle, "dtype": self.indexed.dtype.name, "packing": self.packing,
                "window": self.packing_window if self.packing == "best-fit" else None,
                "fill": self.packing_fill and self.packing == "best-fit"}
        h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.indexed.sizes[slice(*self.document_range)]).tobytes())
        self._desc = desc
        return os.path.join(self.cache_dir, f"{h.hexdigest()[:32]}-{self.name}-description.json")

    def _cached_epochs(self, desc_path: str, num_samples: int) -> Optional[list]:
        """Per-epoch sample counts of the cache entry, if it exists and reaches ``num_samples``."""
        try:
            with open(desc_path) as f:
                counts = json.load(f)["epoch_samples"]
        except (OSError, ValueError, KeyError):
            return None
        return counts if sum(counts) >= num_samples else None

    def _packed_load_or_build(self, num_samples: int) -> None:
        desc_path = self._packed_desc_path()
        rank, dist = _dist_rank()
        mem, self._built = None, False
        if rank == 0 and self._cached_epochs(desc_path, num_samples) is None:
            mem = self._packed_build_and_save(desc_path, num_samples)
        if dist:
            torch.distributed.barrier()  # others wait for rank 0's files
        counts = self._cached_epochs(desc_path, num_samples) if mem is None else None
        if mem is None and counts is None:  # e.g. a node-local cache, or a cache that is not writable
            mem = self._packed_build_and_save(desc_path, num_samples)
            counts = self._cached_epochs(desc_path, num_samples) if mem is None else None
        self.cache_hit = not self._built
        if mem is not None:
            arrays, counts = mem
        else:
            base = desc_path[:-len("description.json")] + f"e{len(counts)}-"
            arrays = [np.load(base + k + ".npy", mmap_mode="r") for k in ("segments", "bin_starts", "shuffle_idx")]
        # the fewest epochs that reach num_samples: len(ds) must not depend on what the cache holds
        cum = np.cumsum(counts)
        self.num_epochs = int(np.searchsorted(cum, num_samples)) + 1
        self.epoch_samples = [int(c) for c in counts[:self.num_epochs]]
        self.samples_per_epoch = self.epoch_samples[0]
        self.segments, self.bin_starts = arrays[0], arrays[1]
        self.shuffle_idx = arrays[2][:int(cum[self.num_epochs - 1])]

    def _packed_build_and_save(self, desc_path: str, num_samples: int):
        """Build epochs until ``num_samples`` are reached and cache them; returns ``None`` when
        written, else ``(arrays, counts)`` kept in memory (cache directory not writable)."""
        arrays, counts = self.build_packed_indices(num_samples)
        self._built = True
        base = desc_path[:-len("description.json")] + f"e{len(counts)}-"
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            for k, arr in zip(("segments", "bin_starts", "shuffle_idx"), arrays):
                _atomic_save(base + k + ".npy", arr)
            # written last: its presence marks a complete entry; older entries with fewer epochs
            # stay on disk (a reader may hold them) and are no longer named
            atomic_write_text(desc_path, json.dumps(dict(self._desc, epoch_samples=counts), indent=1), fsync=False)
        except OSError as e:
            warnings.warn(f"cannot write the index cache in {self.cache_dir} ({e}); keeping the index "
                          f"in memory (set --data-cache-path to a writable directory to reuse it)")
            return arrays, counts
        return None

    def build_packed_indices(self, num_samples: int):
        """Packed epochs until ``num_samples`` samples (no caching).

        Returns:
            ``([segments int64 [n_seg, 3], bin_starts int64 [n + 1], shuffle_idx int64 [n]],
            epoch_samples list of B_e)``; segment rows are ``(document id, offset, length)``.
        """
        start, end = self.document_range
        docs = np.arange(start, end, dtype=np.int32 if end < 2**31 else np.int64)
        segs, starts, shuf, counts, total_segs = [], [np.zeros(1, np.int64)], [], [], 0
        while sum(counts) < num_samples:
            e = len(counts)
            order = np.random.default_rng([self.seed, e, 0]).permutation(docs) if self.shuffle else docs
            sg, bs = build_packed_idx(self.indexed.sizes, order, self.seq_length + 1, self.packing,
                                      self.packing_window, self.packing_fill)
            B = len(bs) - 1
            segs.append(sg)
            starts.append(bs[1:] + total_segs)
            perm = np.random.default_rng([self.seed, e, 1]).permutation(B) if self.shuffle else np.arange(B)
            shuf.append(sum(counts) + perm.astype(np.int64))
            counts.append(B)
            total_segs += len(sg)
        return [np.concatenate(segs), np.concatenate(starts), np.concatenate(shuf)], counts

    def _packed_text(self, j: int) -> Tuple[np.ndarray, np.ndarray, int]:
        a, b = int(self.bin_starts[j]), int(self.bin_starts[j + 1])
        rows = np.asarray(self.segments[a:b])
        text = np.full(self.seq_length + 1, self.eod_id if self.eod_id is not None else 0, dtype=np.int64)
        n = 0
        for d, off, length in rows.tolist():
            text[n:n + length] = self.indexed.get(d, off, length)
            n += length
        return text, rows[:, 0].astype(np.int64), n

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def get_text(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        """The ``L + 1`` tokens of sample ``idx`` (int64; packed modes: padding included) and the
        document ids it touches (int64)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
        j = int(self.shuffle_idx[idx])
        if self.packing != "concat":
            return self._packed_text(j)[:2]
        k0, o0 = (int(x) for x in self.sample_idx[j])
        k1, o1 = (int(x) for x in self.sample_idx[j + 1])
        get = self.indexed.get
        if k0 == k1:
            pieces, docs = [get(int(self.doc_idx[k0]), o0, o1 - o0 + 1)], [int(self.doc_idx[k0])]
        else:
            pieces, docs = [get(int(self.doc_idx[k0]), o0)], [int(self.doc_idx[k0])]
            for k in range(k0 + 1, k1):
                d = int(self.doc_idx[k])
                pieces.append(get(d))
                docs.append(d)
            pieces.append(get(int(self.doc_idx[k1]), 0, o1 + 1))
            docs.append(int(self.doc_idx[k1]))
        docs = [d for d, p in zip(docs, pieces) if len(p)]  # zero-length documents contribute nothing
        text = np.concatenate(pieces).astype(np.int64)
        assert len(text) == self.seq_length + 1, (len(text), idx)
        return text, np.asarray(docs, dtype=np.int64)

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        """Sample ``idx`` as numpy arrays.

        Returns:
            dict with ``tokens``/``labels`` int64 ``[L]``, ``loss_mask`` float32 ``[L]``,
            ``position_ids`` int64 ``[L]``, ``cu_seqlens`` int32 ``[n+1]`` (segment starts within
            the sample; packed modes: see :func:`get_padded_sample_fields`), ``document_ids`` int64 (sequence ids in the indexed dataset, in order),
            ``dataset_id`` (0) and ``sample_id`` (``idx``).
        """
        if self.packing != "concat":
            if not 0 <= idx < len(self):
                raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
            text, docs, real = self._packed_text(int(self.shuffle_idx[idx]))
            out = get_padded_sample_fields(text, real, self.eod_id, self.reset_position_ids,
                                           self.reset_attention_mask, self.eod_mask_loss)
            return dict(out, document_ids=docs, dataset_id=0, sample_id=int(idx))
        text, docs = self.get_text(int(idx))
        tokens, labels = text[:-1], text[1:]
        loss_mask, position_ids, cu = get_ltor_position_ids_and_masks(
            tokens, self.eod_id, self.reset_position_ids, self.reset_attention_mask, self.eod_mask_loss)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
                "cu_seqlens": cu, "document_ids": docs, "dataset_id": 0, "sample_id": int(idx)}

    def state_dict(self, consumed_samples: int = 0) -> dict:
        """Nothing to save: the order is a pure function of the constructor arguments."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """No-op (see :meth:`state_dict`)."""
