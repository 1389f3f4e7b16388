"""Continued pretraining (``cpt_llama.py``): the config resolved against a base checkpoint.

Precedence of values (lowest first): dataclass defaults < :data:`CPT_DEFAULTS` < the base
checkpoint's model config < ``--config`` YAML < command-line flags. Architecture fields (width,
depth, heads, KV groups, FFN, head dim, norm epsilon, tied embeddings) must agree with
the base: a YAML key or flag that contradicts it is a :class:`~megatron_lite.config.ConfigError`
naming the flag and both values. Fields a checkpoint may change on resume
(:data:`megatron_lite.checkpoint.compat.MODEL_FIELDS_ALLOWED_TO_CHANGE`: sequence length, RoPE scaling, backends, ...)
are taken from the base when not given and may be overridden, e.g. a long-context CPT with
``--seq-length 8192 --rope-scaling-type yarn --rope-scaling-factor 2`` or a larger
``--rotary-base``.

Vocabulary: ``V = --vocab-size`` if given, else ``max(V_base, V_tokenizer)`` of
``--tokenizer-model``; ``V < V_base`` is an error (rows cannot be dropped). ``V > V_base`` grows
the embedding/output rows (:mod:`megatron_lite.cpt.model_setup`).

Optimizer and schedule: the LR schedule is never taken from the base (warmup/decay from this run's
flags, counted from step 0: the recipe's "re-warm"); AdamW moments start fresh unless
``--load-optimizer-state`` (our base checkpoints with the same TP, ZeRO stage, data-parallel size
and vocabulary, nothing frozen). On a restart with ``--load`` of the CPT run's own checkpoints the
usual resume applies, including ``--override-opt-param-scheduler``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from megatron_lite.checkpoint.base_checkpoint import BaseCheckpoint, detect_base
from megatron_lite.config import (ConfigError, RunConfig, apply_tree, build_parser, did_you_mean,
                                  finalize, yaml_with_lines)
from megatron_lite.config.sections import parse_layer_ranges
from megatron_lite.cpt.model_setup import check_extended_tokenizer
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.model.presets import MODEL_PRESETS

# CPT defaults that differ from pretraining (the recipe's CPT chapter: a smaller peak LR than the
# base's 3e-4; the short re-warmup and cosine decay to 10 % are already the generic defaults).
# Everything is overridable by YAML/flags.
CPT_DEFAULTS: dict[str, dict[str, Any]] = {
    "optimizer": {"lr": 1.0e-4},   # --min-lr stays 10 % of --lr; warmup stays 1 % of the decay
}

# Must equal the base checkpoint when given (compared after resolving defaults).
# --rotary-base is not among them: raising the RoPE base ("ABF", Xiong et al. 2023, "Effective
# Long-Context Scaling of Foundation Models", sec. 3.1) is itself a long-context CPT recipe.
ARCH_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
               "ffn_hidden_size", "kv_channels", "norm_epsilon", "tie_word_embeddings")


def _flag_names(parser) -> dict[str, str]:
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


def resolve_config(argv: Sequence[str] | None = None, world_size: int | None = None) -> RunConfig:
    """Parse ``cpt_llama.py`` flags into a finalized RunConfig (module docstring for precedence).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
        world_size: processes in the job (default ``$WORLD_SIZE`` or 1).

    Raises:
        ConfigError: no ``--pretrained-checkpoint``, an unusable one, a model flag contradicting
            it, a vocabulary smaller than the base's, or any error of :func:`finalize`.
    """
    parser = build_parser(prog="cpt_llama.py")
    ns = _parse_known(parser, list(sys.argv[1:] if argv is None else argv))
    cfg = RunConfig()
    apply_tree(cfg, CPT_DEFAULTS, "cpt_llama.py defaults", {})
    yaml_tree, lines = {}, {}
    if ns.config:
        if not os.path.exists(ns.config):
            raise ConfigError(f"--config {ns.config}: file not found")
        yaml_tree, lines = yaml_with_lines(ns.config)
        cfg.config_file = ns.config
    cli = {dest: value for dest, value in vars(ns).items() if "." in dest}
    given = _given_model_values(ns.config, yaml_tree, lines, cli, _flag_names(parser))
    base = _base_of(ns.config, yaml_tree, cli)
    # The base's values go in before YAML and flags, so those still win (and are then checked).
    _fill_model_from_base(cfg.model, base.model)
    if ns.config:
        apply_tree(cfg, yaml_tree, ns.config, lines)
    for dest, value in cli.items():
        sec, key = dest.split(".", 1)
        setattr(getattr(cfg, sec), key, value)
    cfg.dry_run, cfg.dry_run_gpu = ns.dry_run, ns.gpu
    _check_against_base(cfg.model, base, given)
    _apply_vocab(cfg, base, given)
    finalize(cfg, world_size)
    if cfg.cpt.load_optimizer_state:
        _check_optimizer_state_loadable(cfg, base)
    try:
        parse_layer_ranges(cfg.cpt.freeze_layers, cfg.model.num_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _parse_known(parser, argv: list[str]):
    """``parser.parse_known_args(argv)``'s namespace; an unknown argument is a ConfigError with
    the closest known flag."""
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [o for a in parser._actions for o in a.option_strings]
        bad = [u for u in unknown if u.startswith("-")] or unknown
        raise ConfigError(f"unknown argument {bad[0]!r}"
                          f"{did_you_mean(bad[0].split('=')[0], known)}")
    return ns


def _given_model_values(config: str | None, yaml_tree: dict, lines: dict, cli: dict,
                        flags: dict[str, str]) -> dict[str, tuple[Any, str]]:
    """Model fields set by the YAML or a flag: ``{field: (value, where it was given)}`` (a flag
    over a YAML key)."""
    given: dict[str, tuple[Any, str]] = {}
    for key, value in (yaml_tree.get("model") or {}).items():
        line = lines.get(f"model.{key}")
        given[key] = (value, f"{config}:{line} model.{key}" if line else f"{config} model.{key}")
    for dest, value in cli.items():
        sec, key = dest.split(".", 1)
        if sec == "model":
            given[key] = (value, flags.get(dest, dest))
    return given


def _base_of(config: str | None, yaml_tree: dict, cli: dict) -> BaseCheckpoint:
    """The base checkpoint named by the YAML's ``cpt`` section or the ``--pretrained-*`` flags."""
    probe = RunConfig()
    if config:
        apply_tree(probe, {k: v for k, v in yaml_tree.items() if k == "cpt"}, config, {})
    for dest, value in cli.items():
        if dest.startswith("cpt."):
            setattr(probe.cpt, dest.split(".", 1)[1], value)
    if not probe.cpt.pretrained_checkpoint:
        raise ConfigError("cpt_llama.py needs --pretrained-checkpoint DIR (the base model: an HF "
                          "folder or a megatron_lite checkpoint folder)")
    return detect_base(probe.cpt.pretrained_checkpoint, probe.cpt.pretrained_checkpoint_format)


def _apply_vocab(cfg, base: BaseCheckpoint, given: dict) -> None:
    """This run's vocabulary (module docstring) and the base's, checking a grown tokenizer."""
    cfg.model.vocab_size = _resolve_vocab(cfg, base, given)
    cfg.cpt.base_vocab_size = base.model.vocab_size
    cfg.cpt.base_format = base.format
    if cfg.model.vocab_size > base.model.vocab_size:
        try:
            check_extended_tokenizer(cfg, base)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _fill_model_from_base(model, base_model) -> None:
    """Copy every field of the base's ModelConfig except run-local ones (dtype, backends...)."""
    skip = {"model_size", "params_dtype", "attention_backend", "no_fused_rope",
            "recompute_granularity", "recompute_num_layers", "attention_dropout",
            "hidden_dropout", "make_vocab_size_divisible_by", "init_method_std",
            "cross_entropy_impl", "cross_entropy_chunk_size"}
    for f in dataclasses.fields(base_model):
        if f.name not in skip:
            setattr(model, f.name, copy.deepcopy(getattr(base_model, f.name)))


def _check_against_base(model, base: BaseCheckpoint, given: dict) -> None:
    """A YAML key, flag or ``--model-size`` preset contradicting the base's architecture is an
    error (all of them in one message)."""
    b = base.model
    src = f"the pretrained checkpoint {base.path}"
    errors = []
    for name in ARCH_FIELDS:
        if name not in given:
            continue
        # The merged value (YAML coerced to the field's type, a flag over a YAML key) and where
        # it came from (the flag when both set it).
        value, where = getattr(model, name), given[name][1]
        want = b.head_dim if name == "kv_channels" else getattr(b, name)
        if value is not None and value != want:
            errors.append(f"{where} {value!r} contradicts {src}: {name} = {want!r}")
    if "model_size" in given and given["model_size"][0] in MODEL_PRESETS:
        size, where = given["model_size"]
        for key, value in MODEL_PRESETS[size].items():
            want = getattr(b, key)
            if key in ARCH_FIELDS and value is not None and value != want and key not in given:
                errors.append(f"{where} {size!r} sets {key} = {value!r}, contradicting {src}: "
                              f"{key} = {want!r}")
    if errors:
        raise ConfigError("; ".join(errors) + ". Drop the flag (the architecture comes from the "
                          "base checkpoint) or pick the matching base.")


def _resolve_vocab(cfg, base: BaseCheckpoint, given: dict) -> int:
    """``--vocab-size`` if given (not below the base's), else max(base, tokenizer)."""
    v0 = int(base.model.vocab_size)
    if "vocab_size" in given and cfg.model.vocab_size is not None:
        v, where = cfg.model.vocab_size, given["vocab_size"][1]
        if int(v) < v0:
            raise ConfigError(f"{where} {v} is below the pretrained checkpoint's vocabulary "
                              f"{v0} ({base.path}); rows cannot be dropped")
        return int(v)
    tok_path = cfg.data.tokenizer_model
    if not tok_path:
        return v0
    try:
        tok = build_tokenizer(cfg.data.tokenizer_type or "SentencePieceTokenizer", tok_path)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--tokenizer-model {tok_path}: cannot load ({e})") from None
    return max(v0, int(tok.vocab_size))


def _check_optimizer_state_loadable(cfg, base: BaseCheckpoint) -> None:
    """``--load-optimizer-state`` needs our base with this run's layout, nothing frozen, --load."""
    flag = "--load-optimizer-state"
    if base.format != "megatron_lite":
        raise ConfigError(f"{flag}: the base {base.path} is a HuggingFace folder (no optimizer "
                          "state); drop the flag")
    with open(os.path.join(base.path, "trainer_state.json")) as f:
        ts = json.load(f)
    now = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.zero_stage,
           cfg.derived.data_parallel_size, cfg.model.vocab_size)
    then = (base.tp, ts.get("zero_stage"), ts.get("data_parallel_size"), base.model.vocab_size)
    if now != then:
        raise ConfigError(f"{flag}: the base's optimizer state was saved with TP, ZeRO stage, D, "
                          f"vocab = {then}, this run has {now}; use the same layout or drop the "
                          "flag (fresh AdamW moments)")
    if cfg.cpt.freeze_embeddings or cfg.cpt.freeze_layers:
        raise ConfigError(f"{flag} cannot be combined with --freeze-embeddings/--freeze-layers "
                          "(the base's optimizer holds state for every parameter)")
    if not cfg.checkpoint.load:
        raise ConfigError(f"{flag} needs --load (this CPT run's own checkpoint folder, usually "
                          "the same as --save): the base's state is read on a fresh start only")


__all__ = ["ARCH_FIELDS", "CPT_DEFAULTS", "resolve_config"]
