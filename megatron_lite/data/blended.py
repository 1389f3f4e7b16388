"""Weighted blending of several datasets: fixed weights, temperature, or a stage schedule.

Mapping of global samples to sources. Position ``i`` of the blended stream is drawn from source
``dataset_index[i]`` at that source's sample ``dataset_sample_index[i]``; each source's sample
indices rise 0, 1, 2, ... so no source sample is used twice and none is skipped.

* Fixed weights: Megatron-LM's greedy interleave over the whole stream
  (:func:`~megatron_lite.data.helpers.build_blending_indices`).
* Temperature ``T`` (no explicit weights): ``w_i ∝ n_i^(1/T)`` with ``n_i`` the tokens of
  source ``i`` in this split (the temperature sampling of multilingual pretraining, e.g. XLM-R,
  Conneau et al. 2020, Sec. 3.1 with ``alpha = 1/T``).
* Stage schedule: a YAML list ``[{until_tokens: N_k, weights: [...]}, ...]`` with rising
  ``N_k``. Sample ``i`` consumes label tokens ``[i*L, (i+1)*L)``; it belongs to the first stage
  with ``i*L < N_k`` (the last stage continues past its ``until_tokens``), i.e. stage ``k`` covers
  samples ``[ceil(N_{k-1}/L), ceil(N_k/L))``. Within a stage the greedy interleave restarts
  (position 0 = first sample of the stage) with that stage's weights while each source's sample
  counter continues from where the previous stage left it.
  Example (CPT "new domain first", weights in ``--data-path`` order or by prefix)::

      - {until_tokens: 2.0e9, weights: [0.8, 0.2]}
      - {until_tokens: 1.0e11, weights: {data/new_text_document: 0.3, data/old_text_document: 0.7}}

* Resume: :meth:`BlendedDataset.state_dict` records ``consumed_samples`` and per-source consumed
  counts. If on :meth:`BlendedDataset.load_state_dict` the schedule differs from the saved one,
  positions ``>= consumed_samples`` are re-derived from the saved per-source counts (a new
  interleave segment starts there), so a changed schedule neither repeats nor skips samples.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_lite.data.helpers import build_blending_indices


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as float64 summing to 1.

    Raises:
        ValueError: a negative weight or a zero sum.
    """
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)} must be >= 0 with a positive sum")
    return w / w.sum()


def temperature_weights(token_counts: Sequence[int], temperature: float) -> np.ndarray:
    """``w_i ∝ n_i^(1/T)``: T=1 proportional to size, T→∞ uniform, T<1 sharper than size."""
    if temperature <= 0:
        raise ValueError(f"--data-temperature must be > 0, got {temperature}")
    n = np.asarray(token_counts, dtype=np.float64)
    return normalize_weights(n ** (1.0 / temperature))


def load_stages(path: str, prefixes: Sequence[str]) -> List[Tuple[int, np.ndarray]]:
    """Read a ``--data-stages`` YAML file into ``[(until_tokens, weights), ...]``.

    Each entry is ``{until_tokens: int, weights: [w per --data-path source] | {prefix: w}}``.

    Raises:
        ValueError: naming the file and entry when a stage is malformed or not increasing.
    """
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f)
    if isinstance(raw, dict) and "stages" in raw:
        raw = raw["stages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty YAML list of {{until_tokens, weights}}")
    stages, prev = [], -1
    for k, st in enumerate(raw):
        where = f"{path}: stage {k}"
        if not isinstance(st, dict) or set(st) != {"until_tokens", "weights"}:
            raise ValueError(f"{where}: needs exactly the keys until_tokens and weights, got {st!r}")
        until = int(float(st["until_tokens"]))
        if until <= prev:
            raise ValueError(f"{where}: until_tokens {until} must exceed the previous stage's {prev}")
        w = st["weights"]
        if isinstance(w, dict):
            unknown = set(w) - set(prefixes)
            if unknown:
                raise ValueError(f"{where}: unknown prefixes {sorted(unknown)}; sources are {list(prefixes)}")
            w = [float(w.get(p, 0.0)) for p in prefixes]
        if len(w) != len(prefixes):
            raise ValueError(f"{where}: {len(w)} weights for {len(prefixes)} --data-path sources")
        stages.append((until, normalize_weights(w)))
        prev = until
    return stages


def compute_blend(stages: List[Tuple[int, np.ndarray]], size: int, tokens_per_sample: int,
                  start: int = 0, counts: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Source and source-sample index for positions ``[start, size)`` of the blended stream.

    Args:
        stages: ``[(until_tokens, weights)]``; one stage with any ``until_tokens`` = fixed weights.
        size: blended samples.
        tokens_per_sample: ``L`` (label tokens per sample) for the token -> sample mapping.
        start: first position to compute (a resume point starts a new interleave segment).
        counts: int64 per-source samples consumed before ``start``.

    Returns:
        ``(dataset_index int16 [size - start], dataset_sample_index int64 [size - start])``.
    """
    n = len(stages[0][1])
    counts = np.zeros(n, np.int64) if counts is None else np.asarray(counts, np.int64).copy()
    bounds = [-(-until // tokens_per_sample) for until, _ in stages[:-1]] + [max(size, start)]
    di_parts, dsi_parts, lo = [], [], 0
    for (until, w), hi in zip(stages, bounds):
        a, b = max(lo, start), min(hi, size)
        lo = max(lo, hi)
        if b <= a:
            continue
        di, dsi = build_blending_indices(w, b - a, counts)
        counts += np.bincount(di, minlength=n)
        di_parts.append(di)
        dsi_parts.append(dsi)
    if not di_parts:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    return np.concatenate(di_parts), np.concatenate(dsi_parts)


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several datasets by a deterministic weighted interleave.

    Args:
        datasets: the sources, or ``None`` entries to be made by ``factory``.
        stages: ``[(until_tokens, weights)]`` (fixed weights: one stage).
        size: blended samples.
        tokens_per_sample: ``L``.
        factory: ``factory(source, num_samples) -> dataset``; used to (re)build a source that
            must hold at least ``num_samples`` samples. Required when ``datasets`` is None.
        names: per-source labels (prefixes) for messages and inspection.

    Raises:
        ValueError: a source is too small for the samples the blend takes from it.
    """

    def __init__(self, datasets: Optional[List], stages: List[Tuple[int, np.ndarray]], size: int,
                 tokens_per_sample: int, factory: Optional[Callable] = None,
                 names: Optional[Sequence[str]] = None):
        self.stages, self.size, self.L, self.factory = stages, int(size), int(tokens_per_sample), factory
        self.num_sources = len(stages[0][1])
        self.names = list(names) if names else [str(i) for i in range(self.num_sources)]
        self.dataset_index, self.dataset_sample_index = compute_blend(stages, self.size, self.L)
        self._seg_start, self._seg_counts = 0, np.zeros(self.num_sources, np.int64)
        self.datasets = list(datasets) if datasets is not None else [None] * self.num_sources
        self._ensure_sizes()

    def _needed(self) -> np.ndarray:
        need = np.zeros(self.num_sources, np.int64)
        if len(self.dataset_index):
            np.maximum.at(need, self.dataset_index.astype(np.int64), self.dataset_sample_index + 1)
        return need

    def _ensure_sizes(self) -> None:
        for j, n in enumerate(self._needed()):
            ds = self.datasets[j]
            have = 0 if ds is None else len(ds)
            if n > have:
                if self.factory is None:
                    raise ValueError(f"blend source {self.names[j]} has {have} samples but the blend "
                                     f"takes {n} from it")
                self.datasets[j] = self.factory(j, int(n))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for blended dataset of {self.size} samples")
        j = int(self.dataset_index[idx])
        sample = dict(self.datasets[j][int(self.dataset_sample_index[idx])])
        sample["dataset_id"], sample["sample_id"] = j, int(idx)
        return sample

    def _fingerprint(self) -> str:
        desc = [[int(u), [float(x) for x in w]] for u, w in self.stages] + [self.L]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def source_consumed(self, consumed_samples: int) -> np.ndarray:
        """Samples taken from each source by the first ``consumed_samples`` positions."""
        c = min(int(consumed_samples), self.size)
        if c < self._seg_start:
            raise ValueError(f"consumed_samples {c} precedes the resume point {self._seg_start}")
        seg = self.dataset_index[self._seg_start:c].astype(np.int64)
        return self._seg_counts + np.bincount(seg, minlength=self.num_sources)

    def state_dict(self, consumed_samples: int) -> dict:
        """Resume state after ``consumed_samples`` blended samples (JSON-serialisable)."""
        return {"consumed_samples": int(consumed_samples),
                "source_consumed": self.source_consumed(consumed_samples).tolist(),
                "fingerprint": self._fingerprint(), "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        """Continue after a saved state; re-derive positions ``>= consumed_samples`` if the schedule changed.

        Raises:
            ValueError: the saved state has a different number of sources.
        """
        counts = np.asarray(state["source_consumed"], np.int64)
        if len(counts) != self.num_sources:
            raise ValueError(f"saved blend state has {len(counts)} sources, this run has {self.num_sources} "
                             f"({self.names}); the --data-path sources must stay the same")
        c = int(state["consumed_samples"])
        if state.get("fingerprint") == self._fingerprint() and np.array_equal(self.source_consumed(c), counts):
            return  # same schedule: the mapping is already identical
        di, dsi = compute_blend(self.stages, self.size, self.L, start=c, counts=counts)
        self.dataset_index = np.concatenate([self.dataset_index[:c], di])
        self.dataset_sample_index = np.concatenate([self.dataset_sample_index[:c], dsi])
        self._seg_start, self._seg_counts = c, counts
        self._ensure_sizes()
