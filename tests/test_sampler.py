"""DP samplers: interface layout, resume from consumed_samples across epochs and DP size changes."""

import itertools

import pytest

from megatron_lite.data.sampler import MegatronPretrainingRandomSampler, MegatronPretrainingSampler


def test_layout_per_interface():
    s = MegatronPretrainingSampler(20, 4, 2, 1, 2)
    assert list(s) == [[6, 7], [10, 11], [14, 15], [18, 19]] and len(s) == 4
    assert list(MegatronPretrainingSampler(20, 4, 2, 0, 2)) == [[4, 5], [8, 9], [12, 13], [16, 17]]
    assert list(MegatronPretrainingSampler(7, 0, 2, 1, 2)) == [[2, 3]]  # partial tail dropped
    assert list(MegatronPretrainingSampler(7, 0, 2, 1, 2, drop_last=False)) == [[2, 3], [6]]


def _global_steps(cls, total, consumed, m, D, steps, **kw):
    its = [iter(cls(total, consumed, m, r, D, **kw)) for r in range(D)]
    return [list(itertools.chain.from_iterable(next(it) for it in its)) for _ in range(steps)]


@pytest.mark.parametrize("cls,kw", [(MegatronPretrainingSampler, {}),
                                    (MegatronPretrainingRandomSampler, {"seed": 5})])
def test_resume_with_dp_size_change(cls, kw):
    full = list(itertools.chain.from_iterable(_global_steps(cls, 48, 0, 2, 2, 12, **kw)))
    first = list(itertools.chain.from_iterable(_global_steps(cls, 48, 0, 2, 2, 3, **kw)))  # 12 samples
    rest = list(itertools.chain.from_iterable(_global_steps(cls, 48, 12, 2, 3, 6, **kw)))  # D 2 -> 3
    assert first + rest == full
    rest4 = list(itertools.chain.from_iterable(_global_steps(cls, 48, 12, 1, 4, 9, **kw)))  # m=1, D=4
    assert first + rest4 == full


def test_random_sampler_epochs_and_resume_across_boundary():
    total = 10
    stream = list(itertools.chain.from_iterable(
        _global_steps(MegatronPretrainingRandomSampler, total, 0, 2, 2, 10, seed=3)))  # 4 epochs
    for e in range(4):  # every epoch is a permutation of the dataset
        assert sorted(stream[e * total:(e + 1) * total]) == list(range(total))
    assert stream[:total] != stream[total:2 * total]  # reshuffled per epoch
    # resume at 8: the next micro-batch straddles the boundary of epochs 0 and 1
    resumed = list(itertools.chain.from_iterable(
        _global_steps(MegatronPretrainingRandomSampler, total, 8, 2, 2, 5, seed=3)))
    assert resumed == stream[8:28]
    lim = MegatronPretrainingRandomSampler(total, 0, 2, 0, 2, num_micro_batches=3)
    assert len(lim) == 3 and len(list(lim)) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="data_parallel_rank 2 not in"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="exhausted"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="no samples"):
        MegatronPretrainingRandomSampler(0, 0, 1, 0, 1)
