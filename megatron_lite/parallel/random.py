"""Tensor-parallel-aware RNG: reproducible dropout per rank (after Megatron-LM ``tensor_parallel/random.py``).

Two streams per process:
- the *default* torch generator (CPU and, if present, CUDA) seeded with ``seed`` on every rank:
  identical across the TP group, so dropout on replicated activations (hidden dropout after the
  row-parallel reduce) keeps the replicas equal, and so TP-independent weight init draws the same
  master weights everywhere;
- the *model-parallel* stream, seeded with ``seed + 2718 + tp_rank`` (Megatron's offset), entered
  with ``get_rng_tracker().fork()`` around dropout on TP-sharded activations (attention heads),
  so each shard drops different elements. With sequence parallelism the hidden dropout also runs
  on this stream (each TP rank holds a different slice of the sequence, Megatron's rule).

Activation recomputation (``torch.utils.checkpoint``) restores only the default generators before
it re-runs a block; :func:`recompute_rng_context` is the ``context_fn`` that also replays the
model-parallel stream, so a recomputed block draws the masks of its first forward.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_lite.parallel.state import get_tensor_model_parallel_rank

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718


def _get_state(device_type: str):
    return torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()


def _set_state(device_type: str, state) -> None:
    if device_type == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states that can be swapped in around a block of code.

    The states live for the device type in use (``cuda`` when available, else ``cpu``); ``fork``
    saves the current default state, installs the named one, runs the block, stores the advanced
    named state and restores the default state, so code outside the block sees an unchanged stream.
    """

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"

    def reset(self) -> None:
        """Drop all named states."""
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        """Create state ``name`` seeded with ``seed``.

        Raises:
            ValueError: ``name`` already exists.
        """
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_state(self.device_type)
        if self.device_type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _get_state(self.device_type)
        _set_state(self.device_type, saved)

    def get_states(self) -> dict:
        """Copy of the named states (for checkpoints)."""
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict) -> None:
        """Restore states saved by :meth:`get_states`."""
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block on the named RNG stream.

        Raises:
            KeyError: the state was never added (call :func:`model_parallel_manual_seed`).
        """
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} not set; call model_parallel_manual_seed(seed) first")
        saved = _get_state(self.device_type)
        _set_state(self.device_type, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device_type)
            _set_state(self.device_type, saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker."""
    return _TRACKER


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default stream with ``seed`` (same on all TP ranks) and the model-parallel stream
    with ``seed + 2718 + tp_rank``. Call after :func:`initialize_model_parallel` and before
    building the model."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + get_tensor_model_parallel_rank())


def model_parallel_rng_ready() -> bool:
    """True when the model-parallel stream has been seeded."""
    return MODEL_PARALLEL_RNG in _TRACKER.states


def recompute_rng_context():
    """``context_fn`` for ``torch.utils.checkpoint(..., use_reentrant=False)``.

    Called when the checkpointed block first runs; it snapshots the tracker's named states. The
    returned recompute context installs that snapshot while the block is re-run in backward and
    puts the states of that moment back afterwards, so dropout forked from the model-parallel
    stream (sequence-parallel hidden dropout) draws the same masks in the recomputation as in the
    forward (Megatron's ``CheckpointFunction`` does the same with ``get_states``/``set_states``).

    Returns:
        (forward context, recompute context).
    """
    snapshot = _TRACKER.get_states()

    @contextlib.contextmanager
    def replay():
        current = _TRACKER.get_states()
        _TRACKER.set_states(snapshot)
        try:
            yield
        finally:
            _TRACKER.set_states(current)

    return contextlib.nullcontext(), replay()
