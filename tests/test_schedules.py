"""LR schedule values at given steps, computed by hand from the documented formulas."""

import math

import pytest
import torch

from megatron_lite.config.derive import warmup_steps_from
from megatron_lite.training.schedules import LRScheduler, lr_at, lr_at_step

BASE = dict(max_lr=1.0e-3, min_lr=1.0e-4, warmup_iters=4, decay_iters=14)


def test_warmup_reaches_peak_on_last_warmup_step():
    # Steps 1..4 (u = 0..3): lr_max * n / 4
    assert [lr_at(u, decay_style="cosine", **BASE) for u in range(4)] == \
        [2.5e-4, 5.0e-4, 7.5e-4, 1.0e-3]


def test_warmup_from_init_lr():
    assert lr_at(0, decay_style="linear", warmup_init=2e-4, **BASE) == pytest.approx(4e-4, abs=0)


# One convention for every phase (issue 14): step n = u + 1 uses F(n); the peak is reached on
# step W = 4 and held for that step only, lr_min is reached on step N = 14 (u = 13).
@pytest.mark.parametrize("u,expected", [
    (3, 1.0e-3),                                   # n = 4: end of warmup, t = 0
    (4, 1.0e-4 + 9.0e-4 * 0.5 * (1 + math.cos(math.pi * 0.1))),   # n = 5: t = 0.1
    (8, 1.0e-4 + 9.0e-4 * 0.5 * (1 + math.cos(math.pi * 0.5))),   # n = 9: t = 0.5 -> 5.5e-4
    (13, 1.0e-4), (100, 1.0e-4)])                  # n = 14: t = 1, and beyond
def test_cosine(u, expected):
    assert lr_at(u, decay_style="cosine", **BASE) == pytest.approx(expected, rel=1e-15)


def test_cosine_midpoint_hand_value():
    assert lr_at(8, decay_style="cosine", **BASE) == pytest.approx(5.5e-4, rel=1e-12)


@pytest.mark.parametrize("u,expected", [(3, 1.0e-3), (5, 8.2e-4), (8, 5.5e-4), (13, 1e-4),
                                        (20, 1e-4)])
def test_linear(u, expected):
    # n = u + 1, t = (n - 4) / 10; lr = 1e-4 + 9e-4 * (1 - t)
    assert lr_at(u, decay_style="linear", **BASE) == pytest.approx(expected, rel=1e-12)


def test_constant():
    assert [lr_at(u, decay_style="constant", **BASE) for u in (3, 4, 13, 50)] == [1e-3] * 4


def test_inverse_square_root():
    # W < n <= N: max(min, 1e-3 * sqrt(4 / n)); n = 9 -> 1e-3 * 2/3; beyond N = 14: min.
    assert lr_at(8, decay_style="inverse-square-root", **BASE) == pytest.approx(2e-3 / 3,
                                                                               rel=1e-12)
    assert lr_at(13, decay_style="inverse-square-root", **BASE) == pytest.approx(
        1e-3 * math.sqrt(4 / 14), rel=1e-12)
    assert lr_at(14, decay_style="inverse-square-root", **BASE) == 1e-4
    big = dict(BASE, decay_iters=10 ** 7)
    assert lr_at(399, decay_style="inverse-square-root", **big) == pytest.approx(1e-4)   # n=400
    assert lr_at(10 ** 6, decay_style="inverse-square-root", **big) == 1e-4   # floor at min


@pytest.mark.parametrize("style,u,expected", [
    ("linear", 9, 1e-3),           # n = 10: stable until N - S = 10
    ("linear", 11, 5.5e-4),        # n = 12: r = 0.5
    ("cosine", 11, 5.5e-4),
    ("exponential", 11, 1e-4 + 9e-4 * (2 * 0.5 ** 0.5 - 1)),
    ("minus_sqrt", 11, 1e-4 + 9e-4 * (1 - 0.5 ** 0.5)),
    ("linear", 13, 1e-4),          # n = 14 = N: r = 1
    ("exponential", 13, 1e-4), ("minus_sqrt", 13, 1e-4), ("cosine", 13, 1e-4)])
def test_wsd(style, u, expected):
    got = lr_at(u, decay_style="wsd", wsd_decay_iters=4, wsd_decay_style=style, **BASE)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-18)


# ----------------------------------------------------------------------- whole sequences
def _hand_sequence(style, W, N, lr_max, lr_min, steps, S=0, lr0=0.0):
    """The documented formulas, written out per step n = 1..steps (no code shared)."""
    out = []
    for n in range(1, steps + 1):
        if W and n <= W:
            out.append(lr0 + (lr_max - lr0) * n / W)
        elif style == "constant":
            out.append(lr_max)
        elif n > N:
            out.append(lr_min)
        elif style == "linear":
            out.append(lr_min + (lr_max - lr_min) * (1 - (n - W) / (N - W)))
        elif style == "cosine":
            out.append(lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * (n - W) / (N - W)))
                       / 2)
        elif style == "inverse-square-root":
            out.append(max(lr_min, lr_max * math.sqrt(max(W, 1) / n)))
        elif style == "wsd":           # linear cool-down
            out.append(lr_max if n <= N - S else lr_min + (lr_max - lr_min) * (1 - (n - N + S) / S))
    return out


def test_issue_example_cosine_sequence():
    # --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 3 --lr-decay-style cosine --train-iters 12
    kw = dict(max_lr=3e-3, min_lr=3e-4, warmup_iters=3, decay_iters=12, decay_style="cosine")
    got = [lr_at(u, **kw) for u in range(12)]
    want = [1e-3, 2e-3, 3e-3] + [3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * k / 9))
                                 for k in range(1, 10)]
    assert got == pytest.approx(want, rel=1e-14)
    # Rounded as the issue lists them: the peak once, the last step at --min-lr.
    assert [round(x, 7) for x in got] == [0.001, 0.002, 0.003, 0.0029186, 0.0026842, 0.002325,
                                          0.0018844, 0.0014156, 0.000975, 0.0006158, 0.0003814,
                                          0.0003]
    assert sum(x == pytest.approx(3e-3, rel=1e-14) for x in got) == 1 and got[-1] == 3e-4


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd", "inverse-square-root", "constant"])
@pytest.mark.parametrize("W", [0, 3])
def test_whole_sequence_by_hand_and_megatron_values(style, W):
    N, steps = 12, 15
    kw = dict(max_lr=3e-3, min_lr=3e-4, warmup_iters=W, decay_iters=N, decay_style=style,
              wsd_decay_iters=4, warmup_init=1e-4)
    want = _hand_sequence(style, W, N, 3e-3, 3e-4, steps, S=4, lr0=1e-4)
    assert [lr_at(u, **kw) for u in range(steps)] == pytest.approx(want, rel=1e-14)
    if style not in ("constant", "inverse-square-root"):
        assert lr_at(N - 1, **kw) == 3e-4                    # the last step reaches --min-lr
    if W:
        assert lr_at(W - 1, **kw) == pytest.approx(3e-3, rel=1e-14)   # step W: the peak
        if style in ("cosine", "linear", "inverse-square-root"):
            assert lr_at(W, **kw) < 3e-3                              # held for one step only
    # Megatron-LM's OptimizerParamScheduler at num_steps = n, n = 0..steps: lr_at_step(n).
    assert [lr_at_step(n, **kw) for n in range(1, steps + 1)] == \
        [lr_at(u, **kw) for u in range(steps)]
    assert [lr_at_step(n, **kw) for n in range(0, steps + 1)] == \
        [_megatron_get_lr(n, style, W, N, 3e-3, 3e-4, 1e-4, 4) for n in range(0, steps + 1)]


def _megatron_get_lr(num_steps, style, W, N, max_lr, min_lr, init_lr, wsd_steps):
    """Megatron-LM ``OptimizerParamScheduler.get_lr`` (megatron/core/optimizer_param_scheduler.py)
    restated branch by branch (WSD with a linear cool-down)."""
    if W > 0 and num_steps <= W:
        return init_lr + (max_lr - init_lr) * float(num_steps) / float(W)
    if style == "constant":
        return max_lr
    if num_steps > N:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * max(W, 1) ** 0.5 / (max(num_steps, 1) ** 0.5))
    ratio = float(num_steps - W) / float(N - W)
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        start = N - wsd_steps
        coeff = 1.0 if num_steps <= start else 1.0 - float(num_steps - start) / wsd_steps
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd", "inverse-square-root", "constant"])
@pytest.mark.parametrize("stop", [1, 7])          # in the middle of warmup, of decay
def test_resume_mid_warmup_and_mid_decay(style, stop):
    kw = dict(max_lr=3e-3, min_lr=3e-4, warmup_iters=3, decay_iters=12, decay_style=style,
              wsd_decay_iters=4)
    p = torch.nn.Parameter(torch.zeros(1))
    full = LRScheduler(torch.optim.SGD([p], lr=0.0), **kw)
    seq = []
    for _ in range(12):
        seq.append(full.apply())
        full.advance()
    assert seq == pytest.approx(_hand_sequence(style, 3, 12, 3e-3, 3e-4, 12, S=4), rel=1e-14)
    a = LRScheduler(torch.optim.SGD([p], lr=0.0), **kw)
    for _ in range(stop):
        a.apply()
        a.advance()
    b = LRScheduler(torch.optim.SGD([p], lr=0.0), **kw)
    b.load_state_dict(a.state_dict())
    rest = []
    for _ in range(12 - stop):
        rest.append(b.apply())
        b.advance()
    assert rest == seq[stop:]


def _hand_ramp_sequence(style, sizes, W_s, N_s, S_s, GB, lr_max=1.0, lr_min=0.1):
    """Sample-counted F at n = samples applied after each update (documented formulas)."""
    out, s = [], 0
    for b in sizes:
        n = s + b
        if n <= W_s:
            out.append(lr_max * n / W_s)
        elif style == "constant":
            out.append(lr_max)
        elif style == "linear":
            out.append(lr_min + (lr_max - lr_min) * (1 - (n - W_s) / (N_s - W_s)))
        elif style == "cosine":
            out.append(lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos(math.pi * (n - W_s)
                                                                          / (N_s - W_s))))
        elif style == "inverse-square-root":
            out.append(max(lr_min, lr_max * math.sqrt(max(W_s, GB) / max(n, GB))))
        else:
            start = N_s - S_s
            out.append(lr_max if n <= start else lr_min + (lr_max - lr_min) * (1 - (n - start)
                                                                                / S_s))
        s += b
    return out


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd", "inverse-square-root", "constant"])
def test_ramp_sequence_by_hand_reaches_peak_and_min(style):
    from megatron_lite.config.batch_ramp import BatchRamp

    # Ramp 2 -> 8 by 2 every 4 samples: batches 2, 2, 4, 6, 8, 8, 8 (samples after: 2, 4, 8,
    # 14, 22, 30, 38). Warmup 2 steps = 4 samples, decay 7 steps = 38, WSD 3 steps = 38 - 14.
    ramp = BatchRamp(2, 2, 12, 8)
    sizes = [b for _, b in ramp.schedule(7)]
    assert sizes == [2, 2, 4, 6, 8, 8, 8]
    p = torch.nn.Parameter(torch.zeros(1))
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=7, decay_style=style,
              wsd_decay_iters=3, ramp=ramp)
    sch = LRScheduler(torch.optim.SGD([p], lr=0.0), **kw)
    got = []
    for i, b in enumerate(sizes):
        if i == 3:                               # resume in the middle of the decay
            st = sch.state_dict()
            sch = LRScheduler(torch.optim.SGD([p], lr=0.0), **kw)
            sch.load_state_dict(st)
        sch.set_batch(b)
        got.append(sch.apply())
        sch.advance()
    want = _hand_ramp_sequence(style, sizes, 4, 38, 24, 8)
    assert got == pytest.approx(want, rel=1e-14)
    assert got[1] == 1.0                          # step W = 2 ends the warmup at the peak
    if style in ("cosine", "linear", "wsd"):
        assert got[-1] == pytest.approx(0.1, rel=1e-14)   # step N = 7 reaches --min-lr
    assert max(got) <= 1.0


def test_warmup_variants():
    assert warmup_steps_from(7, None, None, 4096, 100) == 7
    assert warmup_steps_from(None, 10_000, None, 4096, 100) == 3      # ceil(10000 / 4096)
    assert warmup_steps_from(None, None, 0.015, 4096, 1000) == 15
    assert warmup_steps_from(None, None, None, 4096, 1000) == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, decay_style="cosine", max_lr=1, min_lr=0, warmup_iters=5, decay_iters=4)
    with pytest.raises(ValueError, match="style"):
        lr_at(0, decay_style="step", **BASE)
    with pytest.raises(ValueError, match="wsd decay length"):
        lr_at(0, decay_style="wsd", wsd_decay_iters=11, **BASE)


def test_scheduler_skip_and_resume():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [], "lr_mult": 0.5}])
    s = LRScheduler(opt, decay_style="linear", **BASE)
    seen = []
    for step in range(8):
        seen.append(s.apply())
        if step != 5:          # step 5 is skipped: the schedule does not advance
            s.advance()
    assert seen[5] == seen[6] == pytest.approx(8.2e-4)   # u = 5 (step 6) twice
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * seen[-1])
    state = s.state_dict()
    s2 = LRScheduler(torch.optim.AdamW([p]), decay_style="linear", **BASE)
    s2.load_state_dict(state)
    assert s2.num_updates == 7
    # Right after a resume the LR is the one the uninterrupted run uses next (u = 7, step 8).
    assert s2.apply() == s.apply() == pytest.approx(1e-4 + 9e-4 * (1 - 4 / 10))
    s3 = LRScheduler(torch.optim.AdamW([p]), decay_style="cosine", **BASE)
    with pytest.raises(ValueError, match="override-opt-param-scheduler"):
        s3.load_state_dict(state)
    s3.load_state_dict(state, override=True)
    assert s3.num_updates == 7
