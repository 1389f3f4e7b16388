"""Loss-spike guard: rolling-window outlier test on loss and grad norm, bad-batch capture, rollback.

Criterion. The guard keeps the last ``--spike-window`` values of two all-reduced quantities of
*accepted* steps (applied, not flagged): the global token-mean loss and the pre-clip global grad
norm. With the window full (before that: warm-up, nothing flagged) a step is a spike when

    x > mean(window) + --spike-threshold * max(std(window), 0.01 * |mean(window)|)

for the loss or for the grad norm (one-sided; sample std, ddof=1): the OLMo-core rule (6 sigma by
default) with a floor of 1 % of the mean on the spread, so a window of nearly equal values does
not flag ordinary jitter. Non-finite values are left to the trainer's NaN path.

When each criterion is decided (before the update):

* loss: after the last backward, from the loss all-reduced over DP (TP ranks hold it already); a
  spike calls the optimizer's ``begin_step(force_skip=True)``, the NaN-skip path;
* grad norm: inside ``engine.step``, right before our optimizer's update (:meth:`SpikeGuard.
  install_gate` wraps its ``step``). DeepSpeed's ZeRO 1-3 and fp16/bf16 wrappers set the global
  (DP- and TP-reduced) pre-clip ``_global_grad_norm`` before calling it; at fp32 ZeRO-0 (no
  wrapper) the gate computes the same TP-aware norm of the DP-averaged ``p.grad``
  (:func:`megatron_lite.training.optimizer.tp_aware_grad_norm`). A flagged norm returns without
  updating, like a NaN skip. Without a norm (DeepSpeed told not to compute one) this criterion is
  off.

Both inputs are identical on every rank and the window arithmetic is plain Python floats, so every
TP and DP rank takes the same decision without a further collective.

Policies (``--spike-policy``):

* ``skip``: the update is not applied (parameters, optimizer state and LR schedule untouched); the
  step counts as skipped, like a NaN step; its data stays consumed.
* ``rollback``: the update is not applied; the loop reloads the newest checkpoint in ``--save``
  (``checkpointing.load_checkpoint``: model, optimizer, LR schedule, counters, RNG) but keeps
  ``consumed_samples`` at its value after the spike's batch. Skipped for good: the global samples
  ``[consumed_samples of the checkpoint, consumed_samples after the spike step)``, every batch read
  since the checkpoint including the bad one. ``--spike-lr-factor F --spike-lr-steps N`` multiply
  the LR by F for the next N steps. The loop's usual save then rewrites the reloaded step's
  checkpoint when it is a save step (same weights, new data position). With no checkpoint yet, or
  after ``--spike-max-rollbacks`` rollbacks, the step is skipped instead.

Capture. Every spike writes ``<save or run dir>/spikes/step_<n>.jsonl`` (``step_<n>.<k>.jsonl``
when a rollback made step n occur again): a ``type: spike`` header (criterion, value, window
mean/std, action, sample range) and one ``type: sample`` record per sample of the global batch
(``sample_id``/``dataset_id`` from the batch, per-sample token-mean loss, loss tokens, DP rank,
micro-batch); the ``--spike-capture-samples`` highest-loss samples also carry token ids and decoded
text (tokenizer of the data config). Written by rank 0, atomically.

State (windows, counters, LR-factor steps left, and the noise-scale EMAs) goes into the
checkpoint's ``trainer_state.json`` (``TrainState.extras``, written with the counters in the same
atomic save) and is restored on resume.

Hooks. :class:`SpikeGuard` is a :class:`~megatron_lite.training.callbacks.base.Callback`: in the
step it scales the LR (``on_lr``), keeps the per-sample sums (``on_micro_batch_loss``), decides the
loss criterion (``on_before_optimizer_step``) and reads the gate's verdict (``on_optimizer_step_end``);
after the step is logged (``on_step_end``) it captures the batch and rolls back. Tests inject a bad
batch with ``MEGATRON_LITE_INJECT_SPIKE`` (:mod:`megatron_lite.testing.faults`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_lite.checkpoint import engine_state
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.parallel import (get_context_parallel_rank, get_data_parallel_rank,
                                    get_tensor_model_parallel_rank)
from megatron_lite.training.callbacks.base import Callback
from megatron_lite.training.optimizer import tp_aware_grad_norm
from megatron_lite.utils import atomic_write_text, get_rank

MIN_REL_STD = 0.01  # floor of the window's spread, relative to its mean (see the module doc)


def rollback_headroom_samples(cfg) -> int:
    """Extra train samples to build so rollbacks never run out of data.

    A rollback skips at most the samples read since the newest checkpoint, i.e. at most
    ``save_interval`` global batches, and at most ``--spike-max-rollbacks`` happen.

    Returns:
        ``spike_max_rollbacks * save_interval * global_batch_size`` (samples) under the rollback
        policy, else 0.
    """
    t = cfg.training
    if not (t.spike_detection and t.spike_policy == "rollback"):
        return 0
    return int(t.spike_max_rollbacks) * int(cfg.checkpoint.save_interval or 0) * \
        int(cfg.derived.global_batch_size)


class RollingWindow:
    """The last ``size`` accepted values of one quantity, with mean and sample std."""

    def __init__(self, size: int):
        self.size = int(size)
        self.values: collections.deque = collections.deque(maxlen=self.size)

    def full(self) -> bool:
        """Whether the warm-up is over (``size`` values seen)."""
        return len(self.values) == self.size

    def stats(self) -> tuple[float, float]:
        """(mean, sample standard deviation with ddof=1) of the window."""
        n = len(self.values)
        mean = math.fsum(self.values) / n
        var = math.fsum((v - mean) ** 2 for v in self.values) / (n - 1)
        return mean, math.sqrt(var)

    def is_outlier(self, x: float, sigmas: float) -> tuple[bool, float, float]:
        """Whether ``x > mean + sigmas * max(std, MIN_REL_STD * |mean|)`` (False while warming
        up or for non-finite x). Returns ``(flag, mean, std)`` (std before the floor)."""
        if not self.full() or x is None or not math.isfinite(x):
            return False, float("nan"), float("nan")
        mean, std = self.stats()
        return x > mean + sigmas * max(std, MIN_REL_STD * abs(mean)), mean, std

    def push(self, x: Optional[float]) -> None:
        """Add an accepted step's value (ignored when unknown or non-finite)."""
        if x is not None and math.isfinite(x):
            self.values.append(float(x))


class SpikeGuard(Callback):
    """Per-run spike-guard state and decisions (one object on every rank, same state everywhere).

    Args:
        cfg: finalized RunConfig (``training.spike_*`` flags, data tokenizer for decoding).
        out_dir: folder under which ``spikes/`` is written (``--save`` or the run folder); None
            writes nothing.
    """

    def __init__(self, cfg, out_dir: Optional[str]):
        t = cfg.training
        self.threshold = float(t.spike_threshold)
        self.policy = t.spike_policy
        self.lr_factor, self.lr_steps = float(t.spike_lr_factor), int(t.spike_lr_steps)
        self.max_rollbacks = int(t.spike_max_rollbacks)
        self.capture_k = int(t.spike_capture_samples)
        self.loss_window = RollingWindow(t.spike_window)
        self.norm_window = RollingWindow(t.spike_window)
        self.out_dir = out_dir
        self.data_cfg = cfg.data
        self.spikes = 0
        self.rollbacks = 0
        self.lr_steps_left = 0
        self._tokenizer = None
        # Per-step gate state (see install_gate), the loss criterion's verdict and the step's
        # per-sample records (kept only until the step's end).
        self._armed = False
        self.gate_fired: Optional[dict] = None
        self._loss_spike: Optional[dict] = None
        self._per_sample: list = []

    # ---- decisions -------------------------------------------------------------------------
    def lr_multiplier(self) -> float:
        """LR factor for the coming step (``--spike-lr-factor`` while steps are left)."""
        return self.lr_factor if self.lr_steps_left > 0 else 1.0

    def check_loss(self, loss: float) -> Optional[dict]:
        """Loss criterion, before the update. Returns the spike description or None."""
        hit, mean, std = self.loss_window.is_outlier(loss, self.threshold)
        return {"criterion": "loss", "value": loss, "window_mean": mean, "window_std": std} \
            if hit else None

    def arm(self) -> None:
        """Enable the grad-norm check for the coming engine step."""
        self._armed, self.gate_fired = True, None

    def disarm(self) -> None:
        """No grad-norm check this step (already decided, e.g. a loss spike)."""
        self._armed, self.gate_fired = False, None

    def install_gate(self, optimizer, engine) -> None:
        """Wrap ``optimizer.step`` so an armed guard judges the pre-clip grad norm first.

        DeepSpeed calls our optimizer's ``step`` (on each rank, per param group under ZeRO)
        after computing the global norm; the first call of a step reads the norm, later calls
        reuse the verdict. A flagged step returns without touching parameters or state and sets
        ``optimizer.skipped`` (what the trainer reads after a NaN skip too).
        """
        original = optimizer.step
        guard = self

        def read_norm() -> Optional[float]:
            wrapper = getattr(engine, "optimizer", None)
            if wrapper is not None and wrapper is not optimizer:
                norm = getattr(wrapper, "_global_grad_norm", None)
            else:  # fp32 ZeRO-0: p.grad holds the DP-averaged gradient now
                norm = tp_aware_grad_norm(p for g in optimizer.param_groups for p in g["params"])
            if torch.is_tensor(norm):
                norm = float(norm.item())
            return None if norm is None else float(norm)

        def gated_step(*args, **kwargs):
            if guard._armed:
                guard._armed = False
                norm = read_norm()
                hit, mean, std = guard.norm_window.is_outlier(norm, guard.threshold)
                if hit:
                    guard.gate_fired = {"criterion": "grad_norm", "value": norm,
                                        "window_mean": mean, "window_std": std}
            if guard.gate_fired is not None:
                optimizer.skipped = True
                return None
            return original(*args, **kwargs)

        optimizer.step = gated_step

    def accept(self, loss: float, grad_norm: Optional[float]) -> None:
        """Record an applied, unflagged step in both windows; count down the LR factor."""
        self.loss_window.push(loss)
        self.norm_window.push(grad_norm)
        if self.lr_steps_left > 0:
            self.lr_steps_left -= 1

    def can_rollback(self, save_dir: Optional[str]) -> bool:
        """Whether the rollback policy applies now (a checkpoint exists, budget left)."""
        return (self.policy == "rollback" and self.rollbacks < self.max_rollbacks
                and save_dir is not None and engine_state.find_checkpoint(save_dir) is not None)

    def note_rollback(self) -> None:
        """Count a rollback and start the LR-factor period."""
        self.rollbacks += 1
        self.lr_steps_left = self.lr_steps

    # ---- step hooks (train_step) -------------------------------------------------------------
    def on_lr(self, step: int, optimizer, lr: float) -> float:
        """``--spike-lr-factor`` after a rollback, on top of the schedule's LR."""
        mult = self.lr_multiplier()
        if mult != 1.0:
            for g in optimizer.param_groups:
                g["lr"] *= mult
            lr *= mult
        return lr

    def wants_per_sample(self, step: int) -> bool:
        """Always: a spike's capture names every sample of the batch."""
        return True

    def on_micro_batch_loss(self, step: int, j: int, batch: dict, loss_sum, per_sample):
        """Keep the micro-batch's per-sample sums for a capture (records built only on a spike)."""
        self._per_sample.append((batch, per_sample))
        return loss_sum, per_sample

    def on_before_optimizer_step(self, step: int, loss: float, skip: bool) -> bool:
        """Loss criterion; arms the grad-norm gate when the step would otherwise be applied."""
        self._loss_spike = None if skip else self.check_loss(loss)
        if skip or self._loss_spike is not None:
            self.disarm()
        else:
            self.arm()  # the grad-norm criterion runs inside engine.step
        return self._loss_spike is not None

    def on_optimizer_step_end(self, step: int, result) -> None:
        """A flagged step is skipped (``result.spike``, ``result.spike_samples``); an applied,
        unflagged one enters the windows."""
        spike, kept = self._loss_spike or self.gate_fired, self._per_sample
        self.disarm()
        self._loss_spike, self._per_sample = None, []
        if spike is None:
            if not result.skipped:
                self.accept(result.loss, result.grad_norm)
            return
        result.skipped = True
        if spike["criterion"] == "grad_norm":
            result.grad_norm = spike["value"]  # the gate's reading (our optimizer never ran its own)
        self.spikes += 1
        result.spike = dict(spike, step=step)
        result.spike_samples = [r for j, (b, (ps, pt)) in enumerate(kept)
                                for r in per_sample_records(b, ps, pt, j)]

    # ---- loop hooks (Trainer) ----------------------------------------------------------------
    def log_scalars(self) -> dict:
        """``spikes`` and ``spike_rollbacks`` of the step's log record."""
        return {"spikes": self.spikes, "spike_rollbacks": self.rollbacks}

    def on_step_end(self, trainer, step: int, result) -> None:
        """After a flagged step: capture the batch and skip or roll back (collective)."""
        if result.spike is not None:
            handle_spike(trainer.cfg, result, trainer.state, trainer.engine, trainer.scheduler,
                         self, trainer.step_batch)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state (windows, counters)."""
        return {"loss_window": list(self.loss_window.values),
                "norm_window": list(self.norm_window.values), "spikes": self.spikes,
                "rollbacks": self.rollbacks, "lr_steps_left": self.lr_steps_left}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (a different window size keeps the newest values)."""
        self.loss_window.values.extend(sd.get("loss_window", []))
        self.norm_window.values.extend(sd.get("norm_window", []))
        self.spikes = int(sd.get("spikes", 0))
        self.rollbacks = int(sd.get("rollbacks", 0))
        self.lr_steps_left = int(sd.get("lr_steps_left", 0))

    # ---- capture ---------------------------------------------------------------------------
    def capture(self, step: int, info: dict, samples: list[dict]) -> Optional[str]:
        """Gather this step's per-sample records from all ranks and write the capture file.

        Collective over the world group (every rank calls it; the decision is global).

        Args:
            step: the spike's step number.
            info: header fields (criterion, value, window stats, loss, grad norm, action).
            samples: this rank's records: ``sample_id``, ``dataset_id``, ``loss_sum``,
                ``loss_tokens``, ``micro_batch``, ``tokens`` (list of ints).

        Returns:
            The file written (rank 0), else None.
        """
        dp_rank = get_data_parallel_rank()
        mine = []
        # TP ranks, and the CP ranks of a replica, hold the same batch (whole-sample sums).
        if get_tensor_model_parallel_rank() == 0 and get_context_parallel_rank() == 0:
            for r in samples:
                r = dict(r, dp_rank=dp_rank)
                r["loss"] = r["loss_sum"] / r["loss_tokens"] if r["loss_tokens"] else None
                mine.append(r)
            # Only the local top-k keep their tokens: the global top-k is among them.
            ranked = sorted(mine, key=lambda r: -(r["loss"] if r["loss"] is not None and
                                                   math.isfinite(r["loss"]) else -math.inf))
            for r in ranked[self.capture_k:]:
                r.pop("tokens", None)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if (dist.get_rank() if dist.is_initialized() else 0) != 0 or self.out_dir is None:
            return None
        records = [r for part in gathered for r in part]
        records.sort(key=lambda r: (r["dp_rank"], r["micro_batch"], r.get("index", 0)))
        order = sorted(range(len(records)), key=lambda i: -(
            records[i]["loss"] if records[i]["loss"] is not None and
            math.isfinite(records[i]["loss"]) else -math.inf))
        worst = set(order[:self.capture_k])
        tok = self._get_tokenizer()
        lines = [json.dumps(dict({"type": "spike", "step": step}, **info), default=_jsonable)]
        for i, r in enumerate(records):
            rec = {"type": "sample", "sample_id": r.get("sample_id"),
                   "dataset_id": r.get("dataset_id"), "loss": r["loss"],
                   "loss_tokens": r["loss_tokens"], "dp_rank": r["dp_rank"],
                   "micro_batch": r["micro_batch"], "worst_rank": None}
            if i in worst:
                rec["worst_rank"] = order.index(i) + 1
                ids = r.get("tokens")
                rec["token_ids"] = ids
                rec["text"] = _decode(tok, ids)
            lines.append(json.dumps(rec, default=_jsonable))
        path = os.path.join(self.out_dir, "spikes", f"step_{step}.jsonl")
        k = 1
        while os.path.exists(path):  # a step number seen again after a rollback
            path = os.path.join(self.out_dir, "spikes", f"step_{step}.{k}.jsonl")
            k += 1
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    def _get_tokenizer(self):
        if self._tokenizer is None and getattr(self.data_cfg, "tokenizer_model", None):
            try:
                self._tokenizer = build_tokenizer(
                    self.data_cfg.tokenizer_type or "SentencePieceTokenizer",
                    self.data_cfg.tokenizer_model)
            except Exception as e:  # noqa: BLE001 - capture must not crash the run
                print(f"[spike] cannot load tokenizer {self.data_cfg.tokenizer_model} ({e}); "
                      f"writing token ids only", flush=True)
                self._tokenizer = False
        return self._tokenizer or None


def per_sample_records(batch: dict[str, Any], per_sample_sum: torch.Tensor,
                       per_sample_tokens: torch.Tensor, micro_batch: int) -> list[dict]:
    """This rank's capture records of one micro-batch.

    Args:
        batch: the micro-batch dict (``tokens [b, s]``, optional ``sample_ids [b]`` and
            ``dataset_ids [b]``).
        per_sample_sum: ``[b]`` sum of masked per-token losses (nats) of each sample.
        per_sample_tokens: ``[b]`` loss tokens of each sample.
        micro_batch: index of the micro-batch within this rank's step.
    """
    b = batch["tokens"].shape[0]
    sids, dids = batch.get("sample_ids"), batch.get("dataset_ids")
    sums, toks = per_sample_sum.double().cpu().tolist(), per_sample_tokens.cpu().tolist()
    tokens = batch["tokens"].cpu()
    return [{"sample_id": int(sids[i]) if sids is not None else None,
             "dataset_id": int(dids[i]) if dids is not None else None,
             "loss_sum": sums[i], "loss_tokens": int(toks[i]), "micro_batch": micro_batch,
             "index": i, "tokens": tokens[i].tolist()} for i in range(b)]


def _decode(tok, ids) -> Optional[str]:
    if tok is None or ids is None:
        return None
    try:
        return tok.detokenize([int(i) for i in ids])
    except Exception as e:  # noqa: BLE001 - an id outside the vocabulary must not crash the run
        return f"<undecodable: {e}>"


def _jsonable(x):
    if torch.is_tensor(x):
        return x.tolist()
    return str(x)


def handle_spike(cfg, res, state, engine, scheduler, guard: SpikeGuard,
                 step_batch: Optional[int] = None) -> Optional[str]:
    """After a flagged step (``res.spike``): pick the action, write the capture, roll back.

    Call after ``state.consumed_samples`` counts the spike's batch (``step_batch`` samples;
    default the global batch size). Collective.

    Returns:
        The action taken ("skip" or "rollback"), None when the step was no spike.
    """
    if guard is None or res.spike is None:
        return None
    rank = get_rank()
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
        _roll_back(cfg, state, engine, scheduler, guard, info)
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


def _roll_back(cfg, state, engine, scheduler, guard: SpikeGuard, info: dict) -> None:
    """Reload the newest checkpoint in ``--save``; keep the data position after the spike."""
    spike_end = state.consumed_samples
    c = copy.copy(cfg)
    c.checkpoint = dataclasses.replace(cfg.checkpoint, load=cfg.checkpoint.save,
                                       finetune=False, no_load_optim=False,
                                       no_load_rng=False)
    path = engine_state.load_checkpoint(engine, c, state, scheduler)
    info.update(rollback_to=path, rollback_iteration=state.iteration,
                skipped_samples=[state.consumed_samples, spike_end])
    state.consumed_samples = spike_end  # never read the window again
    guard.note_rollback()
