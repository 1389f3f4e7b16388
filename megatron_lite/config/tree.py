"""The run's config tree: ``RunConfig`` (one dataclass per section) and ``Derived``, the field
metadata the command line and YAML are generated from, and applying a ``{section: {key: value}}``
tree onto a config.

``RunConfig`` holds one dataclass per section (``model``, ``data``, ``parallel``, ``optimizer``,
``schedule``, ``training``, ``checkpoint``, ``logging``, ``eval``, ``cpt``). Every field is declared
once with :func:`megatron_lite.config_field.arg`; the argparse parser and the YAML loader
(:mod:`megatron_lite.config.cli`) are generated from that metadata, so a flag's name, type,
choices, default and help live in one place. Derived values (D, mu_tok, A, GB, GB_tok,
train/warmup/decay steps, padded vocab, head_dim) are computed once by
:func:`megatron_lite.config.finalize` (:mod:`megatron_lite.config.derive`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Mapping, Sequence

from megatron_lite.config.sections import (CheckpointConfig, CPTConfig, EvalConfig, LoggingConfig,
                                           OptimizerConfig, ParallelConfig, ScheduleConfig,
                                           TrainingConfig)
from megatron_lite.data.data_config import DataConfig
from megatron_lite.errors import ConfigError
from megatron_lite.model.model_config import ModelConfig


def section_classes() -> dict[str, type]:
    """The dataclass of each section, in tree order."""
    return {
        "model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig,
        "optimizer": OptimizerConfig, "schedule": ScheduleConfig, "training": TrainingConfig,
        "checkpoint": CheckpointConfig,
        "logging": LoggingConfig, "eval": EvalConfig, "cpt": CPTConfig,
    }


@dataclasses.dataclass
class Derived:
    """Values computed from the tree by :func:`finalize` (saved with checkpoints, never flags).

    Attributes:
        world_size: processes in the job.
        data_parallel_size: D = world_size / TP.
        micro_batch_tokens: mu_tok = micro_batch_size x seq_length (tokens per rank per micro-batch).
        num_micro_batches: A = GB_tok / (mu_tok x D), micro-batches accumulated per step.
        global_batch_size: GB in samples per step.
        global_batch_tokens: GB_tok in tokens per step.
        train_iters, lr_warmup_iters, lr_decay_iters, lr_wsd_decay_iters: steps.
        train_tokens: train_iters x GB_tok.
        padded_vocab_size, head_dim: from the model section.
        precision: "bf16", "fp16" or "fp32".
    """

    world_size: int = 1
    data_parallel_size: int = 1
    micro_batch_tokens: int = 0
    num_micro_batches: int = 1
    global_batch_size: int = 0
    global_batch_tokens: int = 0
    train_iters: int = 0
    train_tokens: int = 0
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 0
    lr_wsd_decay_iters: int = 0
    padded_vocab_size: int = 0
    head_dim: int = 0
    precision: str = "fp32"


@dataclasses.dataclass
class RunConfig:
    """The whole run's configuration (one attribute per section) plus derived values."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    cpt: CPTConfig = dataclasses.field(default_factory=CPTConfig)
    derived: Derived = dataclasses.field(default_factory=Derived)
    # Not part of the tree (never saved): how this process was asked to run.
    dry_run: bool = False
    dry_run_gpu: str | None = None  # --gpu: the device the dry run's memory estimate is for
    config_file: str | None = None

    def to_dict(self) -> dict:
        """Plain nested dict ``{section: {field: value}}`` including ``derived`` (YAML/JSON-safe)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in section_classes()}
        out["derived"] = dataclasses.asdict(self.derived)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "RunConfig":
        """Rebuild from :meth:`to_dict` output (unknown keys are an error; ``derived`` restored)."""
        d = dict(d)
        derived = d.pop("derived", None)
        cfg = cls()
        apply_tree(cfg, d, source, lines={})
        if derived is not None:
            cfg.derived = Derived(**derived)
        return cfg


# ----------------------------------------------------------------------------- field metadata
def field_specs(cls) -> list[tuple[dataclasses.Field, type, dict]]:
    """``(field, base type, arg metadata)`` of each field of the section dataclass ``cls``; the
    base type is int/float/bool/str/list (see :func:`megatron_lite.config_field.arg`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("arg", {"help": "", "flags": None, "choices": None, "nargs": None,
                                      "cli": True})
        out.append((f, _base_type(hints.get(f.name, str)), meta))
    return out


def _base_type(tp) -> type:
    """int for Optional[int], list for list[...], the type itself otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple, Sequence):
        return list
    return tp if isinstance(tp, type) else str


def elem_type(cls, name: str) -> type:
    """Element type of the list-valued field ``name`` of ``cls`` (str when not declared)."""
    tp = typing.get_type_hints(cls)[name]
    for a in typing.get_args(tp):
        if typing.get_origin(a) in (list, tuple):
            return (typing.get_args(a) or (str,))[0]
    if typing.get_origin(tp) in (list, tuple):
        return (typing.get_args(tp) or (str,))[0]
    return str


def flag_names(name: str, meta: dict) -> list[str]:
    """The command-line spellings of field ``name`` (declared ones, else ``--field-name``)."""
    return list(meta.get("flags") or ["--" + name.replace("_", "-")])


def _coerce(value: Any, tp: type, where: str) -> Any:
    """Convert a YAML/dict value to the field's type; bool/int/float/str/list only."""
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) or isinstance(value, str):
                f = float(value)  # YAML 1.1 reads 1e9 as a string
                if f != int(f):
                    raise TypeError
                return int(f)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


# ----------------------------------------------------------------------------- dicts
def apply_tree(cfg: RunConfig, tree: Mapping[str, Any], source: str, lines: dict) -> None:
    """Set ``cfg``'s fields from ``{section: {key: value}}`` (a YAML file's or a dict's),
    converting each value to its field's type; a ``derived`` section is ignored.

    Args:
        cfg: the config to update in place.
        tree: the sections and keys to set.
        source: where the tree comes from (a file path), named in errors.
        lines: ``{"section": line, "section.key": line}`` for errors (see
            :func:`megatron_lite.config.yaml_with_lines`); may be empty.

    Raises:
        ConfigError: an unknown section or key ("did you mean"), a value of the wrong type or
            outside the field's choices, naming ``source:line``.
    """
    classes = section_classes()
    for sec, body in tree.items():
        where = f"{source}:{lines[sec]}" if sec in lines else source
        if sec == "derived":  # a saved config.yaml: derived values are recomputed by finalize
            continue
        if sec not in classes:
            raise ConfigError(f"{where}: unknown section {sec!r}{did_you_mean(sec, classes)}; "
                              f"sections are {', '.join(classes)}")
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: section {sec!r} must be a mapping of keys")
        obj = getattr(cfg, sec)
        fields = {f.name: (f, tp, meta) for f, tp, meta in field_specs(classes[sec])}
        for key, value in body.items():
            kw = f"{source}:{lines[f'{sec}.{key}']}" if f"{sec}.{key}" in lines else source
            if key not in fields:
                raise ConfigError(f"{kw}: unknown key {sec}.{key}{did_you_mean(key, fields)}")
            _, tp, meta = fields[key]
            value = _coerce(value, tp, f"{kw}: {sec}.{key}")
            if meta.get("choices") and value is not None and value not in meta["choices"]:
                raise ConfigError(f"{kw}: {sec}.{key}={value!r} is not one of {meta['choices']}")
            setattr(obj, key, value)


def did_you_mean(word: str, options) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the options close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


__all__ = ["ConfigError", "Derived", "RunConfig", "apply_tree", "did_you_mean", "elem_type",
           "field_specs", "flag_names", "section_classes"]
