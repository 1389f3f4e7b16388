"""Batch-size ramp-up: the ramp arithmetic (Megatron-LM's meaning), validation, the sample-counted
LR schedule, and the real loop under torchrun (consumed tokens per step equal the hand sum; a
resume in the middle of the ramp reproduces the uninterrupted run's losses bit for bit).

The end-to-end runs share one torchrun launch with tests/test_optimizers.py (fixture ``dyn``).
"""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest

from megatron_lite.config import ConfigError, parse_args
from megatron_lite.config.batch_ramp import BatchRamp, make_ramp
from megatron_lite.training.schedules import LRScheduler, lr_at, lr_at_samples
from tests.test_optimizers import RAMP_ARGS, dyn, read_metrics  # noqa: F401  (shared fixture)

BASE = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
        "--micro-batch-size", "1", "--device", "cpu"]


def megatron_batch(c, start, inc, R, gb):
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, written out (float form)."""
    n = (gb - start) // inc
    if c > R or n == 0:
        return gb
    return start + int(c / (R / n)) * inc


def test_batch_at_matches_megatron_formula():
    for start, inc, R, gb in [(2, 2, 12, 8), (16, 16, 1000, 128), (4, 4, 7, 20), (8, 8, 0, 8),
                              (32, 32, 96_000, 1536)]:
        ramp = BatchRamp(start, inc, R, gb)
        for c in list(range(0, 3 * R + 3)) if R < 2000 else range(0, 3 * R, 97):
            assert ramp.batch_at(c) == megatron_batch(c, start, inc, R, gb), (start, inc, R, c)


def test_hand_schedule():
    # 2 -> 8 by 2 over 12 samples: n = 3 increments, one every 4 samples.
    ramp = BatchRamp(2, 2, 12, 8)
    assert ramp.schedule(7) == [(0, 2), (2, 2), (4, 4), (8, 6), (14, 8), (22, 8), (30, 8)]
    assert [ramp.consumed_after(s) for s in range(8)] == [0, 2, 4, 8, 14, 22, 30, 38]
    assert [ramp.steps_for(x) for x in (0, 1, 2, 3, 4, 5, 14, 15, 38)] == \
        [0, 1, 1, 2, 2, 3, 4, 5, 7]


def test_consumed_after_and_steps_for_equal_brute_force():
    for start, inc, R, gb in itertools.product((1, 3, 8), (1, 2, 5), (0, 1, 17, 100), (8, 13, 40)):
        if start > gb or (gb - start) % inc:
            continue
        ramp = BatchRamp(start, inc, R, gb)
        sched = ramp.schedule(60)
        cum = [0]
        for _, b in sched:
            cum.append(cum[-1] + b)
        assert [ramp.consumed_after(s) for s in range(61)] == cum
        for x in range(0, cum[-1] + 1, 3):
            assert ramp.steps_for(x) == next(s for s, v in enumerate(cum) if v >= x)


def test_make_ramp_validation():
    m = 4  # micro_batch_size x D
    assert make_ramp(None, None, 16, 64, m) is None
    assert make_ramp([4, 4, 100], None, 16, 64, m) == BatchRamp(4, 4, 100, 16)
    # Token form: 256 512 6400 tokens at L_ctx 64 = 4 8 100 samples.
    assert make_ramp(None, [256, 512, 6400], 20, 64, m) == BatchRamp(4, 8, 100, 20)
    cases = [
        (([4, 4, 10], [256, 256, 640]), "not both"),
        (([2, 2, 10], None), r"START 2 samples is not a multiple of micro_batch_size x D = 4"),
        (([4, 6, 10], None), r"global batch 16 - START 4 = 12 samples is not a multiple of "
                             r"INCREMENT 6|INCREMENT 6 samples is not a multiple"),
        (([20, 4, 10], None), "START 20 exceeds the global batch 16"),
        (([0, 4, 10], None), "must be > 0"),
        ((None, [256, 300, 640]), "300 is not a multiple of --seq-length 64"),
    ]
    for (sz, tok), msg in cases:
        with pytest.raises(ValueError, match=msg):
            make_ramp(sz, tok, 16, 64, m)
    with pytest.raises(ValueError, match=r"INCREMENT 2 samples is not a multiple .* = 4"):
        make_ramp([4, 2, 10], None, 16, 64, m)


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"--rampup-batch-size 2 2 12: START 2 samples is not a "
                                          r"multiple of micro_batch_size x D = 4"):
        parse_args(BASE + ["--global-batch-size", "8", "--train-iters", "5",
                           "--rampup-batch-size", "2", "2", "12"], world_size=4)
    with pytest.raises(ConfigError, match="expected 3 argument"):
        parse_args(BASE + ["--train-iters", "5", "--rampup-batch-size", "2", "2"])


def test_run_length_with_ramp():
    # --train-iters: that many steps, tokens summed over the ramp.
    cfg = parse_args(BASE + ["--global-batch-size", "8", "--train-iters", "7"] + RAMP_ARGS,
                     world_size=2)
    assert cfg.derived.train_iters == 7 and cfg.derived.train_tokens == 38 * 64
    assert cfg.derived.global_batch_size == 8 and cfg.derived.num_micro_batches == 4  # final
    # --train-tokens: fewest steps reaching ceil(T / L_ctx) samples: 15 samples -> 5 steps (22).
    cfg = parse_args(BASE + ["--global-batch-size", "8", "--train-tokens", str(15 * 64 - 10)]
                     + RAMP_ARGS, world_size=2)
    assert cfg.derived.train_iters == 5 and cfg.derived.train_tokens == 22 * 64
    # The token form of the same ramp resolves identically.
    tok = parse_args(BASE + ["--global-batch-size", "8", "--train-iters", "7",
                             "--rampup-batch-tokens", "128", "128", "768"], world_size=2)
    assert tok.derived.train_tokens == 38 * 64
    # Warmup in tokens during a ramp: the steps that consume them (5 samples -> 3 steps).
    w = parse_args(BASE + ["--global-batch-size", "8", "--train-iters", "7",
                           "--lr-warmup-tokens", str(5 * 64)] + RAMP_ARGS, world_size=2)
    assert w.derived.lr_warmup_iters == 3


def test_plan_shows_ramp():
    from megatron_lite.config import format_plan

    plan = format_plan(parse_args(BASE + ["--global-batch-size", "8", "--train-iters", "7"]
                                  + RAMP_ARGS, world_size=2))
    assert "batch ramp-up           : 2 -> 8 samples by 2 over 12 samples (4 steps)" in plan
    assert "from step       3 (consumed 4 samples): GB 4 samples = 256 tokens, A 2, 1 step" \
        in plan
    assert "from step       5 (consumed 14 samples): GB 8 samples = 512 tokens, A 4, to the end" \
        in plan


def test_sample_schedule_reduces_to_step_schedule():
    # Constant batch b: s = u * b and every length x b -> the step formulas exactly.
    b = 12
    for style in ("cosine", "linear", "constant", "inverse-square-root", "wsd"):
        for u in range(0, 30):
            want = lr_at(u, max_lr=1e-3, min_lr=1e-4, warmup_iters=4, decay_iters=20,
                         decay_style=style, wsd_decay_iters=6)
            got = lr_at_samples(u * b, b, max_lr=1e-3, min_lr=1e-4, warmup_samples=4 * b,
                                decay_samples=20 * b, decay_style=style, unit=b,
                                wsd_decay_samples=6 * b)
            assert got == pytest.approx(want, rel=1e-14), (style, u)


class _Opt:
    param_groups = [{"lr": 0.0}]


def test_scheduler_counts_samples_during_ramp():
    # Ramp 2 -> 8 (schedule 2, 2, 4, 6, 8, 8, 8); warmup 2 steps = 4 samples; decay 7 steps =
    # 38 samples; linear. Hand values: update k uses F at n = s + b, s = samples applied before
    # it, b its batch (one convention in both phases: step 2 ends the warmup at the peak, step 7
    # reaches min_lr).
    ramp = BatchRamp(2, 2, 12, 8)
    sch = LRScheduler(_Opt(), max_lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=7,
                      decay_style="linear", ramp=ramp)
    assert sch.sample_params["warmup_samples"] == 4 and sch.sample_params["decay_samples"] == 38
    lrs = []
    for c, b in ramp.schedule(7):
        sch.set_batch(b)
        lrs.append(sch.apply())
        sch.advance()
    expected = [1.0 * 2 / 4, 1.0 * 4 / 4]                       # warmup: (s + b) / W_s
    expected += [0.1 + 0.9 * (1 - (n - 4) / 34) for n in (8, 14, 22, 30, 38)]
    assert lrs == pytest.approx(expected, rel=1e-14)
    st = sch.state_dict()
    assert st["num_samples"] == 38 and st["num_updates"] == 7
    other = LRScheduler(_Opt(), max_lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=7,
                        decay_style="linear", ramp=BatchRamp(4, 4, 12, 8))
    with pytest.raises(ValueError, match="ramp warmup_samples"):
        other.load_state_dict(st)


# ----------------------------------------------------------------------------- end to end
def test_consumed_tokens_per_step_equal_hand_sum(dyn):
    root, results, _ = dyn
    m = read_metrics(os.path.join(root, "ramp.jsonl"))
    sizes = [2, 2, 4, 6, 8, 8, 8]                  # hand: 2 -> 8 by 2 every 4 samples
    assert sorted(m) == list(range(1, 8))
    for step, b in enumerate(sizes, 1):
        assert m[step]["global_batch_size"] == b
        assert m[step]["consumed_samples"] == sum(sizes[:step])
        assert m[step]["consumed_tokens"] == 64 * sum(sizes[:step])
    assert results["ramp"]["consumed_samples"] == 38 and results["ramp"]["iteration"] == 7
    # The LR is the sample-counted schedule (warmup 2 steps = 4 samples, cosine to step 7 =
    # 38 samples, lr 3e-3 -> min 3e-4).
    for step, b in enumerate(sizes, 1):
        s = sum(sizes[:step - 1])
        n = s + b                  # samples applied after this update (one convention)
        want = (3e-3 * n / 4 if n <= 4 else
                3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * (n - 4) / 34)))
        assert m[step]["lr"] == pytest.approx(want, rel=1e-12)
    assert all(math.isfinite(m[s]["loss"]) for s in m)
    # The data is the plain sample stream: step k reads exactly the next B_k samples (both DP
    # ranks together), so nothing is repeated or skipped when A changes.
    ids: dict[int, list[int]] = {}
    for rank in (0, 1):
        with open(os.path.join(root, f"ids.rank{rank}")) as f:
            for line in f:
                rec = json.loads(line)
                ids.setdefault(rec["step"], []).extend(rec["sample_ids"])
    for step, b in enumerate(sizes, 1):
        start = sum(sizes[:step - 1])
        assert sorted(ids[step]) == list(range(start, start + b)), step


def test_resume_mid_ramp_is_bitwise(dyn):
    root, results, _ = dyn
    full = read_metrics(os.path.join(root, "ramp.jsonl"))
    a = read_metrics(os.path.join(root, "ramp_a.jsonl"))
    b = read_metrics(os.path.join(root, "ramp_b.jsonl"))
    assert sorted(a) == [1, 2, 3] and sorted(b) == [4, 5, 6, 7]   # stopped at batch 4 -> 6
    for step in range(1, 8):
        r = a.get(step) or b[step]
        assert r["loss"] == full[step]["loss"], step           # bit for bit on CPU
        assert r["lr"] == full[step]["lr"] and r["consumed_tokens"] == full[step]["consumed_tokens"]


@pytest.mark.parametrize("run", ["ramp_z0", "ramp_z2"])
def test_ramp_same_losses_at_other_zero_stages(dyn, run):
    root, _, _ = dyn
    ref = read_metrics(os.path.join(root, "ramp.jsonl"))
    other = read_metrics(os.path.join(root, f"{run}.jsonl"))
    assert sorted(other) == sorted(ref)
    for step in ref:   # same math, other reduction order: equal to float32 rounding
        assert other[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert other[step]["consumed_tokens"] == ref[step]["consumed_tokens"]
        assert other[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step
