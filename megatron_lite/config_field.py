"""The one helper every config dataclass uses to declare a field together with its command-line flag.

Each subsystem (model, data, training, ...) defines its own dataclass with :func:`arg` fields;
``megatron_lite.config`` composes them into one tree and generates argparse and YAML handling from
the field metadata, so a flag's name, type, default, choices and help text live in exactly one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flags: Sequence[str] | None = None,
    choices: Sequence[Any] | None = None,
    nargs: str | int | None = None,
    default_factory: Any = dataclasses.MISSING,
    cli: bool = True,
) -> Any:
    """Declare a dataclass field that is also a command-line flag and a YAML key.

    Args:
        default: default value (use ``default_factory`` for mutable defaults).
        help: text shown by ``--help``; give units (tokens, samples, steps, bytes).
        flags: explicit flag spellings, first one canonical (e.g. ``["--tensor-model-parallel-size",
            "--tp"]``). Default: ``--<field-name-with-dashes>``.
        choices: allowed values, enforced by argparse and by YAML validation.
        nargs: argparse ``nargs`` for list-valued fields.
        default_factory: factory for mutable defaults.
        cli: False for fields that are derived or internal (present in YAML/checkpoints, not flags).

    Returns:
        A ``dataclasses.field`` carrying the metadata under the key ``"arg"``.
    """
    meta = {"arg": {"help": help, "flags": list(flags) if flags else None, "choices":
                    list(choices) if choices is not None else None, "nargs": nargs, "cli": cli}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
