"""Peak learning rate from a reference (LR, batch) pair: the linear and square-root scaling
rules.

``--lr-scaling linear|sqrt --lr-reference LR@GB_TOK`` says "``LR`` was a good peak learning rate at a
global batch of ``GB_TOK`` tokens"; this run's peak LR is derived for its own global batch
``GB_tok`` (tokens per optimizer step; with a batch-size ramp-up, the final batch):

    linear (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2.1):
        lr = LR_ref * GB_tok / GB_ref
    sqrt   (Krizhevsky 2014, "One weird trick", section 5; Malladi et al. 2022, "On the SDEs and
            Scaling Rules for Adaptive Gradient Algorithms", the square-root rule for Adam):
        lr = LR_ref * sqrt(GB_tok / GB_ref)

The linear rule is derived for SGD; for Adam-family optimizers the square-root rule is the one
with theoretical support, and the recipe treats both as starting points to verify by experiment.
"""

from __future__ import annotations

import dataclasses
import math

SCALING_RULES = ("linear", "sqrt")


@dataclasses.dataclass(frozen=True)
class LRReference:
    """A reference point: peak ``lr`` known to work at ``batch_tokens`` tokens per step."""

    lr: float
    batch_tokens: int


def parse_reference(text: str) -> LRReference:
    """Parse ``"LR@GB_TOK"`` (e.g. ``"3e-4@4194304"``; ``_`` allowed as digit separator).

    Raises:
        ValueError: not of the form ``LR@GB_TOK``, LR not a positive float, or GB_TOK not a
            positive integer (message names ``--lr-reference`` and gives an example).
    """
    example = "e.g. --lr-reference 3e-4@4194304 (peak LR 3e-4 at 4194304 tokens per step)"
    parts = str(text).split("@")
    if len(parts) != 2:
        raise ValueError(f"--lr-reference {text!r}: expected LR@GB_TOK, {example}")
    try:
        lr = float(parts[0])
        tok_f = float(parts[1].replace("_", ""))
    except ValueError:
        raise ValueError(f"--lr-reference {text!r}: LR and GB_TOK must be numbers, {example}") \
            from None
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr-reference {text!r}: LR must be > 0, {example}")
    if not (math.isfinite(tok_f) and tok_f > 0 and tok_f == int(tok_f)):
        raise ValueError(f"--lr-reference {text!r}: GB_TOK must be a positive whole number of "
                         f"tokens, {example}")
    return LRReference(lr=lr, batch_tokens=int(tok_f))


def scaled_lr(rule: str, ref: LRReference, batch_tokens: int) -> float:
    """Peak LR for ``batch_tokens`` tokens per step under ``rule`` (see module doc for sources).

    Args:
        rule: ``"linear"`` or ``"sqrt"``.
        ref: the reference point.
        batch_tokens: this run's GB_tok (tokens per optimizer step, > 0).

    Returns:
        ``ref.lr * k`` with ``k = GB_tok / GB_ref`` (linear) or ``sqrt(GB_tok / GB_ref)`` (sqrt).

    Raises:
        ValueError: unknown rule or non-positive batch.
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"--lr-scaling {rule!r}: choose one of {SCALING_RULES}")
    if batch_tokens <= 0:
        raise ValueError(f"global batch must be > 0 tokens (got {batch_tokens})")
    ratio = batch_tokens / ref.batch_tokens
    return ref.lr * (ratio if rule == "linear" else math.sqrt(ratio))


def derivation_line(rule: str, ref: LRReference, batch_tokens: int) -> str:
    """One printable line showing the derivation, e.g.
    ``sqrt: 3e-04 x sqrt(1048576 / 4194304) = 1.5e-04``."""
    lr = scaled_lr(rule, ref, batch_tokens)
    if rule == "linear":
        return f"linear: {ref.lr:g} x ({batch_tokens} / {ref.batch_tokens}) = {lr:.6g}"
    return f"sqrt: {ref.lr:g} x sqrt({batch_tokens} / {ref.batch_tokens}) = {lr:.6g}"


def resolve_peak_lr(lr: float | None, rule: str | None, reference: str | None,
                    batch_tokens: int, default_lr: float) -> float:
    """The run's peak LR from ``--lr`` / ``--lr-scaling`` / ``--lr-reference``.

    Precedence: without ``--lr-scaling`` the LR is ``--lr`` (``default_lr`` when not given). With
    it, the derived value is used; an explicit ``--lr`` alongside is accepted only when it equals
    the derived value (relative difference <= 1e-9: a saved config.yaml records the derived LR),
    otherwise it is an error, never silently overridden.

    Raises:
        ValueError: ``--lr-scaling`` without ``--lr-reference`` or the reverse, a bad reference,
            or a contradicting ``--lr`` (message names both flags and the derived value).
    """
    if rule is None and reference is None:
        return default_lr if lr is None else lr
    if rule is None:
        raise ValueError("--lr-reference needs --lr-scaling linear|sqrt (the rule to apply)")
    if reference is None:
        raise ValueError(f"--lr-scaling {rule} needs --lr-reference LR@GB_TOK (e.g. 3e-4@4194304)")
    ref = parse_reference(reference)
    derived = scaled_lr(rule, ref, batch_tokens)
    if lr is not None and abs(lr - derived) > 1e-9 * derived:
        raise ValueError(f"--lr {lr:g} contradicts --lr-scaling {rule} --lr-reference {reference}, "
                         f"which gives {derivation_line(rule, ref, batch_tokens)} for GB_tok = "
                         f"{batch_tokens}; drop --lr or drop --lr-scaling/--lr-reference")
    return derived
