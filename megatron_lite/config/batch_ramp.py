"""Batch-size ramp-up: the global batch of every step as a function of consumed samples.

``--rampup-batch-size START INCREMENT RAMPUP_SAMPLES`` has Megatron-LM's meaning
(``megatron/core/num_microbatches_calculator.py``, ``RampupBatchsizeNumMicroBatchesCalculator``):
the global batch starts at ``START`` samples and grows by ``INCREMENT`` samples every
``RAMPUP_SAMPLES / n`` consumed samples, ``n = (GB - START) / INCREMENT`` increments, until it
reaches ``GB`` (``--global-batch-size`` / ``--global-batch-tokens``). With ``c`` the samples
consumed before a step, that step's batch is

    B(c) = GB                                       if c >= RAMPUP_SAMPLES (or n == 0)
    B(c) = START + INCREMENT * floor(c * n / RAMPUP_SAMPLES)   otherwise

(integer arithmetic: Megatron evaluates ``int(c / (RAMPUP_SAMPLES / n))`` in floating point; the
two agree except where that float division rounds across an integer). The token form
``--rampup-batch-tokens START_TOK INCREMENT_TOK RAMPUP_TOKENS`` is the same ramp given in tokens,
each a multiple of ``--seq-length`` (samples = tokens / L_ctx). Every size ``B(c)`` must be a
multiple of ``micro_batch_size x D`` so that ``A(c) = B(c) / (micro_batch_size x D)`` micro-batches
are accumulated per step; the data stream is the plain sample stream, so samples are neither
repeated nor skipped when the batch changes.

Run length with a ramp: ``--train-iters N`` trains N steps (``consumed_after(N)`` samples);
``--train-tokens T`` trains the fewest steps whose samples reach ``ceil(T / L_ctx)``. The LR
schedule is counted in samples during a ramp (see :mod:`megatron_lite.training.schedules`).

All functions here are pure (no torch, no process groups) so the arithmetic is exactly testable.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """A ramp from ``start`` to ``final`` samples per step over ``rampup_samples`` samples.

    Attributes:
        start: first global batch (samples).
        increment: growth per increment (samples).
        rampup_samples: consumed samples by which the batch reaches ``final``.
        final: the target global batch GB (samples).
    """

    start: int
    increment: int
    rampup_samples: int
    final: int

    @property
    def num_increments(self) -> int:
        """n = (final - start) / increment."""
        return (self.final - self.start) // self.increment

    def batch_at(self, consumed: int) -> int:
        """Global batch (samples) of the step that starts after ``consumed`` samples."""
        n = self.num_increments
        if n == 0 or consumed >= self.rampup_samples:
            return self.final
        return self.start + self.increment * (int(consumed) * n // self.rampup_samples)

    def _segments(self) -> Iterator[tuple[int, int, int]]:
        """Yield ``(first_consumed, batch, steps)`` for each constant-batch stretch of the ramp,
        then ``(c, final, -1)`` (unbounded) for the rest of the run."""
        c, n, R = 0, self.num_increments, self.rampup_samples
        while n and c < R:
            b = self.batch_at(c)
            if b == self.final:
                break
            k = c * n // R
            end = -(-(k + 1) * R // n)   # first consumed count with floor(c * n / R) >= k + 1
            steps = -(-(end - c) // b)
            yield c, b, steps
            c += steps * b
        yield c, self.final, -1

    def consumed_after(self, steps: int) -> int:
        """Samples consumed by the first ``steps`` steps (exact; O(number of increments))."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (got {steps})")
        left = int(steps)
        for c, b, n in self._segments():
            if n < 0 or left <= n:
                return c + left * b
            left -= n
        raise AssertionError("unreachable: the last segment is unbounded")

    def steps_for(self, samples: int) -> int:
        """Fewest steps whose consumed samples reach ``samples`` (>= 0)."""
        steps = 0
        for c, b, n in self._segments():
            if c >= samples:
                return steps
            need = -(-(samples - c) // b)
            if n < 0 or need <= n:
                return steps + need
            steps += n
        raise AssertionError("unreachable")

    def schedule(self, steps: int) -> list[tuple[int, int]]:
        """``[(consumed_before, batch)]`` for steps 1..``steps`` (tests, plan printout)."""
        out, c = [], 0
        for _ in range(int(steps)):
            b = self.batch_at(c)
            out.append((c, b))
            c += b
        return out

    def describe(self, seq_length: int, micro_times_dp: int) -> list[str]:
        """Plan lines: one per constant-batch stretch (batch, A, steps, first consumed sample)."""
        lines = []
        step = 0
        for c, b, n in self._segments():
            span = "to the end" if n < 0 else f"{n} step{'' if n == 1 else 's'}"
            lines.append(f"  from step {step + 1:>7d} (consumed {c} samples): GB {b} samples = "
                         f"{b * seq_length} tokens, A {b // micro_times_dp}, {span}")
            if n < 0:
                break
            step += n
        return lines


def make_ramp(rampup_batch_size, rampup_batch_tokens, final_batch: int, seq_length: int,
              micro_times_dp: int) -> BatchRamp | None:
    """Validate the ramp flags and build a :class:`BatchRamp` (None when neither flag is given).

    Args:
        rampup_batch_size: ``[START, INCREMENT, RAMPUP_SAMPLES]`` (samples) or None.
        rampup_batch_tokens: ``[START_TOK, INCREMENT_TOK, RAMPUP_TOKENS]`` or None.
        final_batch: the target global batch GB (samples).
        seq_length: L_ctx (tokens per sample).
        micro_times_dp: micro_batch_size x D (samples per micro-batch over all DP ranks).

    Raises:
        ValueError: both flags, wrong arity, non-positive values, START > GB, (GB - START) not a
            multiple of INCREMENT, token values not multiples of L_ctx, or a batch size along the
            ramp that is not a multiple of micro_batch_size x D (the message names the flag, the
            offending size and a fix).
    """
    if rampup_batch_size is not None and rampup_batch_tokens is not None:
        raise ValueError("give either --rampup-batch-size (samples) or --rampup-batch-tokens "
                         "(tokens), not both")
    if rampup_batch_size is None and rampup_batch_tokens is None:
        return None
    if rampup_batch_tokens is not None:
        flag, vals = "--rampup-batch-tokens", list(rampup_batch_tokens)
        if len(vals) != 3:
            raise ValueError(f"{flag} takes 3 values START_TOK INCREMENT_TOK RAMPUP_TOKENS "
                             f"(got {vals})")
        bad = [v for v in vals if int(v) % seq_length]
        if bad:
            raise ValueError(f"{flag} {' '.join(map(str, vals))}: {bad[0]} is not a multiple of "
                             f"--seq-length {seq_length} (use "
                             f"{max(1, round(bad[0] / seq_length)) * seq_length})")
        vals = [int(v) // seq_length for v in vals]
        unit = f" (= {vals[0]} {vals[1]} {vals[2]} samples of {seq_length} tokens)"
    else:
        flag, vals, unit = "--rampup-batch-size", list(rampup_batch_size), ""
        if len(vals) != 3:
            raise ValueError(f"{flag} takes 3 values START INCREMENT RAMPUP_SAMPLES (got {vals})")
    start, inc, samples = (int(v) for v in vals)
    given = f"{flag} {' '.join(str(v) for v in (rampup_batch_size or rampup_batch_tokens))}{unit}"
    if start <= 0 or inc <= 0 or samples < 0:
        raise ValueError(f"{given}: START and INCREMENT must be > 0 and the ramp length >= 0")
    if start > final_batch:
        raise ValueError(f"{given}: START {start} exceeds the global batch {final_batch} samples; "
                         f"the ramp grows the batch up to --global-batch-size")
    if (final_batch - start) % inc:
        raise ValueError(f"{given}: global batch {final_batch} - START {start} = "
                         f"{final_batch - start} samples is not a multiple of INCREMENT {inc}")
    for name, v in (("START", start), ("INCREMENT", inc)):
        if v % micro_times_dp:
            # START + k * INCREMENT is a multiple of m for every k iff START and INCREMENT are.
            bad = v if name == "START" else start + inc
            raise ValueError(f"{given}: {name} {v} samples is not a multiple of micro_batch_size "
                             f"x D = {micro_times_dp}, so the batch of {bad} samples cannot be "
                             f"split into whole micro-batches; use "
                             f"{max(1, round(v / micro_times_dp)) * micro_times_dp}")
    return BatchRamp(start=start, increment=inc, rampup_samples=samples, final=final_batch)


def ramp_from_config(cfg) -> BatchRamp | None:
    """The :class:`BatchRamp` of a finalized RunConfig (None without a ramp)."""
    tr, d = cfg.training, cfg.derived
    return make_ramp(tr.rampup_batch_size, tr.rampup_batch_tokens, d.global_batch_size,
                     int(cfg.model.seq_length), tr.micro_batch_size * d.data_parallel_size)
