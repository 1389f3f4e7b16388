"""LR schedule values at given steps, computed by hand from the documented formulas."""

import math

import pytest
import torch

from megatron_lite.config.derive import warmup_steps_from
from megatron_lite.training.schedules import LRScheduler, lr_at

BASE = dict(max_lr=1.0e-3, min_lr=1.0e-4, warmup_iters=4, decay_iters=14)


def test_warmup_reaches_peak_on_last_warmup_step():
    # u = 0..3: lr_max * (u + 1) / 4
    assert [lr_at(u, decay_style="cosine", **BASE) for u in range(4)] == \
        [2.5e-4, 5.0e-4, 7.5e-4, 1.0e-3]


def test_warmup_from_init_lr():
    assert lr_at(0, decay_style="linear", warmup_init=2e-4, **BASE) == pytest.approx(4e-4, abs=0)


@pytest.mark.parametrize("u,expected", [
    (4, 1.0e-3),                                   # t = 0
    (9, 1.0e-4 + 9.0e-4 * 0.5 * (1 + math.cos(math.pi * 0.5))),   # t = 0.5 -> 5.5e-4
    (14, 1.0e-4), (100, 1.0e-4)])                  # t = 1 and beyond
def test_cosine(u, expected):
    assert lr_at(u, decay_style="cosine", **BASE) == pytest.approx(expected, rel=1e-15)


def test_cosine_midpoint_hand_value():
    assert lr_at(9, decay_style="cosine", **BASE) == pytest.approx(5.5e-4, rel=1e-12)


@pytest.mark.parametrize("u,expected", [(4, 1.0e-3), (6, 8.2e-4), (9, 5.5e-4), (14, 1e-4),
                                        (20, 1e-4)])
def test_linear(u, expected):
    # t = (u - 4) / 10; lr = 1e-4 + 9e-4 * (1 - t)
    assert lr_at(u, decay_style="linear", **BASE) == pytest.approx(expected, rel=1e-12)


def test_constant():
    assert [lr_at(u, decay_style="constant", **BASE) for u in (3, 4, 13, 50)] == [1e-3] * 4


def test_inverse_square_root():
    # u >= W: max(min, 1e-3 * sqrt(4 / (u + 1))); u = 15 -> 1e-3 * 0.5
    assert lr_at(15, decay_style="inverse-square-root", **BASE) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(399, decay_style="inverse-square-root", **BASE) == pytest.approx(1e-4)
    assert lr_at(10 ** 6, decay_style="inverse-square-root", **BASE) == 1e-4   # floor at min


@pytest.mark.parametrize("style,u,expected", [
    ("linear", 10, 1e-3),          # stable until N - S = 10
    ("linear", 12, 5.5e-4),        # r = 0.5
    ("cosine", 12, 5.5e-4),
    ("exponential", 12, 1e-4 + 9e-4 * (2 * 0.5 ** 0.5 - 1)),
    ("minus_sqrt", 12, 1e-4 + 9e-4 * (1 - 0.5 ** 0.5)),
    ("linear", 14, 1e-4)])
def test_wsd(style, u, expected):
    got = lr_at(u, decay_style="wsd", wsd_decay_iters=4, wsd_decay_style=style, **BASE)
    assert got == pytest.approx(expected, rel=1e-12)


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
    assert seen[5] == seen[6] == pytest.approx(9.1e-4)   # u = 5 twice
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * seen[-1])
    state = s.state_dict()
    s2 = LRScheduler(torch.optim.AdamW([p]), decay_style="linear", **BASE)
    s2.load_state_dict(state)
    assert s2.num_updates == 7
    # Right after a resume the LR is the one the uninterrupted run uses next (u = 7).
    assert s2.apply() == s.apply() == pytest.approx(1e-4 + 9e-4 * (1 - 3 / 10))
    s3 = LRScheduler(torch.optim.AdamW([p]), decay_style="cosine", **BASE)
    with pytest.raises(ValueError, match="override-opt-param-scheduler"):
        s3.load_state_dict(state)
    s3.load_state_dict(state, override=True)
    assert s3.num_updates == 7
