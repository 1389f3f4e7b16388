"""The run config from the command line and YAML: the argparse parser generated from the field
metadata of every section, ``--config run.yaml`` with the line of every key, dict overrides, and
the two entry points :func:`parse_args` and :func:`load_config`, which end in
:func:`megatron_lite.config.finalize`.

Precedence: dataclass default < ``--config run.yaml`` < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Sequence

import yaml

from megatron_lite.config.derive import finalize
from megatron_lite.config.tree import (RunConfig, apply_tree, did_you_mean, elem_type, field_specs,
                                       flag_names, section_classes)
from megatron_lite.errors import ConfigError


# ----------------------------------------------------------------------------- YAML / dicts
def yaml_with_lines(path: str) -> tuple[dict, dict]:
    """Load YAML and remember the line of every ``section.key`` (for error messages)."""
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


def flat_overrides(overrides: Mapping[str, Any]) -> dict:
    """Turn ``{"lr": 1e-3}`` / ``{"optimizer.lr": ...}`` / nested dicts into a section tree."""
    owner = {}
    for sec, cls in section_classes().items():
        for f, _, _ in field_specs(cls):
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

    Every flag's destination is ``"<section>.<field>"`` with default ``argparse.SUPPRESS``, so
    only the flags given override the YAML and the defaults.

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
    p.add_argument("--gpu", default=None, metavar="GPU",
                   help="With --dry-run: the device type whose memory the closing estimate uses "
                   "(as tools/plan_run.py --gpu: h100, a100, h20, ..., cpu; default: the device "
                   "present).")
    seen: dict[str, str] = {}
    for sec, cls in section_classes().items():
        group = p.add_argument_group(sec, (cls.__doc__ or "").strip().splitlines()[0]
                                     if cls.__doc__ else None)
        for f, tp, meta in field_specs(cls):
            if meta.get("cli", True):
                _add_field(group, sec, cls, f, tp, meta, seen)
    return p


def _add_field(group, sec: str, cls: type, f: dataclasses.Field, tp: type, meta: dict,
               seen: dict[str, str]) -> None:
    """Add field ``f`` of section ``sec`` to the argparse ``group`` (``seen``: flag -> owner)."""
    flags = flag_names(f.name, meta)
    for fl in flags:
        if fl in seen:
            raise ConfigError(f"flag {fl} declared by both {seen[fl]} and {sec}.{f.name}")
        seen[fl] = f"{sec}.{f.name}"
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    help_ = f"{meta.get('help', '')} (default: {default!r}; YAML {sec}.{f.name})"
    kw: dict = {"dest": f"{sec}.{f.name}", "default": argparse.SUPPRESS,
                "help": help_.replace("%", "%%")}
    if tp is bool:
        # Declared spellings set True; "--no-<flag>" is added for flags that do not already
        # start with "--no-" (argparse's BooleanOptionalAction would read "--no-shuffle"
        # itself as False).
        negs = ["--no-" + fl[2:] for fl in flags if not fl.startswith("--no-")]
        negs = [n for n in negs if n not in seen]
        for n in negs:
            seen[n] = f"{sec}.{f.name}"
        group.add_argument(*flags, *negs, action=_BoolAction, positive=flags, **kw)
        return
    kw["metavar"] = f.name.upper()
    if tp is list:
        kw["nargs"] = meta.get("nargs") or "+"
        kw["type"] = elem_type(cls, f.name)
    else:
        kw["type"] = tp
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
        # --help shows the allowed values ("--lr-decay-style {cosine,linear,...}"), as argparse
        # does for a flag without a metavar.
        kw["metavar"] = "{" + ",".join(str(c) for c in meta["choices"]) + "}"
    group.add_argument(*flags, **kw)


# ----------------------------------------------------------------------------- entry points
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
    cfg.dry_run, cfg.dry_run_gpu = ns.dry_run, ns.gpu
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
