"""Data-parallel batch samplers that resume from ``consumed_samples``.

Both samplers cut one global stream of sample indices into micro-batches of ``m * D`` samples
(``m`` = micro batch size, ``D`` = data-parallel size); rank ``r`` takes the slice
``[r*m, (r+1)*m)`` of each. Because the stream does not depend on ``D``, a run resumed from
``consumed_samples`` continues with exactly the next samples, whatever ``D`` is now.
"""

from __future__ import annotations

from typing import Iterator, List

import numpy as np


def _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size):
    if total_samples <= 0:
        raise ValueError(f"no samples to draw from (total_samples={total_samples})")
    if micro_batch_size <= 0 or data_parallel_size <= 0:
        raise ValueError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                         f"({data_parallel_size}) must be positive")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")


class MegatronPretrainingSampler:
    """Sequential sampler (docs/interfaces.md "Samplers"); yields this rank's index lists.

    Micro-batch ``i`` after the resume point covers global samples
    ``[c + i*m*D, c + (i+1)*m*D)`` (``c = consumed_samples``); rank ``r`` gets
    ``[c + i*m*D + r*m, c + i*m*D + (r+1)*m)``. A trailing partial micro-batch is dropped
    (``drop_last=True``) or, with ``drop_last=False``, split evenly where possible.

    Args:
        total_samples: samples in the dataset (the epochs are already inside the dataset).
        consumed_samples: global samples already trained on.
        micro_batch_size: ``m``, samples per rank per micro-batch.
        data_parallel_rank: ``r``.
        data_parallel_size: ``D``.

    Raises:
        ValueError: bad sizes/rank, or ``consumed_samples >= total_samples``.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} >= total_samples {total_samples}: "
                             "the dataset is exhausted; build it with more samples (raise --train-iters / --train-tokens)")
        self.total_samples, self.consumed_samples = int(total_samples), int(consumed_samples)
        self.m, self.r, self.D, self.drop_last = micro_batch_size, data_parallel_rank, data_parallel_size, drop_last

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.m * self.D)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.m * self.D
        start = self.consumed_samples
        while start + step <= self.total_samples:
            yield list(range(start + self.r * self.m, start + (self.r + 1) * self.m))
            start += step
        rest = self.total_samples - start
        if rest > 0 and not self.drop_last:
            per = -(-rest // self.D)
            lo = start + self.r * per
            idx = list(range(lo, min(lo + per, self.total_samples)))
            if idx:
                yield idx


class MegatronPretrainingRandomSampler:
    """Endless shuffled sampler: epoch ``e`` is a permutation of the dataset seeded by ``(seed, e)``.

    The global stream is the concatenation of the epoch permutations (a micro-batch may straddle
    two epochs), so it is independent of ``D`` and resuming at ``consumed_samples`` (epoch
    ``consumed // total``, offset ``consumed % total``) continues exactly.

    Args:
        total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
        data_parallel_size: as for :class:`MegatronPretrainingSampler`.
        seed: permutation seed.
        num_micro_batches: stop after this many micro-batches (None: endless).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 1234,
                 num_micro_batches: int | None = None):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.total_samples, self.consumed_samples = int(total_samples), int(consumed_samples)
        self.m, self.r, self.D, self.seed = micro_batch_size, data_parallel_rank, data_parallel_size, seed
        self.num_micro_batches = num_micro_batches
        self._perm_epoch, self._perm = -1, None

    def _global(self, pos: int) -> int:
        e, off = divmod(pos, self.total_samples)
        if e != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, e]).permutation(self.total_samples)
            self._perm_epoch = e
        return int(self._perm[off])

    def __len__(self) -> int:
        if self.num_micro_batches is None:
            raise TypeError("endless sampler has no length")
        return self.num_micro_batches

    def __iter__(self) -> Iterator[List[int]]:
        start, done = self.consumed_samples, 0
        while self.num_micro_batches is None or done < self.num_micro_batches:
            lo = start + self.r * self.m
            yield [self._global(p) for p in range(lo, lo + self.m)]
            start += self.m * self.D
            done += 1
