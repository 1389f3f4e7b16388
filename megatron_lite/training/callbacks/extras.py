"""The spike guard and the noise-scale estimator as the Trainer builds them: construction from
the flags, state restored from ``TrainState.extras`` on resume, and the state saved there.

``trainer_state.json``'s ``extras`` is ``{"spike_guard": ..., "noise_scale": ...}`` (either None
when that one is off), or null when both are off.
"""

from __future__ import annotations

from typing import Optional

from megatron_lite.training.callbacks.noise_scale import NoiseScaleEstimator
from megatron_lite.training.callbacks.spike_guard import SpikeGuard
from megatron_lite.utils import get_rank


def setup_extras(cfg, optimizer, engine, extras: Optional[dict], resumed: bool,
                 out_dir: Optional[str]):
    """Build the guard and the noise-scale estimator when their flags ask for them.

    Installs the guard's grad-norm gate on ``optimizer`` and restores both states from
    ``extras`` (``TrainState.extras`` of the resumed checkpoint; a resumed checkpoint without
    them, e.g. saved with the guard off: printed, the window warms up again).

    Returns:
        ``(SpikeGuard | None, NoiseScaleEstimator | None)``.
    """
    t = cfg.training
    guard = SpikeGuard(cfg, out_dir) if t.spike_detection else None
    noise = NoiseScaleEstimator(t.noise_scale_interval, t.noise_scale_ema) \
        if t.noise_scale_interval else None
    if guard is not None:
        guard.install_gate(optimizer, engine)
    if resumed and (guard is not None or noise is not None):
        sd = extras or {}
        if guard is not None and sd.get("spike_guard"):
            guard.load_state_dict(sd["spike_guard"])
        if noise is not None and sd.get("noise_scale"):
            noise.load_state_dict(sd["noise_scale"])
        if not sd and get_rank() == 0:
            print("[spike] the resumed checkpoint holds no spike-guard / noise-scale state: "
                  "the window and the EMAs start empty", flush=True)
    return guard, noise


def extras_state(guard, noise) -> Optional[dict]:
    """JSON-safe state of the guard and the estimator for ``TrainState.extras`` (None when
    neither is on)."""
    if guard is None and noise is None:
        return None
    return {"spike_guard": guard.state_dict() if guard is not None else None,
            "noise_scale": noise.state_dict() if noise is not None else None}


__all__ = ["extras_state", "setup_extras"]
