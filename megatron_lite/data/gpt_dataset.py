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

from megatron_lite.data.helpers import build_sample_idx
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.utils import atomic_write_text, follow_umask

_INDEX_VERSION = "gpt-index-v1"


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

    Raises:
        ValueError: the split holds fewer than ``L + 1`` tokens but samples were asked for.
    """

    def __init__(self, indexed, document_range: Tuple[int, int], seq_length: int, num_samples: int,
                 seed: int = 1234, eod_id: Optional[int] = None, *, shuffle: bool = True,
                 reset_position_ids: bool = False, reset_attention_mask: bool = False,
                 eod_mask_loss: bool = False, cache_dir: Optional[str] = None, name: str = "train"):
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
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // self.seq_length
        num_samples = int(num_samples)
        if num_samples > 0 and self.samples_per_epoch == 0:
            raise ValueError(
                f"{self.prefix} split '{name}' (documents [{start}, {end})) holds {self.tokens_per_epoch} "
                f"tokens, fewer than seq_length + 1 = {self.seq_length + 1}: change --split or --seq-length")
        self.num_epochs = -(-num_samples // self.samples_per_epoch) if num_samples > 0 else 0
        self.cache_hit = False
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

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def get_text(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        """The ``L + 1`` tokens of sample ``idx`` (int64) and the document ids it touches (int64)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
        j = int(self.shuffle_idx[idx])
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
            the sample), ``document_ids`` int64 (sequence ids in the indexed dataset, in order),
            ``dataset_id`` (0) and ``sample_id`` (``idx``).
        """
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
