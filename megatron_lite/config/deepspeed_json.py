"""A user's DeepSpeed JSON (``--deepspeed-config``) as far as the config needs it: reading it
(``//`` comments allowed) and adopting its ZeRO stage and offload settings into the parallel
section before the checks run. Building the engine's config from the run config stays with the
engine (:func:`megatron_lite.training.deepspeed_engine.build_ds_config`).
"""

from __future__ import annotations

import json
import re

from megatron_lite.errors import ConfigError


def read_json_with_comments(path: str) -> dict:
    """Read a JSON file that may contain ``//`` line comments (the recipe's template does).

    Raises:
        ConfigError (a ValueError): invalid JSON (message names the file and line).
    """
    with open(path) as f:
        text = f.read()
    # Drop // comments outside strings: a string literal or a comment, keep the former.
    text = re.sub(r'("(?:\\.|[^"\\])*")|//[^\n]*', lambda m: m.group(1) or "", text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed-config {path}:{e.lineno}: invalid JSON: {e.msg}") from None


def reconcile_user_json(cfg) -> None:
    """Adopt the ZeRO stage/offload of ``--deepspeed-config`` into ``cfg.parallel`` (before checks).

    The JSON describes *how* to execute (ZeRO stage, offload), so its values replace the flags'
    defaults (``--zero-stage 1``, no offload), with a note. A flag set to a non-default value that
    the JSON contradicts is an error rather than silently overridden.

    Raises:
        ConfigError (a ValueError): naming the flag, the JSON field and the fix.
    """
    path = cfg.parallel.deepspeed_config
    if not path:
        return
    zero = read_json_with_comments(path).get("zero_optimization", {}) or {}
    notes = _adopt_stage(cfg.parallel, zero, path) + _adopt_offload(cfg.parallel, zero, path)
    if notes:
        print(f"[config] --deepspeed-config {path} sets {', '.join(notes)}", flush=True)


def _adopt_stage(par, zero: dict, path: str) -> list[str]:
    """Take ``zero_optimization.stage`` unless it is "auto"; returns the note (or none)."""
    if "stage" not in zero or zero["stage"] == "auto":
        return []
    stage = int(zero["stage"])
    if stage == par.zero_stage:
        return []
    if par.zero_stage != type(par)().zero_stage:
        raise ConfigError(f"--zero-stage {par.zero_stage} contradicts --deepspeed-config "
                          f"{path}: zero_optimization.stage = {stage}; set the JSON's stage "
                          f"to \"auto\" or drop one of the two")
    par.zero_stage = stage
    return [f"ZeRO stage {stage}"]


def _adopt_offload(par, zero: dict, path: str) -> list[str]:
    """Take the JSON's offload devices unless "auto"; returns the notes."""
    notes = []
    for key, attr, flag in (("offload_optimizer", "offload_optimizer", "--offload-optimizer"),
                            ("offload_param", "offload_params", "--offload-params")):
        dev = (zero.get(key) or {}).get("device", "auto" if key not in zero else "none")
        if dev in ("auto", None):
            continue
        want = dev != "none"
        if want != getattr(par, attr):
            if getattr(par, attr):     # flag given, JSON says none
                raise ConfigError(f"{flag} contradicts --deepspeed-config {path}: "
                                  f"zero_optimization.{key}.device = \"none\"; set it to \"auto\" "
                                  f"or drop the flag")
            notes.append(f"{key} to {dev}")
            setattr(par, attr, want)
    return notes
