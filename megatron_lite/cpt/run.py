"""Train a resolved CPT config: the Trainer with the CPT model set-up (base weights, vocabulary
growth, freezing) and, for ``--load-optimizer-state``, the base's AdamW state on a fresh start."""

from __future__ import annotations

import os

from megatron_lite.cpt.resolve import detect_base


def _with_base_optimizer_state(cfg):
    """Context manager: while active, the resume step of ``pretrain`` falls back to the base's
    model + optimizer state (not its schedule, counters or RNG) when this run has no checkpoint
    of its own. ``pretrain`` offers no hook after the engine exists, so its module-level
    ``checkpointing.load_checkpoint`` is wrapped for the duration of the call."""
    import contextlib

    from megatron_lite.checkpoint import engine_state as checkpointing

    @contextlib.contextmanager
    def ctx():
        orig = checkpointing.load_checkpoint

        def load(engine, cfg_, state, scheduler):
            path = orig(engine, cfg_, state, scheduler)
            if path is not None:
                return path
            base = detect_base(cfg_.cpt.pretrained_checkpoint, cfg_.cpt.pretrained_checkpoint_format)
            parent, tag = os.path.split(os.path.abspath(base.path))
            engine.load_checkpoint(parent, tag=tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=False, load_module_only=False)
            if _rank() == 0:
                print(f"[cpt] AdamW state of the base loaded from {base.path} (--load-optimizer-"
                      "state); iteration, schedule and data position start at 0", flush=True)
            return None

        checkpointing.load_checkpoint = load
        try:
            yield
        finally:
            checkpointing.load_checkpoint = orig

    return ctx()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def resuming(cfg) -> str | None:
    """This run's own checkpoint to resume (``--load`` has a complete one, not ``--finetune``)."""
    from megatron_lite.checkpoint.engine_state import find_checkpoint

    ck = cfg.checkpoint
    if not ck.load or ck.finetune:
        return None
    return find_checkpoint(ck.load)


def run(cfg, data_iterators=None, after_setup=None):
    """Train a finalized CPT config: :func:`pretrain` with the CPT model setup.

    Args:
        cfg: from :func:`resolve_config`.
        data_iterators: as :func:`megatron_lite.training.loop.pretrain` (tests).
        after_setup: optional ``fn(model, cfg)`` called right after the CPT setup (tests use it
            to snapshot the loaded weights before any step).

    Returns:
        The final ``TrainState``.
    """
    from megatron_lite.cpt.weights import setup_model
    from megatron_lite.training.loop import pretrain

    def model_setup(model, cfg_):
        setup_model(model, cfg_, load_weights=resuming(cfg_) is None)
        if after_setup is not None:
            after_setup(model, cfg_)

    if cfg.cpt.load_optimizer_state and resuming(cfg) is None:
        with _with_base_optimizer_state(cfg):
            return pretrain(cfg, data_iterators=data_iterators, model_setup=model_setup)
    return pretrain(cfg, data_iterators=data_iterators, model_setup=model_setup)


__all__ = ["resuming", "run"]
