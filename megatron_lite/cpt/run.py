"""Train a resolved CPT config: the Trainer with the CPT model set-up (base weights, vocabulary
growth, freezing) and, for ``--load-optimizer-state``, the base's AdamW state on a fresh start
(``pretrain``'s ``resume_fallback``)."""

from __future__ import annotations

import os
from typing import Iterable

from megatron_lite.checkpoint.layout import find_checkpoint
from megatron_lite.checkpoint.base_checkpoint import detect_base
from megatron_lite.cpt.model_setup import setup_model
from megatron_lite.training.loop import pretrain
from megatron_lite.utils import get_rank


def load_base_optimizer_state(engine, cfg) -> None:
    """``resume_fallback`` of a CPT run with ``--load-optimizer-state``: the base's model +
    optimizer state (not its schedule, counters or RNG), when this run has no checkpoint of its
    own."""
    base = detect_base(cfg.cpt.pretrained_checkpoint, cfg.cpt.pretrained_checkpoint_format)
    parent, tag = os.path.split(os.path.abspath(base.path))
    engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True,
                           load_lr_scheduler_states=False, load_module_only=False)
    if get_rank() == 0:
        print(f"[cpt] AdamW state of the base loaded from {base.path} (--load-optimizer-"
              "state); iteration, schedule and data position start at 0", flush=True)


def resuming(cfg) -> str | None:
    """This run's own checkpoint to resume (``--load`` has a complete one, not ``--finetune``)."""
    ck = cfg.checkpoint
    if not ck.load or ck.finetune:
        return None
    return find_checkpoint(ck.load)


def run(cfg, data_iterators=None, after_setup=None, callbacks: Iterable = ()):
    """Train a finalized CPT config: :func:`pretrain` with the CPT model setup.

    Args:
        cfg: from :func:`megatron_lite.cpt.resolve.resolve_config`.
        data_iterators: as :func:`megatron_lite.training.loop.pretrain` (tests).
        after_setup: optional ``fn(model, cfg)`` called right after the CPT setup (tests use it
            to snapshot the loaded weights before any step).
        callbacks: Trainer callbacks, as :func:`pretrain` (test fault injection).

    Returns:
        The final ``TrainState``.
    """
    def model_setup(model, cfg_):
        setup_model(model, cfg_, load_weights=resuming(cfg_) is None)
        if after_setup is not None:
            after_setup(model, cfg_)

    fallback = load_base_optimizer_state if (cfg.cpt.load_optimizer_state
                                             and resuming(cfg) is None) else None
    return pretrain(cfg, data_iterators=data_iterators, model_setup=model_setup,
                    resume_fallback=fallback, callbacks=callbacks)


__all__ = ["load_base_optimizer_state", "resuming", "run"]
