"""PyTorch Lightning shim: our model, loss, optimizer/schedule and data under ``lightning.Trainer``.

    run = load_lightning_config("configs/lightning/tiny_cpu.yaml")     # recipe-style YAML
    trainer = build_trainer(run)                                         # lightning.Trainer
    trainer.fit(MegatronLlamaModule(run.cfg), datamodule=MegatronDataModule(run.cfg))

or ``python -m megatron_lite.integrations.lightning --config FILE [pretrain flags]``. TP = 1 only
(Lightning's strategies are data-parallel; see module.py). DeepSpeed: ``strategy:
deepspeed_stage_{1,2,3}`` (or ``deepspeed`` with ``deepspeed_config: FILE``) on CUDA; Lightning
2.6's ``DeepSpeedStrategy`` refuses a CPU accelerator, so CPU runs use ``ddp``.

Needs the ``lightning`` package (``pip install -r requirements.txt``); importing this package
without it raises ImportError with that hint.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from megatron_lite.utils import use_project_venv

if sys.argv[:1] == ["-m"]:  # `python -m megatron_lite.integrations.lightning` in a fresh shell
    use_project_venv(module=__name__)

try:
    import lightning  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only where lightning is missing
    raise ImportError("megatron_lite.integrations.lightning needs PyTorch Lightning: "
                      "pip install 'lightning>=2.4' (it is in requirements.txt)") from e

from megatron_lite.integrations.lightning.datamodule import MegatronDataModule
from megatron_lite.integrations.lightning.module import (LightningGuardedAdamW,
                                                         MegatronLlamaModule, MegatronLRScheduler)
from megatron_lite.integrations.lightning.recipe_yaml import LightningRun, load_lightning_config

_DS_STAGES = {"deepspeed": None, "deepspeed_stage_1": 1, "deepspeed_stage_2": 2,
              "deepspeed_stage_2_offload": 2, "deepspeed_stage_3": 3,
              "deepspeed_stage_3_offload": 3}


def _instantiate(spec: Any, what: str) -> Any:
    """``{"class_path": "pkg.Class", "init_args": {...}}`` (or the args beside class_path)."""
    if not isinstance(spec, dict):
        return spec
    if "class_path" not in spec:
        raise ValueError(f"trainer.{what}: entries need class_path (got keys {sorted(spec)})")
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = dict(spec.get("init_args") or {k: v for k, v in spec.items() if k != "class_path"})
    return cls(**kwargs)


def deepspeed_config_for_lightning(cfg) -> dict:
    """Our DeepSpeed config (``build_ds_config``: ZeRO stage, offload, "auto" values filled from
    the run) in the form Lightning's ``DeepSpeedStrategy(config=...)`` accepts: no
    ``gradient_accumulation_steps`` (Lightning sets it from ``accumulate_grad_batches``), clipping
    by DeepSpeed at ``--clip-grad`` (our optimizer does not clip under Lightning), no
    optimizer/scheduler blocks (ours are used)."""
    from megatron_lite.training.deepspeed_engine import build_ds_config

    ds = build_ds_config(cfg)
    ds.pop("gradient_accumulation_steps", None)
    ds["gradient_clipping"] = float(cfg.optimizer.clip_grad or 0.0)
    return ds


def trainer_kwargs(run: LightningRun) -> dict:
    """``lightning.Trainer`` keyword arguments for a resolved run (plain values, no Trainer).

    Fixed by the shim: ``max_steps`` = train_iters, ``accumulate_grad_batches`` = A,
    ``use_distributed_sampler=False`` (our DP sampler), norm clipping at ``--clip-grad``,
    ``precision`` from our precision, validation every ``--eval-interval`` steps on
    ``--eval-iters`` micro-batches. ``strategy: deepspeed*`` becomes a ``DeepSpeedStrategy`` with
    :func:`deepspeed_config_for_lightning`.

    Raises:
        ValueError: ``deepspeed_config`` without a deepspeed strategy, or a bad class_path.
    """
    cfg, d = run.cfg, run.cfg.derived
    kw = dict(run.trainer)
    kw.pop("deepspeed_config", None)  # already in cfg.parallel.deepspeed_config
    strategy = kw.get("strategy", "auto")
    ds = isinstance(strategy, str) and strategy in _DS_STAGES
    if cfg.parallel.deepspeed_config and not ds:
        raise ValueError("trainer.deepspeed_config needs trainer.strategy: deepspeed (or "
                         "deepspeed_stage_N)")
    if ds:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        kw["strategy"] = DeepSpeedStrategy(config=deepspeed_config_for_lightning(cfg))
    else:
        kw["gradient_clip_val"] = cfg.optimizer.clip_grad or None
        kw["gradient_clip_algorithm"] = "norm"
    kw["precision"] = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(d.precision, "32-true")
    kw["max_steps"] = d.train_iters
    kw["accumulate_grad_batches"] = d.num_micro_batches
    kw["use_distributed_sampler"] = False
    kw.setdefault("num_sanity_val_steps", 0)
    ev = cfg.eval
    if 0 < ev.eval_interval <= d.train_iters:
        kw["val_check_interval"] = ev.eval_interval * d.num_micro_batches  # in micro-batches
        kw["check_val_every_n_epoch"] = None
        kw["limit_val_batches"] = ev.eval_iters
    else:
        kw["limit_val_batches"] = 0
    if "logger" in kw and isinstance(kw["logger"], list):
        kw["logger"] = [_instantiate(x, "logger") for x in kw["logger"]]
    elif isinstance(kw.get("logger"), dict):
        kw["logger"] = _instantiate(kw["logger"], "logger")
    if "callbacks" in kw:
        kw["callbacks"] = [_instantiate(x, "callbacks") for x in kw["callbacks"] or []]
    ck = cfg.checkpoint
    if ck.save:  # --save / checkpoint.save asks for checkpoints whatever the trainer section says
        from lightning.pytorch.callbacks import ModelCheckpoint

        kw["enable_checkpointing"] = True
        kw.setdefault("callbacks", []).append(ModelCheckpoint(
            dirpath=ck.save, filename="step={step}", auto_insert_metric_name=False,
            every_n_train_steps=ck.save_interval or d.train_iters, save_top_k=-1,
            save_last=True))
    return kw


def build_trainer(run: LightningRun, **overrides) -> "lightning.Trainer":
    """A ``lightning.Trainer`` for the run (:func:`trainer_kwargs`, then ``overrides``)."""
    import lightning as L

    kw = trainer_kwargs(run)
    kw.update(overrides)
    return L.Trainer(**kw)


__all__ = ["LightningGuardedAdamW", "LightningRun", "MegatronDataModule", "MegatronLRScheduler",
           "MegatronLlamaModule", "build_trainer", "deepspeed_config_for_lightning",
           "load_lightning_config", "trainer_kwargs"]
