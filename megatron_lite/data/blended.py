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

* Mixing controls (:func:`compute_mixed_blend`): a stage's weights are projected onto its share
  bounds (``--data-share-bounds NAME:LO:HI`` or the stage's ``bounds: {NAME: [LO, HI]}``); a corpus
  that has given its ``--data-max-epochs`` epochs of samples drops out and the interleave restarts
  at the next position with its weight redistributed over the others in proportion to theirs.
  Example stage file with bounds::

      - {until_tokens: 2.0e9, weights: [0.8, 0.2], bounds: {code_text_document: [0.1, 0.3]}}
      - {until_tokens: 1.0e11, weights: [0.5, 0.5]}

* Online changes (``--mixing-update online``, :meth:`BlendedDataset.apply_weights`): new weights
  from position ``P`` start a new segment (until the next change or stage start), continuing each
  source's sample counter. The mapping is a function of (stages, bounds, caps, the history of
  ``(P, weights)``), so replaying the saved history rebuilds it exactly.
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
from megatron_lite.data.mixing import effective_weights, parse_share_bounds


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

    Each entry is ``{until_tokens: int, weights: [w per --data-path source] | {prefix: w}}``, with
    an optional ``bounds: {corpus name: [lo, hi]}`` read by :func:`load_stage_bounds`.

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
        if not isinstance(st, dict) or not {"until_tokens", "weights"} <= set(st) <= \
                {"until_tokens", "weights", "bounds"}:
            raise ValueError(f"{where}: needs exactly the keys until_tokens and weights (bounds "
                             f"optional), got {st!r}")
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


def load_stage_bounds(path: str, names: Sequence[str]) -> List[Optional[Tuple[np.ndarray, np.ndarray]]]:
    """Per-stage share bounds from a ``--data-stages`` file's optional ``bounds`` keys.

    ``bounds: {corpus name: [lo, hi]}`` (names as in per-corpus validation, see
    :func:`~megatron_lite.data.data_config.corpus_names`; a prefix is accepted too); a stage without
    the key gets None (the ``--data-share-bounds`` apply there).

    Raises:
        ValueError: naming the file and stage (see :func:`~megatron_lite.data.mixing.parse_share_bounds`).
    """
    import yaml  # why: yaml is only needed when a stage file is given

    with open(path) as f:
        raw = yaml.safe_load(f)
    if isinstance(raw, dict) and "stages" in raw:
        raw = raw["stages"]
    out: List[Optional[Tuple[np.ndarray, np.ndarray]]] = []
    for k, st in enumerate(raw):
        b = st.get("bounds") if isinstance(st, dict) else None
        if b is None:
            out.append(None)
            continue
        if not isinstance(b, dict) or not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in b.values()):
            raise ValueError(f"{path}: stage {k}: bounds must map corpus names to [lo, hi], got {b!r}")
        specs = [f"{name}:{'' if v[0] is None else v[0]}:{'' if v[1] is None else v[1]}" for name, v in b.items()]
        out.append(parse_share_bounds(specs, names, flag=f"--data-stages {path}: stage {k}: bounds"))
    return out


def stage_starts(stages: List[Tuple[int, np.ndarray]], tokens_per_sample: int) -> List[int]:
    """First blended position of each stage: ``[0, ceil(N_0/L), ceil(N_1/L), ...]``."""
    return [0] + [-(-until // tokens_per_sample) for until, _ in stages[:-1]]


def _segments(stages, tokens_per_sample: int, history) -> List[Tuple[int, np.ndarray, int]]:
    """``[(start, weights, stage)]`` sorted by start: each stage's start with its weights, and each
    online weight change ``(position, weights)`` (after a stage start at the same position)."""
    starts = stage_starts(stages, tokens_per_sample)
    segs = [(starts[k], w, k, 0) for k, (_, w) in enumerate(stages)]
    for pos, w in history:
        k = max(i for i, s in enumerate(starts) if s <= pos)
        segs.append((int(pos), np.asarray(w, np.float64), k, 1))
    segs.sort(key=lambda x: (x[0], x[3]))
    return [(a, w, k) for a, w, k, _ in segs]


def _walk(w, bounds, a: int, b: int, counts: np.ndarray, caps: Optional[np.ndarray], out: list) -> None:
    """Greedy interleave of positions ``[a, b)`` with weights ``w``, restarted (with the exhausted
    corpus' weight redistributed) each time a corpus reaches its cap; appends
    ``(start, effective weights, di, dsi)`` pieces to ``out`` and advances ``counts``."""
    pos = a
    while pos < b:
        exhausted = counts >= caps if caps is not None else np.zeros(len(w), bool)
        # No bounds and no exhausted corpus: the stage's weights as given (bitwise today's blend).
        we = effective_weights(w, exhausted, bounds) if bounds is not None or exhausted.any() else w
        di, dsi = build_blending_indices(we, b - pos, counts)
        cut = b - pos
        if caps is not None:
            for j in np.flatnonzero(we > 0):
                hits = np.flatnonzero(di == j)
                room = int(caps[j] - counts[j])
                if len(hits) >= room:   # its cap-th sample: the next position is drawn without it
                    cut = min(cut, int(hits[room - 1]) + 1)
        di, dsi = di[:cut], dsi[:cut]
        counts += np.bincount(di, minlength=len(w)).astype(np.int64)
        out.append((pos, np.asarray(we, np.float64), di, dsi))
        pos += cut


def compute_mixed_blend(stages: List[Tuple[int, np.ndarray]], size: int, tokens_per_sample: int,
                        start: int = 0, counts: Optional[np.ndarray] = None,
                        caps: Optional[np.ndarray] = None, bounds: Optional[list] = None,
                        history: Sequence[Tuple[int, Sequence[float]]] = ()):
    """Source and source-sample index for positions ``[start, size)`` with the mixing controls.

    Segments start at every stage start and every online weight change ``history`` (a change at
    position ``P`` holds until the next change or stage start). In each segment the greedy
    interleave runs with the segment's weights projected onto its stage's share bounds; when a
    corpus reaches its cap (``caps[j]`` samples: ``--data-max-epochs`` epochs) the interleave
    restarts at the next position with that corpus' weight redistributed
    (:func:`~megatron_lite.data.mixing.effective_weights`). A ``start`` inside a segment restarts
    the interleave there (a resume with a changed schedule).

    Args:
        stages, size, tokens_per_sample, start, counts: as :func:`compute_blend`.
        caps: int64 ``[n]`` most samples each source may give (None: no cap).
        bounds: per stage ``(lo, hi)`` or None (None: no bounds).
        history: ``[(position, weights)]`` online weight changes.

    Returns:
        ``(dataset_index int16 [size-start], dataset_sample_index int64 [size-start],
        [(position, effective weights)])``.

    Raises:
        ValueError: every corpus with a positive weight reached its cap before ``size``.
    """
    n = len(stages[0][1])
    counts = np.zeros(n, np.int64) if counts is None else np.asarray(counts, np.int64).copy()
    segs = _segments(stages, tokens_per_sample, history)
    ends = [s[0] for s in segs[1:]] + [max(size, start)]
    out: list = []
    for (lo, w, k), hi in zip(segs, ends):
        a, b = max(lo, start), min(hi, size)
        if b > a:
            _walk(w, None if bounds is None else bounds[k], a, b, counts, caps, out)
    if not out:
        return np.zeros(0, np.int16), np.zeros(0, np.int64), []
    return (np.concatenate([o[2] for o in out]), np.concatenate([o[3] for o in out]),
            [(o[0], o[1]) for o in out])


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
    di, dsi, _ = compute_mixed_blend(stages, size, tokens_per_sample, start, counts)
    return di, dsi


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
        labels: corpus names (as per-corpus validation names them) for logs and the plan lines.
        caps: int64 ``[n]`` most samples per source (``--data-max-epochs``), or None.
        bounds: per stage ``(lo, hi)`` share bounds or None.
        online: weights may change during the run (:meth:`apply_weights`): every source is built
            up front for the most it may give (``min(size, cap)``), and the train loader resolves
            positions to ``(position, source, source sample)`` in the main process
            (:meth:`resolve`), so DataLoader workers never need the changing index.

    Raises:
        ValueError: a source is too small for the samples the blend takes from it, or every
            corpus reaches its cap before ``size``.
    """

    def __init__(self, datasets: Optional[List], stages: List[Tuple[int, np.ndarray]], size: int,
                 tokens_per_sample: int, factory: Optional[Callable] = None,
                 names: Optional[Sequence[str]] = None, caps: Optional[np.ndarray] = None,
                 bounds: Optional[list] = None, online: bool = False,
                 labels: Optional[Sequence[str]] = None):
        self.stages, self.size, self.L, self.factory = stages, int(size), int(tokens_per_sample), factory
        self.num_sources = len(stages[0][1])
        self.names = list(names) if names else [str(i) for i in range(self.num_sources)]
        self.labels = list(labels) if labels else self.names
        self.caps = None if caps is None else np.asarray(caps, np.int64)
        self.bounds, self.online = bounds, bool(online)
        self.history: List[Tuple[int, np.ndarray]] = []   # online weight changes (position, weights)
        self.mixing_state: dict = {}     # the online mixer's own state, saved with the data state
        self.resolved_upto = 0           # positions below this were handed to the loader (online)
        self.datasets = list(datasets) if datasets is not None else [None] * self.num_sources
        self._recompute(0, np.zeros(self.num_sources, np.int64))

    def _recompute(self, start: int, counts: np.ndarray) -> None:
        """Positions ``>= start`` re-derived from the per-source ``counts`` at ``start``."""
        di, dsi, eff = compute_mixed_blend(self.stages, self.size, self.L, start, counts, self.caps,
                                           self.bounds, self.history)
        if start == 0:
            self.dataset_index, self.dataset_sample_index, self.effective = di, dsi, eff
            self._seg_start, self._seg_counts = 0, np.zeros(self.num_sources, np.int64)
        else:
            self.dataset_index = np.concatenate([self.dataset_index[:start], di])
            self.dataset_sample_index = np.concatenate([self.dataset_sample_index[:start], dsi])
            self.effective = [e for e in self.effective if e[0] < start] + eff
        self._ensure_sizes()

    def _needed(self) -> np.ndarray:
        need = np.zeros(self.num_sources, np.int64)
        if len(self.dataset_index):
            np.maximum.at(need, self.dataset_index.astype(np.int64), self.dataset_sample_index + 1)
        if self.online:
            # Workers hold copies of the sources made before any weight change: build each for the
            # most any weight history can take from it.
            cap = np.full(self.num_sources, self.size, np.int64) if self.caps is None else \
                np.minimum(self.caps, self.size)
            need = np.maximum(need, cap)
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

    def resolve(self, indices: Sequence[int]) -> List[Tuple[int, int, int]]:
        """``[(position, source, source sample)]`` for loader positions (main process); records
        how far the loader has read ahead so that :meth:`apply_weights` can refuse a change behind it."""
        out = [(int(i), int(self.dataset_index[i]), int(self.dataset_sample_index[i])) for i in indices]
        if out:
            self.resolved_upto = max(self.resolved_upto, max(i for i, _, _ in out) + 1)
        return out

    def __getitem__(self, idx) -> dict:
        if isinstance(idx, tuple):   # resolved by the main process (online mixing)
            idx, j, sj = idx
        else:
            if not 0 <= idx < self.size:
                raise IndexError(f"sample {idx} out of range for blended dataset of {self.size} samples")
            j, sj = int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])
        sample = dict(self.datasets[j][sj])
        sample["dataset_id"], sample["sample_id"] = j, int(idx)
        return sample

    def weights_at(self, position: int) -> np.ndarray:
        """Effective weights (after caps and bounds) that drew position ``position``."""
        w = self.effective[0][1]
        for start, we in self.effective:
            if start > position:
                break
            w = we
        return w

    def base_weights_at(self, position: int) -> np.ndarray:
        """The schedule's weights at ``position`` (stage or last online change, before caps/bounds):
        what the online update multiplies."""
        w = self.stages[0][1]
        for start, we, _ in _segments(self.stages, self.L, self.history):
            if start > position:
                break
            w = we
        return np.asarray(w, np.float64)

    def stage_bounds_at(self, position: int):
        """The share bounds ``(lo, hi)`` of the stage holding ``position`` (None: unbounded)."""
        if self.bounds is None:
            return None
        k = max(i for i, s in enumerate(stage_starts(self.stages, self.L)) if s <= position)
        return self.bounds[k]

    def apply_weights(self, position: int, weights: Sequence[float]) -> None:
        """Online change: positions ``>= position`` are drawn with ``weights`` (until the next stage
        start), continuing each source's sample counter; recorded in :attr:`history`.

        Raises:
            RuntimeError: the loader has already read position ``position`` or later (the change
                would apply to samples prefetched under the old weights).
        """
        position = int(position)
        if position < self.resolved_upto:
            raise RuntimeError(f"online mixing: weights for position {position} arrive after the loader "
                               f"read up to {self.resolved_upto}; the look-ahead is too short")
        if position >= self.size:
            return
        self.history.append((position, np.asarray(weights, np.float64)))
        self._recompute(position, self.source_consumed(position))

    def _fingerprint(self) -> str:
        desc = [[int(u), [float(x) for x in w]] for u, w in self.stages] + [self.L]
        if self.caps is not None or self.bounds is not None:   # absent: today's fingerprint
            desc.append(None if self.caps is None else self.caps.tolist())
            desc.append(None if self.bounds is None else
                        [None if b is None else [b[0].tolist(), b[1].tolist()] for b in self.bounds])
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def source_consumed(self, consumed_samples: int) -> np.ndarray:
        """Samples taken from each source by the first ``consumed_samples`` positions."""
        c = min(int(consumed_samples), self.size)
        if c < self._seg_start:
            raise ValueError(f"consumed_samples {c} precedes the resume point {self._seg_start}")
        seg = self.dataset_index[self._seg_start:c].astype(np.int64)
        return self._seg_counts + np.bincount(seg, minlength=self.num_sources)

    def plan_lines(self) -> List[str]:
        """The start-up data plan: per source the tokens the run takes (samples x L), the tokens of
        one epoch of its split, the epochs that makes (samples / the source's
        ``samples_per_epoch``; epoch 0's count for packed modes), its cap and its share."""
        taken = self.source_consumed(self.size)
        how = "" if not self.online else f", --mixing-update online: the {len(self.history)} weight " \
            "changes so far, then the current weights"
        lines = [f"data plan (train split, {self.size} samples{how}):"]
        for j, name in enumerate(self.labels):
            ds = self.datasets[j]
            per_epoch = getattr(ds, "samples_per_epoch", 0) or 0
            epoch_tokens = getattr(ds, "tokens_per_epoch", None)
            of = f" of {epoch_tokens:,} per epoch" if epoch_tokens is not None else ""
            epochs = f" = {taken[j] / per_epoch:.3f} epochs" if per_epoch else ""
            cap = "" if self.caps is None or self.caps[j] >= self.size else f", cap {int(self.caps[j])} samples"
            lines.append(f"  corpus {name:<16}: {int(taken[j]) * self.L:,} tokens{of} ({int(taken[j])} samples"
                         f"{epochs}{cap}), share {taken[j] / max(self.size, 1):.4f}")
        return lines

    def state_dict(self, consumed_samples: int) -> dict:
        """Resume state after ``consumed_samples`` blended samples (JSON-serialisable); holds the
        online weight history (changes at positions past ``consumed_samples`` included: they were
        fixed before the save) and the mixer's state."""
        out = {"consumed_samples": int(consumed_samples),
               "source_consumed": self.source_consumed(consumed_samples).tolist(),
               "fingerprint": self._fingerprint(), "names": self.names}
        if self.history or self.mixing_state:
            out["history"] = [[int(p), [float(x) for x in w]] for p, w in self.history]
            out["mixing"] = self.mixing_state
        return out

    def load_state_dict(self, state: dict) -> None:
        """Continue after a saved state: the saved weight history is replayed (the index is then
        the one the saving run had); if the schedule differs, positions ``>= consumed_samples``
        are re-derived from the saved per-source counts.

        Raises:
            ValueError: the saved state has a different number of sources.
        """
        counts = np.asarray(state["source_consumed"], np.int64)
        if len(counts) != self.num_sources:
            raise ValueError(f"saved blend state has {len(counts)} sources, this run has {self.num_sources} "
                             f"({self.names}); the --data-path sources must stay the same")
        c = int(state["consumed_samples"])
        self.mixing_state = dict(state.get("mixing") or {})
        history = [(int(p), np.asarray(w, np.float64)) for p, w in state.get("history") or []]
        if history:
            self.history = history
            self._recompute(0, np.zeros(self.num_sources, np.int64))
        if state.get("fingerprint") == self._fingerprint() and np.array_equal(self.source_consumed(c), counts):
            return  # same schedule: the mapping is already identical
        self._recompute(c, counts)
        self._seg_start, self._seg_counts = c, counts
