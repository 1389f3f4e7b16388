"""The run's config tree: composition, command line, YAML, derived values and validation.

``RunConfig`` holds one dataclass per section (``model``, ``data``, ``parallel``, ``optimizer``,
``schedule``, ``training``, ``checkpoint``, ``logging``, ``eval``, ``cpt``). Every field is declared
once with :func:`megatron_lite.config_field.arg`; the argparse parser and the YAML loader are
generated from that metadata, so a flag's name, type, choices, default and help live in one place. Precedence:
dataclass default < ``--config run.yaml`` < command-line flag.

Derived values (D, mu_tok, A, GB, GB_tok, train/warmup/decay steps, padded vocab, head_dim) are
computed once by :func:`finalize` and checked before any process group exists; every problem is
reported as a :class:`ConfigError` naming the flag (or YAML file and line) and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
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
def _fields(cls) -> list[tuple[dataclasses.Field, type, dict]]:
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


def _elem_type(cls, name: str) -> type:
    tp = typing.get_type_hints(cls)[name]
    for a in typing.get_args(tp):
        if typing.get_origin(a) in (list, tuple):
            return (typing.get_args(a) or (str,))[0]
    if typing.get_origin(tp) in (list, tuple):
        return (typing.get_args(tp) or (str,))[0]
    return str


def _flags_of(name: str, meta: dict) -> list[str]:
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


# ----------------------------------------------------------------------------- YAML / dicts
def yaml_with_lines(path: str) -> tuple[dict, dict]:
    """Load YAML and remember the line of every ``section.key`` (for error messages)."""
    import yaml

    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model:, data:, ...)")
    lines = {}
    if root is not None and isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            lines[k.value] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for kk, _ in v.value:
                    lines[f"{k.value}.{kk.value}"] = kk.start_mark.line + 1
    return data, lines


def apply_tree(cfg: RunConfig, tree: Mapping[str, Any], source: str, lines: dict) -> None:
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
        fields = {f.name: (f, tp, meta) for f, tp, meta in _fields(classes[sec])}
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
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def flat_overrides(overrides: Mapping[str, Any]) -> dict:
    """Turn ``{"lr": 1e-3}`` / ``{"optimizer.lr": ...}`` / nested dicts into a section tree."""
    owner = {}
    for sec, cls in section_classes().items():
        for f, _, _ in _fields(cls):
            owner.setdefault(f.name, sec)
    tree: dict = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and key in section_classes():
            tree.setdefault(key, {}).update(value)
        elif "." in key:
            sec, k = key.split(".", 1)
            tree.setdefault(sec, {})[k] = value
        elif key.replace("-", "_") in owner:
            k = key.replace("-", "_")
            tree.setdefault(owner[k], {})[k] = value
        else:
            raise ConfigError(f"override {key!r}: unknown key{did_you_mean(key, owner)}")
    return tree


# ----------------------------------------------------------------------------- argparse
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of exiting so callers/tests see the message
        raise ConfigError(message)


class _BoolAction(argparse.Action):
    """``--flag`` sets True, its generated ``--no-flag`` sets False."""

    def __init__(self, option_strings, dest, positive=(), **kw):
        self.positive = set(positive)
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string in self.positive)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser for every flag of the tree plus ``--config`` and ``--dry-run``.

    Raises:
        ConfigError: two sections declare the same flag (a programming error).
    """
    p = _Parser(prog=prog, allow_abbrev=False, description=(
        "megatron_lite pretraining. Flags override --config YAML keys, which override defaults. "
        "Lengths in steps unless the flag says tokens/samples."))
    p.add_argument("--config", default=None, help="YAML run config whose sections mirror the "
                   "flag groups below (model:, data:, parallel:, ...).")
    p.add_argument("--dry-run", action="store_true",
                   help="Validate the config, print the resolved plan and exit. Plans for "
                   "$WORLD_SIZE processes (set by torchrun; e.g. WORLD_SIZE=64 for 8 x 8 GPUs), "
                   "or TP x PP (D = 1) when it is unset.")
    seen: dict[str, str] = {}
    for sec, cls in section_classes().items():
        group = p.add_argument_group(sec, (cls.__doc__ or "").strip().splitlines()[0]
                                     if cls.__doc__ else None)
        for f, tp, meta in _fields(cls):
            if not meta.get("cli", True):
                continue
            flags = _flags_of(f.name, meta)
            for fl in flags:
                if fl in seen:
                    raise ConfigError(f"flag {fl} declared by both {seen[fl]} and {sec}.{f.name}")
                seen[fl] = f"{sec}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            help_ = f"{meta.get('help', '')} (default: {default!r}; YAML {sec}.{f.name})"
            kw: dict = {"dest": f"{sec}.{f.name}", "default": argparse.SUPPRESS,
                        "help": help_.replace("%", "%%")}
            if tp is not bool:
                kw["metavar"] = f.name.upper()
            if tp is bool:
                # Declared spellings set True; "--no-<flag>" is added for flags that do not already
                # start with "--no-" (argparse's BooleanOptionalAction would read "--no-shuffle"
                # itself as False).
                negs = ["--no-" + fl[2:] for fl in flags if not fl.startswith("--no-")]
                negs = [n for n in negs if n not in seen]
                for n in negs:
                    seen[n] = f"{sec}.{f.name}"
                group.add_argument(*flags, *negs, action=_BoolAction, positive=flags, **kw)
                continue
            if tp is list:
                kw["nargs"] = meta.get("nargs") or "+"
                kw["type"] = _elem_type(cls, f.name)
            else:
                kw["type"] = tp
                if meta.get("nargs"):
                    kw["nargs"] = meta["nargs"]
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            group.add_argument(*flags, **kw)
    return p


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> RunConfig:
    """Parse command-line flags (and ``--config`` YAML) into a finalized, validated RunConfig.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
        world_size: number of processes (default: ``$WORLD_SIZE`` or 1).

    Returns:
        The finalized config (``derived`` filled in).

    Raises:
        ConfigError: unknown flag ("did you mean"), bad value, or an inconsistent config.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        bad = [u for u in unknown if u.startswith("-")] or unknown
        name = bad[0].split("=")[0]
        raise ConfigError(f"unknown argument {bad[0]!r}{did_you_mean(name, known)}")
    cfg = RunConfig()
    if ns.config:
        if not os.path.exists(ns.config):
            raise ConfigError(f"--config {ns.config}: file not found")
        tree, lines = yaml_with_lines(ns.config)
        apply_tree(cfg, tree, ns.config, lines)
        cfg.config_file = ns.config
    for dest, value in vars(ns).items():
        if "." in dest:
            sec, key = dest.split(".", 1)
            setattr(getattr(cfg, sec), key, value)
    cfg.dry_run = ns.dry_run
    if cfg.dry_run and world_size is None and "WORLD_SIZE" not in os.environ:
        # A plan typed at a login shell has no launcher around it: plan the smallest world the
        # model parallelism needs (D = 1) rather than refuse TP > 1; WORLD_SIZE=N plans for N.
        world_size = max(1, cfg.parallel.tensor_model_parallel_size
                         * cfg.parallel.pipeline_model_parallel_size)
    return finalize(cfg, world_size)


def load_config(yaml_path: str | None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                world_size: int | None = None) -> RunConfig:
    """Load a YAML run config, apply overrides, finalize and validate.

    Args:
        yaml_path: YAML file whose sections mirror the tree (None: defaults only).
        overrides: a list of command-line flags (``["--lr", "1e-3"]``) or a dict
            (``{"lr": 1e-3}``, ``{"optimizer.lr": 1e-3}`` or ``{"optimizer": {"lr": 1e-3}}``).
        world_size: number of processes (default: ``$WORLD_SIZE`` or 1).

    Raises:
        ConfigError: as :func:`parse_args`.
    """
    if overrides is None or isinstance(overrides, Mapping):
        cfg = RunConfig()
        if yaml_path:
            if not os.path.exists(yaml_path):
                raise ConfigError(f"{yaml_path}: file not found")
            tree, lines = yaml_with_lines(yaml_path)
            apply_tree(cfg, tree, yaml_path, lines)
            cfg.config_file = yaml_path
        if overrides:
            apply_tree(cfg, flat_overrides(overrides), "overrides", {})
        return finalize(cfg, world_size)
    argv = (["--config", yaml_path] if yaml_path else []) + list(overrides)
    return parse_args(argv, world_size)


# ----------------------------------------------------------------------------- derived + checks
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def finalize(cfg: RunConfig, world_size: int | None = None) -> RunConfig:
    """Compute ``cfg.derived`` and validate the whole tree (call before any process group).

    Raises:
        ConfigError: with the offending flag(s) and the fix.
    """
    from megatron_lite.config.derive import derive_and_check

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    derive_and_check(cfg, world_size)
    return cfg


def format_plan(cfg: RunConfig) -> str:
    """The resolved plan printed by rank 0 at start and by ``--dry-run`` (one item per line)."""
    from megatron_lite.config.derive import plan_lines

    return "\n".join(plan_lines(cfg))


__all__ = ["ConfigError", "Derived", "RunConfig", "build_parser", "finalize", "format_plan",
           "load_config", "parse_args", "section_classes"]
