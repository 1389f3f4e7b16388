"""Wiring of the optional step companions into the training loop: the loss-spike guard
(:mod:`megatron_lite.training.callbacks.spike_guard`) and the gradient noise scale
(:mod:`megatron_lite.training.callbacks.noise_scale`) — flag checks, construction and state restore, the
state saved in ``TrainState.extras``, their log scalars, and what happens after a flagged step
(capture, skip or rollback). Kept out of ``pretrain.py`` so the loop stays short.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_lite.training.callbacks.spike_guard import SpikeGuard, check_config

def check_extras_config(cfg) -> None:
    """Validate the spike-guard and noise-scale flags (before any process-group work)."""
    from megatron_lite.training.callbacks import noise_scale

    check_config(cfg)
    noise_scale.check_config(cfg)


def setup_extras(cfg, optimizer, engine, extras: Optional[dict], resumed: bool,
                 out_dir: Optional[str]):
    """Build the guard and the noise-scale estimator when their flags ask for them.

    Installs the guard's grad-norm gate on ``optimizer`` and restores both states from
    ``extras`` (``TrainState.extras`` of the resumed checkpoint; a resumed checkpoint without
    them, e.g. saved with the guard off: printed, the window warms up again).

    Returns:
        ``(SpikeGuard | None, NoiseScaleEstimator | None)``.
    """
    from megatron_lite.training.callbacks.noise_scale import NoiseScaleEstimator

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
        if not sd and (dist.get_rank() if dist.is_initialized() else 0) == 0:
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


def step_scalars(guard, noise) -> dict:
    """Extra scalars for the step's log record (spike counters, latest noise-scale values)."""
    out = {}
    if guard is not None:
        out.update({"spikes": guard.spikes, "spike_rollbacks": guard.rollbacks})
    if noise is not None:
        out.update({k: v for k, v in noise.last.items() if k != "noise_scale/step"})
    return out


def handle_spike(cfg, res, state, engine, scheduler, guard,
                 step_batch: Optional[int] = None) -> Optional[str]:
    """After a flagged step (``res.spike``): pick the action, write the capture, roll back.

    Call after ``state.consumed_samples`` counts the spike's batch (``step_batch`` samples;
    default the global batch size). Collective.

    Returns:
        The action taken ("skip" or "rollback"), None when the step was no spike.
    """
    if guard is None or res.spike is None:
        return None
    import copy
    import dataclasses

    from megatron_lite.checkpoint import engine_state as checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    ok = torch.tensor([1.0 if rank == 0 and guard.can_rollback(cfg.checkpoint.save) else 0.0])
    if dist.is_initialized():
        dist.broadcast(ok, src=0)  # one filesystem view decides for everyone
    action = "rollback" if ok.item() > 0 else "skip"
    gb = int(step_batch or cfg.derived.global_batch_size)
    info = dict(res.spike, loss=res.loss, grad_norm=res.grad_norm, policy=guard.policy,
                action=action, threshold_sigma=guard.threshold,
                window=guard.loss_window.size,
                batch_samples=[state.consumed_samples - gb, state.consumed_samples])
    if action == "rollback":
        spike_end = state.consumed_samples
        c = copy.copy(cfg)
        c.checkpoint = dataclasses.replace(cfg.checkpoint, load=cfg.checkpoint.save,
                                           finetune=False, no_load_optim=False,
                                           no_load_rng=False)
        path = checkpointing.load_checkpoint(engine, c, state, scheduler)
        info.update(rollback_to=path, rollback_iteration=state.iteration,
                    skipped_samples=[state.consumed_samples, spike_end])
        state.consumed_samples = spike_end  # never read the window again
        guard.note_rollback()
    step = int(res.spike["step"])
    written = guard.capture(step, info, res.spike_samples or [])
    if rank == 0:
        msg = (f"[spike] step {step}: {info['criterion']} {info['value']:.6g} > window mean "
               f"{info['window_mean']:.6g} + {guard.threshold:g} x std {info['window_std']:.6g}"
               f"; {action}")
        if action == "rollback":
            msg += (f" to {info['rollback_to']} (iteration {info['rollback_iteration']}); samples "
                    f"[{info['skipped_samples'][0]}, {info['skipped_samples'][1]}) skipped")
        print(msg + (f"; batch written to {written}" if written else ""), flush=True)
    return action

