"""Per-corpus data accounting in the step record, and online re-weighting of the train blend.

Every logged step's record carries, for each corpus ``name`` of a blended train split,
``data_weight/<name>`` (the effective weight that drew the step's first sample, after epoch caps
and share bounds) and ``consumed_tokens/<name>`` (samples taken from it so far x seq_length).

With ``--mixing-update online``, after each validation at a step ``s`` that is a multiple of
``--mixing-update-interval`` the per-corpus validation losses ``l_i`` (already token-weighted and
all-reduced over DP by :func:`~megatron_lite.training.evaluation.evaluate`) give the excess
``l_i - ref_i`` over the reference (``--mixing-reference``, else the corpus' lowest earlier
validation loss), and the weights take DoReMi's exponentiated-gradient step
(:func:`~megatron_lite.data.mixing.exponentiated_gradient_step`). Rank 0's result is broadcast so
every rank applies the same float64 weights. They take effect at blended position
``P = consumed_samples(s) + lookahead`` (:func:`~megatron_lite.data.builder.loader_lookahead_samples`:
the most positions the loader's workers can have prefetched), recorded with the weights in the
blend's history; the history and the running minima are part of the checkpoint's data state, so a
resumed run draws exactly the samples of the uninterrupted one.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.data.blended import BlendedDataset
from megatron_lite.data.builder import loader_lookahead_samples
from megatron_lite.data.mixing import exponentiated_gradient_step, load_reference_losses, reference_at
from megatron_lite.errors import ConfigError
from megatron_lite.parallel import get_data_parallel_world_size
from megatron_lite.training.callbacks.base import Callback


class DataMixing(Callback):
    """Logs per-corpus weights and tokens; with online mixing, updates the blend's weights.

    Args:
        cfg: finalized RunConfig.
        blend: the train :class:`BlendedDataset`.
        logger: the TrainingLogger (weight changes are written as ``type: "mixing"`` records).
        rank: global rank (rank 0 prints).
        device: where the broadcast tensor lives (the collective backend's device).
        valid_names: names of the per-corpus validation loaders.

    Raises:
        ConfigError: online mixing without per-corpus validation of every train corpus.
    """

    def __init__(self, cfg, blend: BlendedDataset, logger, rank: int, device, valid_names=()):
        dc = cfg.data
        self.blend, self.logger, self.rank, self.device = blend, logger, rank, device
        self.L, self.names = cfg.model.seq_length, list(blend.labels)
        self.online = dc.mixing_update == "online"
        self.interval = dc.mixing_update_interval or cfg.eval.eval_interval
        self.eta, self.smoothing = dc.mixing_eta, dc.mixing_smoothing
        self.lookahead = loader_lookahead_samples(dc.num_workers, cfg.training.micro_batch_size,
                                                  get_data_parallel_world_size())
        self.reference = load_reference_losses(dc.mixing_reference, self.names) \
            if self.online and dc.mixing_reference else None
        missing = [n for n in self.names if n not in valid_names]
        if self.online and missing:
            raise ConfigError(f"--mixing-update online: no per-corpus validation loss for train corpora "
                              f"{missing} (validation corpora: {list(valid_names)}); validate on the same "
                              "corpora (--data-path, or --valid-data-path with --data-names naming them)")
        self.trainer = None
        self._counted, self._counts = 0, np.zeros(len(self.names), np.int64)

    @classmethod
    def from_config(cls, cfg, train_ds, logger, rank, device, valid_names=()) -> Optional["DataMixing"]:
        """The callback for a blended train split (None for a single corpus or test iterators)."""
        if not isinstance(train_ds, BlendedDataset):
            return None
        return cls(cfg, train_ds, logger, rank, device, valid_names)

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def _consumed(self, c: int) -> np.ndarray:
        """Per-source samples of positions ``[0, c)``, counted incrementally (O(step) per step)."""
        if c < self._counted:
            self._counted, self._counts = 0, np.zeros(len(self.names), np.int64)
        if self._counted == 0 or c > self._counted:
            self._counts = self.blend.source_consumed(c) if self._counted == 0 else \
                self._counts + np.bincount(self.blend.dataset_index[self._counted:c].astype(np.int64),
                                           minlength=len(self.names))
            self._counted = c
        return self._counts

    def log_scalars(self) -> dict:
        if self.trainer is None:
            return {}
        c = min(self.trainer.state.consumed_samples, self.blend.size)
        w = self.blend.weights_at(max(c - self.trainer.step_batch, 0))
        counts = self._consumed(c)
        out = {}
        for j, name in enumerate(self.names):
            out[f"data_weight/{name}"] = float(w[j])
            out[f"consumed_tokens/{name}"] = int(counts[j]) * self.L
        return out

    def on_validation(self, iteration: int, per_corpus: dict) -> None:
        """After a validation (every rank, same ``per_corpus`` values): maybe update the weights."""
        if not self.online:
            return
        losses = np.array([per_corpus[n]["val_loss"] for n in self.names], np.float64)
        state = self.blend.mixing_state
        prev_min = state.get("running_min")
        if iteration > 0 and iteration % self.interval == 0:
            if self.reference is not None:
                ref = reference_at(self.reference, iteration, self.names)
            else:
                ref = np.array(prev_min, np.float64) if prev_min is not None else losses
            self._update(iteration, losses - ref)
        state["running_min"] = (losses if prev_min is None else np.minimum(prev_min, losses)).tolist()

    def _update(self, iteration: int, excess: np.ndarray) -> None:
        c = self.trainer.state.consumed_samples
        P = c + self.lookahead
        if P >= self.blend.size:
            return
        alpha = self.blend.base_weights_at(P)
        new = exponentiated_gradient_step(alpha, excess, self.eta, self.smoothing,
                                          self.blend.stage_bounds_at(P))
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor(new, dtype=torch.float64, device=self.device)
            dist.broadcast(t, src=0)   # one set of weights on every rank, whatever the rounding
            new = t.cpu().numpy()
        self.blend.apply_weights(P, new)
        self.blend.mixing_state["updates"] = int(self.blend.mixing_state.get("updates", 0)) + 1
        record = {"type": "mixing", "step": int(iteration), "from_sample": int(P)}
        for j, name in enumerate(self.names):
            record[f"data_weight/{name}"] = float(new[j])
            record[f"excess_loss/{name}"] = float(excess[j])
        self.logger.log_event(record, "mixing")
        if self.rank == 0:
            print(f"[mixing] step {iteration}: weights from sample {P}: " + ", ".join(
                f"{n}={w:.4f}" for n, w in zip(self.names, new)), flush=True)


__all__ = ["DataMixing"]
