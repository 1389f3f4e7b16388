"""--lr-scaling linear|sqrt --lr-reference LR@GB_TOK: exact peak LRs, precedence with --lr, the
plan line and the errors."""

from __future__ import annotations

import math

import pytest

from megatron_lite.config import ConfigError, parse_args
from megatron_lite.config.lr_scaling import (LRReference, derivation_line, parse_reference,
                                               resolve_peak_lr, scaled_lr)

# Tiny run: L_ctx 64, micro-batch 1, D 1 -> GB_tok = 64 x global batch.
BASE = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
        "--micro-batch-size", "1", "--train-iters", "10", "--device", "cpu"]


def test_parse_reference():
    assert parse_reference("3e-4@4194304") == LRReference(3e-4, 4194304)
    assert parse_reference("1.5e-4@4_194_304") == LRReference(1.5e-4, 4194304)
    for bad in ("3e-4", "3e-4@", "x@100", "3e-4@1.5", "-1@100", "3e-4@0", "1@2@3"):
        with pytest.raises(ValueError, match="--lr-reference"):
            parse_reference(bad)


@pytest.mark.parametrize("rule,tokens,expected", [
    # linear: 3e-4 x GB/GB_ref; sqrt: 3e-4 x sqrt(GB/GB_ref) (hand values, powers of 2)
    ("linear", 4194304, 3e-4), ("linear", 1048576, 7.5e-5), ("linear", 8388608, 6e-4),
    ("sqrt", 4194304, 3e-4), ("sqrt", 1048576, 1.5e-4), ("sqrt", 16777216, 6e-4),
    ("sqrt", 2097152, 3e-4 / math.sqrt(2))])
def test_scaled_lr_exact(rule, tokens, expected):
    assert scaled_lr(rule, LRReference(3e-4, 4194304), tokens) == pytest.approx(expected, rel=1e-15)


def test_derivation_line():
    ref = LRReference(3e-4, 4194304)
    assert derivation_line("sqrt", ref, 1048576) == \
        "sqrt: 0.0003 x sqrt(1048576 / 4194304) = 0.00015"
    assert derivation_line("linear", ref, 8388608) == \
        "linear: 0.0003 x (8388608 / 4194304) = 0.0006"


def test_resolve_precedence():
    # No scaling: --lr, else the default.
    assert resolve_peak_lr(None, None, None, 512, 3e-4) == 3e-4
    assert resolve_peak_lr(1e-3, None, None, 512, 3e-4) == 1e-3
    # Scaling: the derived value; an explicit equal --lr (a saved config.yaml) is accepted.
    assert resolve_peak_lr(None, "linear", "1e-3@1024", 512, 3e-4) == 5e-4
    assert resolve_peak_lr(5e-4, "linear", "1e-3@1024", 512, 3e-4) == 5e-4
    with pytest.raises(ValueError, match=r"--lr 0.001 contradicts --lr-scaling linear"):
        resolve_peak_lr(1e-3, "linear", "1e-3@1024", 512, 3e-4)
    with pytest.raises(ValueError, match="needs --lr-reference"):
        resolve_peak_lr(None, "sqrt", None, 512, 3e-4)
    with pytest.raises(ValueError, match="needs --lr-scaling"):
        resolve_peak_lr(None, None, "1e-3@1024", 512, 3e-4)


def test_config_derives_peak_and_min_lr_and_plan():
    from megatron_lite.config import format_plan

    cfg = parse_args(BASE + ["--global-batch-size", "16", "--lr-scaling", "sqrt",
                             "--lr-reference", "4e-4@256"])
    # GB_tok = 16 x 64 = 1024 = 4 x 256 -> sqrt(4) = 2 -> 8e-4; min LR 10 % of it.
    assert cfg.derived.global_batch_tokens == 1024
    assert cfg.optimizer.lr == pytest.approx(8e-4, rel=1e-15)
    assert cfg.optimizer.min_lr == pytest.approx(8e-5, rel=1e-15)
    plan = format_plan(cfg)
    assert "peak lr from scaling    : sqrt: 0.0004 x sqrt(1024 / 256) = 0.0008" in plan
    lin = parse_args(BASE + ["--global-batch-size", "16", "--lr-scaling", "linear",
                             "--lr-reference", "4e-4@256"])
    assert lin.optimizer.lr == pytest.approx(1.6e-3, rel=1e-15)
    # The default without any LR flag is unchanged.
    assert parse_args(BASE).optimizer.lr == 3e-4


def test_config_ramp_uses_final_batch():
    cfg = parse_args(BASE + ["--global-batch-size", "16", "--rampup-batch-size", "4", "4", "32",
                             "--lr-scaling", "linear", "--lr-reference", "1e-3@2048"])
    assert cfg.optimizer.lr == pytest.approx(5e-4, rel=1e-15)   # 1024 / 2048


def test_config_conflict_and_saved_config_roundtrip(tmp_path):
    import yaml

    with pytest.raises(ConfigError, match="contradicts --lr-scaling"):
        parse_args(BASE + ["--lr", "1e-3", "--lr-scaling", "sqrt", "--lr-reference", "4e-4@256"])
    with pytest.raises(ConfigError, match="needs --lr-reference"):
        parse_args(BASE + ["--lr-scaling", "sqrt"])
    # A resolved config written to YAML (lr filled with the derived value) relaunches as is.
    cfg = parse_args(BASE + ["--global-batch-size", "16", "--lr-scaling", "sqrt",
                             "--lr-reference", "4e-4@256"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = parse_args(["--config", str(path)])
    assert again.optimizer.lr == cfg.optimizer.lr and again.optimizer.lr_scaling == "sqrt"
