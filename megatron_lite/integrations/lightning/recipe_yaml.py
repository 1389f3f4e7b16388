"""The recipe's Lightning YAML (model / data / optimizer / scheduler / trainer) -> our RunConfig.

The recipe (chapter 15.3.1) writes runs as five sections: ``model`` (an ``architecture`` block
with HuggingFace key names and ``rope_scaling``), ``data`` (``path``, ``seq_len``,
``dynamic_mixing``, ``num_workers``), ``optimizer`` (``name: AdamW``, ``lr``, ``betas``,
``weight_decay``, ``eps``), ``scheduler`` (``name``, ``warmup_steps``, ``min_lr_ratio``) and
``trainer`` (``lightning.Trainer`` keyword arguments plus ``deepspeed_config``). This module maps
the first four onto our config tree, key by key, so the run is validated and its derived values
(A, train_iters, padded vocab) are computed by :func:`megatron_lite.config.finalize` exactly as for
``pretrain_llama.py``; the ``trainer`` section becomes ``lightning.Trainer`` arguments. Our own
section names (``parallel``, ``training``, ``checkpoint``, ``logging``, ``eval``, and our key
names inside ``model``/``data``/``optimizer``/``schedule``) are accepted in the same file.

Every key not understood is an error naming the file and line. Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from megatron_lite.config import (ConfigError, RunConfig, apply_tree, yaml_with_lines,
                                  build_parser, finalize, section_classes)

# HuggingFace LlamaConfig names (the recipe's architecture block) -> ModelConfig fields.
_ARCH_KEYS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
              "num_attention_heads": "num_attention_heads",
              "num_key_value_heads": "num_query_groups", "intermediate_size": "ffn_hidden_size",
              "vocab_size": "vocab_size", "rms_norm_eps": "norm_epsilon",
              "rope_theta": "rotary_base", "tie_word_embeddings": "tie_word_embeddings",
              "initializer_range": "init_method_std",
              "max_position_embeddings": "max_position_embeddings"}
# The recipe's rope_scaling.type spellings -> --rope-scaling-type.
_ROPE_TYPES = {"pi": "linear", "linear": "linear", "ntk-aware": "ntk", "ntk": "ntk",
               "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3", "none": "none"}
_TRAINING_FROM_DATA = ("micro_batch_size", "global_batch_size", "global_batch_tokens")
# Lightning precision strings -> our precision flag.
_PRECISION = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16",
              "16-true": "fp16", "16": "fp16", "32-true": "fp32", "32": "fp32"}


@dataclasses.dataclass
class LightningRun:
    """A recipe YAML resolved for one job.

    Attributes:
        cfg: the finalized :class:`~megatron_lite.config.RunConfig` (``derived`` filled in).
        trainer: ``lightning.Trainer`` keyword arguments from the ``trainer`` section, still
            plain data (``logger``/``callbacks`` as ``class_path`` dicts, ``deepspeed_config``
            kept); :func:`megatron_lite.integrations.lightning.build_trainer` instantiates them.
        name: ``model.name`` (run name for loggers), or None.
        source: the YAML path.
    """

    cfg: RunConfig
    trainer: dict
    name: str | None
    source: str


def _where(path: str, lines: Mapping[str, int], key: str) -> str:
    return f"{path}:{lines[key]}" if key in lines else path


def _set(tree: dict, sec: str, key: str, value: Any, where: str, origin: dict) -> None:
    """Put ``sec.key`` in the tree; the same key from two recipe spellings must agree."""
    body = tree.setdefault(sec, {})
    if key in body and body[key] != value:
        raise ConfigError(f"{where}: {sec}.{key} = {value!r} contradicts {body[key]!r} set at "
                          f"{origin[(sec, key)]}; keep one of them")
    body[key] = value
    origin[(sec, key)] = where


def _model(body: Mapping, path: str, lines: dict, tree: dict, origin: dict) -> str | None:
    name = None
    for key, value in body.items():
        w = _where(path, lines, f"model.{key}")
        if key == "name":
            name = str(value)
        elif key == "architecture":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{w}: model.architecture must be a mapping")
            _architecture(value, w, tree, origin)
        else:  # our ModelConfig key names (model_size, attention_backend, ...)
            _set(tree, "model", key, value, w, origin)
    return name


def _architecture(arch: Mapping, w: str, tree: dict, origin: dict) -> None:
    ctx = arch.get("context_length")
    for key, value in arch.items():
        if key == "context_length":
            _set(tree, "model", "seq_length", int(value), w, origin)
        elif key == "rope_scaling":
            if value is None:
                continue
            if not isinstance(value, Mapping) or "type" not in value:
                raise ConfigError(f"{w}: rope_scaling needs 'type' (one of {sorted(_ROPE_TYPES)})")
            extra = set(value) - {"type", "rope_type", "factor",
                                  "original_max_position_embeddings"}
            if extra:
                raise ConfigError(f"{w}: rope_scaling keys {sorted(extra)} are not understood; "
                                  "use type, factor, original_max_position_embeddings")
            kind = str(value["type"]).lower()
            if kind not in _ROPE_TYPES:
                raise ConfigError(f"{w}: rope_scaling.type {kind!r} not in {sorted(_ROPE_TYPES)}")
            _set(tree, "model", "rope_scaling_type", _ROPE_TYPES[kind], w, origin)
            if "factor" in value:
                _set(tree, "model", "rope_scaling_factor", float(value["factor"]), w, origin)
            if "original_max_position_embeddings" in value:
                _set(tree, "model", "rope_original_max_position_embeddings",
                     int(value["original_max_position_embeddings"]), w, origin)
            if ctx is not None and "max_position_embeddings" not in arch:
                # the extended context is the model's new position range
                _set(tree, "model", "max_position_embeddings", int(ctx), w, origin)
        elif key in _ARCH_KEYS:
            _set(tree, "model", _ARCH_KEYS[key], value, w, origin)
        else:
            _set(tree, "model", key, value, w, origin)  # our own names; unknown ones fail later
    if ctx is not None and "rope_scaling" not in arch and "max_position_embeddings" not in arch:
        _set(tree, "model", "max_position_embeddings", int(ctx), w, origin)


def _data(body: Mapping, path: str, lines: dict, tree: dict, origin: dict) -> None:
    for key, value in body.items():
        w = _where(path, lines, f"data.{key}")
        if key == "path":
            _set(tree, "data", "data_path", [value] if isinstance(value, str) else list(value),
                 w, origin)
        elif key == "format":
            if str(value).lower() not in ("megatron", "mmap", "bin/idx"):
                raise ConfigError(
                    f"{w}: data.format {value!r}: this shim reads Megatron .bin/.idx corpora "
                    "only; convert the shards with tools/preprocess_data.py and set "
                    "format: megatron (or drop the key)")
        elif key == "seq_len":
            _set(tree, "model", "seq_length", int(value), w, origin)
        elif key == "dynamic_mixing":
            items: list[str] = []
            for i, src in enumerate(value or []):
                if not isinstance(src, Mapping) or "path" not in src or "weight" not in src:
                    raise ConfigError(f"{w}: data.dynamic_mixing[{i}] needs path and weight")
                items += [str(float(src["weight"])), str(src["path"])]
            _set(tree, "data", "data_path", items, w, origin)
        elif key in _TRAINING_FROM_DATA:
            _set(tree, "training", key, value, w, origin)
        else:
            _set(tree, "data", key, value, w, origin)


def _optimizer(body: Mapping, path: str, lines: dict, tree: dict, origin: dict) -> None:
    for key, value in body.items():
        w = _where(path, lines, f"optimizer.{key}")
        if key == "name":
            if str(value).lower() != "adamw":
                raise ConfigError(f"{w}: optimizer.name {value!r}: the Lightning shim builds "
                                  "our AdamW (megatron_lite.training.optimizer); use AdamW")
        elif key == "betas":
            if not isinstance(value, Sequence) or len(value) != 2:
                raise ConfigError(f"{w}: optimizer.betas must be [beta1, beta2]")
            _set(tree, "optimizer", "adam_beta1", float(value[0]), w, origin)
            _set(tree, "optimizer", "adam_beta2", float(value[1]), w, origin)
        elif key == "eps":
            _set(tree, "optimizer", "adam_eps", float(value), w, origin)
        else:
            _set(tree, "optimizer", key, value, w, origin)


def _scheduler(body: Mapping, path: str, lines: dict, tree: dict, origin: dict) -> None:
    for key, value in body.items():
        w = _where(path, lines, f"scheduler.{key}")
        if key == "name":
            _set(tree, "schedule", "lr_decay_style", str(value).lower(), w, origin)
        elif key == "warmup_steps":
            _set(tree, "schedule", "lr_warmup_iters", int(value), w, origin)
        elif key == "warmup_tokens":
            _set(tree, "schedule", "lr_warmup_tokens", int(value), w, origin)
        elif key == "decay_steps":
            _set(tree, "schedule", "lr_decay_iters", int(value), w, origin)
        elif key == "min_lr_ratio":
            lr = tree.get("optimizer", {}).get("lr")
            if lr is None:
                raise ConfigError(f"{w}: scheduler.min_lr_ratio needs optimizer.lr")
            _set(tree, "optimizer", "min_lr", float(lr) * float(value), w, origin)
        else:
            _set(tree, "schedule", key, value, w, origin)


def _trainer(body: Mapping, path: str, lines: dict, tree: dict, origin: dict) -> dict:
    """Trainer kwargs; the keys that are also ours (steps, clip, precision, seed) go to the tree."""
    out = {}
    for key, value in body.items():
        w = _where(path, lines, f"trainer.{key}")
        if key == "max_steps":
            _set(tree, "schedule", "train_iters", int(value), w, origin)
        elif key == "gradient_clip_val":
            _set(tree, "optimizer", "clip_grad", float(value or 0.0), w, origin)
        elif key == "precision":
            p = _PRECISION.get(str(value))
            if p is None:
                raise ConfigError(f"{w}: trainer.precision {value!r} not in {sorted(_PRECISION)}")
            for flag in ("bf16", "fp16", "fp32"):
                _set(tree, "training", flag, flag == p, w, origin)
        elif key == "seed":
            _set(tree, "training", "seed", int(value), w, origin)
        elif key == "log_every_n_steps":
            _set(tree, "logging", "log_interval", int(value), w, origin)
            out[key] = value
        elif key == "val_check_interval":
            # the recipe means optimizer steps ("evaluate every 1000 steps"); Lightning counts
            # micro-batches, so trainer_kwargs converts with A
            _set(tree, "eval", "eval_interval", int(value), w, origin)
        elif key == "limit_val_batches":
            _set(tree, "eval", "eval_iters", int(value), w, origin)
        elif key == "deepspeed_config":
            _set(tree, "parallel", "deepspeed_config", str(value), w, origin)
            out[key] = value
        elif key == "strategy" and isinstance(value, str) and value.startswith("deepspeed"):
            # deepspeed_stage_N[_offload]: the stage and offloads are our flags too, so the
            # DeepSpeed config is built (and checked) by the same code as pretrain_llama.py's
            parts = value.split("_")
            if len(parts) >= 3 and parts[1] == "stage" and parts[2] in "123":
                _set(tree, "parallel", "zero_stage", int(parts[2]), w, origin)
                if parts[-1] == "offload":
                    _set(tree, "parallel", "offload_optimizer", True, w, origin)
                    if parts[2] == "3":
                        _set(tree, "parallel", "offload_params", True, w, origin)
            elif value != "deepspeed":
                raise ConfigError(f"{w}: trainer.strategy {value!r}: use deepspeed, "
                                  "deepspeed_stage_{1,2,3} or deepspeed_stage_{2,3}_offload")
            out[key] = value
        elif key in ("accumulate_grad_batches", "use_distributed_sampler", "max_epochs",
                     "gradient_clip_algorithm"):
            raise ConfigError(
                f"{w}: trainer.{key} is set by the shim (accumulation A = GB / (micro batch x DP) "
                "from the data section, our own DP sampler, max_steps = train_iters, norm "
                "clipping); remove it")
        else:
            out[key] = value
    return out


def _world_size(trainer: Mapping) -> int:
    """Processes of the job: $WORLD_SIZE under torchrun, else devices x num_nodes."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = int(devices)
    else:  # "auto": Lightning takes every GPU, or one CPU process
        import torch

        accel = str(trainer.get("accelerator", "auto"))
        n = torch.cuda.device_count() if accel in ("gpu", "cuda", "auto") and \
            torch.cuda.is_available() else 1
    return max(1, n) * int(trainer.get("num_nodes", 1))


def load_lightning_config(path: str, flags: Sequence[str] = (),
                          world_size: int | None = None) -> LightningRun:
    """Read a recipe-style YAML and resolve it into our config plus Trainer arguments.

    Args:
        path: YAML file with ``model``/``data``/``optimizer``/``scheduler``/``trainer``
            sections (and optionally our own sections).
        flags: Megatron-style flags that override the file (``["--train-iters", "4"]``).
        world_size: processes in the job (default: ``$WORLD_SIZE``, else trainer devices x
            num_nodes).

    Returns:
        :class:`LightningRun`.

    Raises:
        ConfigError: unknown section/key, contradicting spellings, unsupported optimizer or data
            format, or anything :func:`megatron_lite.config.finalize` rejects; the message names
            the file and line.
    """
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: file not found")
    raw, lines = yaml_with_lines(path)
    tree: dict = {}
    origin: dict = {}
    ours = set(section_classes())
    handlers = {"model": _model, "data": _data, "optimizer": _optimizer,
                "scheduler": _scheduler}
    name, trainer = None, {}
    # optimizer before scheduler: min_lr_ratio needs the peak LR
    order = sorted(raw, key=lambda s: ["optimizer", "scheduler"].index(s)
                   if s in ("optimizer", "scheduler") else -1)
    for sec in order:
        body = raw[sec] or {}
        w = _where(path, lines, sec)
        if not isinstance(body, Mapping):
            raise ConfigError(f"{w}: section {sec!r} must be a mapping of keys")
        if sec == "trainer":
            trainer = _trainer(body, path, lines, tree, origin)
        elif sec in handlers:
            got = handlers[sec](body, path, lines, tree, origin)
            name = got if sec == "model" else name
        elif sec in ours:
            for key, value in body.items():
                _set(tree, sec, key, value, _where(path, lines, f"{sec}.{key}"), origin)
        else:
            raise ConfigError(f"{w}: unknown section {sec!r}; recipe sections are model, data, "
                              f"optimizer, scheduler, trainer (ours too: {', '.join(sorted(ours))})")
    if tree.get("parallel", {}).get("tensor_model_parallel_size", 1) != 1:
        raise ConfigError(
            f"{path}: parallel.tensor_model_parallel_size must be 1 under Lightning: its "
            "strategies (ddp, deepspeed) see data parallelism only and would average the TP "
            "shards' gradients across TP ranks; use pretrain_llama.py --tp N for tensor parallelism")
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, str) and not strategy.startswith("deepspeed"):
        # ddp / auto replicate the optimizer state: ZeRO-0 is what runs, and what the plan and
        # the memory estimate must show (the flag's default, 1, describes our DeepSpeed path).
        z = tree.get("parallel", {}).get("zero_stage")
        if z not in (None, 0):
            raise ConfigError(f"{path}: parallel.zero_stage {z} needs trainer.strategy "
                              f"deepspeed_stage_{z} (strategy {strategy!r} shards nothing)")
        tree.setdefault("parallel", {})["zero_stage"] = 0
    cfg = RunConfig()
    cfg.config_file = path
    apply_tree(cfg, tree, path, {})
    if flags:
        ns, unknown = build_parser().parse_known_args(list(flags))
        if unknown:
            raise ConfigError(f"unknown argument {unknown[0]!r} (override flags are "
                              "pretrain_llama.py's, e.g. --data-path, --train-iters)")
        for dest, value in vars(ns).items():
            if "." in dest:
                sec, key = dest.split(".", 1)
                setattr(getattr(cfg, sec), key, value)
    finalize(cfg, world_size if world_size is not None else _world_size(trainer))
    if cfg.parallel.tensor_model_parallel_size != 1:
        raise ConfigError("--tensor-model-parallel-size must be 1 under Lightning (see "
                          "docs: README 'Lightning'); use pretrain_llama.py for TP")
    # Training-loop features that live in our trainer only: refuse rather than ignore them.
    t = cfg.training
    ours_only = {"--optimizer " + cfg.optimizer.optimizer: cfg.optimizer.optimizer != "adamw",
                 "--rampup-batch-size": bool(t.rampup_batch_size),
                 "--rampup-batch-tokens": bool(t.rampup_batch_tokens),
                 "--spike-detection": bool(t.spike_detection),
                 "--noise-scale-interval": bool(t.noise_scale_interval)}
    given = [flag for flag, on in ours_only.items() if on]
    if given:
        raise ConfigError(f"{', '.join(given)}: not supported by the Lightning shim (it builds "
                          "AdamW and a fixed global batch); use pretrain_llama.py for these")
    return LightningRun(cfg=cfg, trainer=trainer, name=name, source=path)
