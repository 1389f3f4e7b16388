"""LightningModule over our LlamaModel, loss, AdamW param groups and LR schedule.

Objective. ``training_step`` returns the token mean of one micro-batch,
``sum_t m_t * l_t / sum_t m_t`` (``m`` = ``loss_mask``, ``l`` = our vocab-parallel per-token
cross entropy); Lightning divides it by the accumulation count A and DDP/DeepSpeed average over
the D ranks. That equals our trainer's global token mean (megatron_lite/training/step.py) when
every micro-batch holds the same number of loss tokens, which is the case for packed samples
unless ``--eod-mask-loss`` masks end-of-document tokens; with masking the two weigh micro-batches
slightly differently. The logged ``loss`` is always the global token mean of the step (sums and
token counts all-reduced over the ranks), the number ``pretrain_llama.py`` prints.

Parallelism. TP = 1: Lightning's strategies know data parallelism only (DDP would average TP
shards' gradients over the TP ranks, and its grad clipping would count each shard as the whole
norm). The process group Lightning creates is given to our ``initialize_model_parallel(1)`` so
the DP rank/size our sampler and model read agree with Lightning's.
"""

from __future__ import annotations

import json
import math
import os
import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.training.optimizer import GuardedAdamW, param_groups
from megatron_lite.training.schedules import lr_at


class MegatronLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """:func:`megatron_lite.training.schedules.lr_at` as a torch LR scheduler stepped per update.

    ``last_epoch`` counts applied optimizer updates (0 before the first), so the update with index
    u runs at ``lr_at(u) * lr_mult`` exactly as our ``LRScheduler.apply``; a step the guarded
    optimizer skipped (non-finite gradients) does not advance the schedule, as in our trainer.
    Resumable through ``state_dict`` (torch's, which holds ``last_epoch``).

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is set (``lr_mult`` honoured).
        max_lr, min_lr, warmup_iters, decay_iters, decay_style, warmup_init, wsd_decay_iters,
        wsd_decay_style: as :func:`~megatron_lite.training.schedules.lr_at`.

    Raises:
        ValueError: an inconsistent schedule (checked at construction).
    """

    def __init__(self, optimizer, *, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int, decay_style: str, warmup_init: float = 0.0,
                 wsd_decay_iters: int = 0, wsd_decay_style: str = "linear"):
        self.schedule = dict(max_lr=float(max_lr), min_lr=float(min_lr),
                             warmup_iters=int(warmup_iters), decay_iters=int(decay_iters),
                             decay_style=decay_style, warmup_init=float(warmup_init),
                             wsd_decay_iters=int(wsd_decay_iters),
                             wsd_decay_style=wsd_decay_style)
        lr_at(0, **self.schedule)  # validate before training starts
        super().__init__(optimizer)

    @classmethod
    def from_config(cls, optimizer, cfg) -> "MegatronLRScheduler":
        """Build from a finalized RunConfig (same fields as ``LRScheduler.from_config``)."""
        d, s, o = cfg.derived, cfg.schedule, cfg.optimizer
        return cls(optimizer, max_lr=o.lr, min_lr=o.min_lr, warmup_iters=d.lr_warmup_iters,
                   decay_iters=d.lr_decay_iters, decay_style=s.lr_decay_style,
                   warmup_init=s.lr_warmup_init, wsd_decay_iters=d.lr_wsd_decay_iters,
                   wsd_decay_style=s.lr_wsd_decay_style)

    def get_lr(self) -> list[float]:
        """LR of every param group for update index ``last_epoch``."""
        lr = lr_at(max(self.last_epoch, 0), **self.schedule)
        return [lr * g.get("lr_mult", 1.0) for g in self.optimizer.param_groups]

    def step(self, epoch=None):  # noqa: D102 - torch's signature
        if getattr(self.optimizer, "skipped", False):
            return  # the update was not applied: the next one keeps this LR
        super().step()


class LightningGuardedAdamW(GuardedAdamW):
    """Our :class:`GuardedAdamW` driven the Lightning way: ``step(closure)``.

    Lightning (automatic optimisation) runs forward, backward and gradient clipping inside the
    closure it passes to ``step``; the non-finite check must see those gradients, so the closure
    runs first and the all-rank check is made fresh for every step. Under DeepSpeed the engine
    calls ``step()`` without a closure (after the backward), which takes the same path.
    """

    @torch.no_grad()
    def step(self, closure=None):
        """Run ``closure`` (with grad enabled), then the guarded AdamW update; returns its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.begin_step()
        super().step()
        return loss


class MegatronLlamaModule(L.LightningModule):
    """Our LLaMA model, loss, optimizer and schedule as a LightningModule (TP = 1).

    The model is built in :meth:`configure_model` (after Lightning has set up the process group
    and, for DeepSpeed ZeRO-3, inside ``deepspeed.zero.Init``), seeded exactly as
    ``pretrain_llama.py`` does (python, numpy, torch and our TP RNG tracker from
    ``--seed``), so both start from the same weights.

    Args:
        cfg: finalized :class:`~megatron_lite.config.RunConfig` (TP must be 1).

    Attributes:
        history: one dict per optimizer step on every rank: ``step``, ``loss`` (global token
            mean, nats), ``loss_tokens``, ``lr``, ``grad_norm`` (before clipping; None under
            DeepSpeed, whose gradients are partitioned), ``consumed_samples``.

    Raises:
        ValueError: TP > 1.
    """

    def __init__(self, cfg):
        super().__init__()
        if cfg.parallel.tensor_model_parallel_size != 1:
            raise ValueError("MegatronLlamaModule needs --tensor-model-parallel-size 1 (Lightning "
                             "strategies are data-parallel only); use pretrain_llama.py for TP")
        self.cfg = cfg
        self.save_hyperparameters({"megatron_lite_config": cfg.to_dict()})
        self.model = None
        self.history: list[dict] = []
        self._sum = 0.0
        self._tokens = 0.0

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Set up our DP/TP groups on Lightning's process group, seed, build the model."""
        if self.model is not None:
            return
        from megatron_lite.model.llama import LlamaModel
        from megatron_lite.parallel import (destroy_model_parallel, initialize_model_parallel,
                                            model_parallel_is_initialized,
                                            model_parallel_manual_seed)

        if dist.is_available() and dist.is_initialized():
            if model_parallel_is_initialized():
                destroy_model_parallel()
            initialize_model_parallel(1)
        seed = self.cfg.training.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_manual_seed(seed)
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        self.model = LlamaModel(self.cfg.model, device=device)

    def on_fit_start(self) -> None:
        """A fresh run (step 0) starts a new metrics file; a resumed one appends to it."""
        mf = self.cfg.logging.metrics_file
        if mf and self.trainer.global_rank == 0 and self.trainer.global_step == 0 \
                and os.path.exists(mf):
            os.replace(mf, mf + ".old")

    def forward(self, tokens, **kw):
        """Our ``LlamaModel.forward`` (logits ``[b, s, V_pad]`` or per-token loss ``[b, s]``)."""
        return self.model(tokens, **kw)

    def _loss_sum(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        per_token = self.model(batch["tokens"], position_ids=batch.get("position_ids"),
                               cu_seqlens=batch.get("cu_seqlens"),
                               max_seqlen=batch.get("max_seqlen"), labels=batch["labels"])
        mask = batch["loss_mask"].float()
        return (per_token.float() * mask).sum(), mask.sum()

    def training_step(self, batch, batch_idx):
        """Token-mean loss of one micro-batch ``[b, s]`` (fp32 scalar, nats).

        Raises:
            RuntimeError: a micro-batch without loss tokens.
        """
        s, n = self._loss_sum(batch)
        if float(n) == 0:
            raise RuntimeError(f"micro-batch {batch_idx} has no loss tokens (loss_mask all zero); "
                               "check --eod-mask-loss and the data")
        self._sum += float(s.detach())
        self._tokens += float(n)
        return s / n

    def validation_step(self, batch, batch_idx):
        """Token-mean validation loss; logged as ``val_loss`` (and ``val_ppl``) over all ranks."""
        s, n = self._loss_sum(batch)
        t = torch.stack([s.detach().double(), n.double()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        loss = float(t[0] / t[1])
        self.log("val_loss", loss, batch_size=batch["tokens"].shape[0], rank_zero_only=True)
        self.log("val_ppl", math.exp(min(loss, 50.0)), batch_size=batch["tokens"].shape[0],
                 rank_zero_only=True)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        """Our AdamW param groups (decay for matrices only) and the per-update LR schedule."""
        o = self.cfg.optimizer
        fused = not self.cfg.parallel.offload_optimizer   # as build_optimizer (CPU too)
        opt = LightningGuardedAdamW(param_groups(self.model, o.weight_decay,
                                                 o.no_decay_embeddings),
                                    lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                    weight_decay=o.weight_decay, fused=fused or None)
        sched = MegatronLRScheduler.from_config(opt, self.cfg)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Record the step's global loss (sums over micro-batches and ranks), LR and grad norm."""
        t = torch.tensor([self._sum, self._tokens], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        self._sum = self._tokens = 0.0
        loss = float(t[0] / t[1]) if t[1] > 0 else float("nan")
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = None
        if grads:  # DDP gradients are already averaged: the full gradient's norm
            norm = float(torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().sqrt())
        step = self.trainer.global_step + 1
        rec = {"step": step, "loss": loss, "loss_tokens": int(t[1]),
               "lr": optimizer.param_groups[0]["lr"], "grad_norm": norm,
               "consumed_samples": step * self.cfg.derived.global_batch_size}
        self.history.append(rec)
        self.log("loss", loss, rank_zero_only=True, prog_bar=True)
        self.log("lr", rec["lr"], rank_zero_only=True)
        if norm is not None:
            self.log("grad_norm", norm, rank_zero_only=True)
        mf = self.cfg.logging.metrics_file
        every = int(self.cfg.logging.log_interval or 1)
        last = step >= self.cfg.derived.train_iters
        if mf and self.trainer.global_rank == 0 and (step % every == 0 or last):
            # one JSON object per step, the fields pretrain_llama.py's metrics.jsonl uses
            os.makedirs(os.path.dirname(os.path.abspath(mf)), exist_ok=True)
            with open(mf, "a") as f:
                f.write(json.dumps({"type": "train", **rec}) + "\n")
