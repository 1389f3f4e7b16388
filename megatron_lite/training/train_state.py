"""The Trainer's counters (:class:`TrainState`, saved in checkpoints) and one step's outcome
(:class:`StepResult`)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class TrainState:
    """Counters saved in checkpoints.

    Attributes:
        iteration: steps finished (applied or skipped).
        consumed_samples: training samples read so far (all DP ranks).
        skipped_steps: total skipped steps.
        consecutive_skipped: skipped steps since the last applied one.
        data_state: the blended train dataset's resume state (per-source consumed counts, see
            ``BlendedDataset.state_dict``); None for a single corpus.
        extras: JSON-safe state of the optional step callbacks (spike-guard windows, noise-scale
            EMAs: :func:`megatron_lite.training.callbacks.extras.extras_state`), saved in
            trainer_state.json with the counters so one atomic checkpoint holds everything a
            resume needs; None when none is on.
    """

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    data_state: Optional[dict] = None
    extras: Optional[dict] = None


@dataclasses.dataclass
class StepResult:
    """Outcome of one step: ``loss`` (token mean over the global batch, nats), ``loss_tokens``
    (N), ``lr`` used, ``grad_norm`` (None if unknown), ``skipped``, ``loss_scale``.

    Filled in by callbacks when they are on: ``spike`` and ``spike_samples`` (the spike guard: the
    flagged criterion with its window stats, and this rank's per-sample records), ``noise`` (the
    noise-scale scalars of a measurement step).
    """

    loss: float
    loss_tokens: int
    lr: float
    grad_norm: float | None
    skipped: bool
    loss_scale: float | None
    spike: Optional[dict] = None
    spike_samples: Optional[list] = None
    noise: Optional[dict] = None


__all__ = ["StepResult", "TrainState"]
