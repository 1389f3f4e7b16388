"""Perplexity of a token stream: plain (non-overlapping) and sliding-window evaluation.

Definition (issue 4, item 8). The stream ``t_0 .. t_{N-1}`` is a dataset's documents concatenated
in on-disk order, EOD tokens included (``--max-tokens`` keeps the first N). Targets are
``t_1 .. t_{N-1}``: the stream's first token is never a target. Windows of at most ``L =
seq_length`` input tokens start at ``0, S, 2S, ...`` (``S = stride``, default L): the window at
``p`` feeds ``t_p .. t_{p+L-1}`` and can score targets ``t_{p+1} .. t_{p+L}`` (cut at the end of
the stream); it scores only those not scored by an earlier window, and the walk stops at the first
window reaching the last target. So every target is scored exactly once, target ``j`` by the
window at ``p_j = S * max(0, ceil((j - L) / S))`` with context ``t_{p_j} .. t_{j-1}``, and

    nll = (1 / (N - 1)) * sum_j -log P(t_j | t_{p_j} .. t_{j-1}),   ppl = exp(nll).

``S = L`` gives plain evaluation; smaller S gives every scored token at least ``L - S`` tokens of
context (except near the start): the sliding-window perplexity of Press et al. (2021), "Train Short,
Test Long", section 2.2. This is the default convention, ``"ours"``: each window scores up to L
targets from L input tokens (it spans L + 1 stream tokens), and every target is scored.

The HuggingFace guide ("Perplexity of fixed-length models", transformers docs) counts differently;
``convention="hf"`` (``tools/eval_ppl.py --window-convention hf``) reproduces its loop exactly, so
a number can be compared with figures computed that way:

* windows hold at most L stream tokens, ``t_b .. t_{e-1}`` with ``b = 0, S, 2S, ...`` and
  ``e = min(b + L, N)``, and score ``t_max(e', b+1) .. t_{e-1}`` (``e'`` the previous window's
  ``e``, 0 for the first): at most L - 1 targets per window, context at most L - 1 tokens. With
  ``S = L`` the first token of every window is context only, so ``t_L, t_2L, ...`` are never
  scored (N - ceil(N / L) targets instead of N - 1);
* the guide multiplies each window's mean NLL by (its non-masked labels - 1) and divides by the
  sum of those counts. For a window overlapping the previous one that count is one less than the
  targets it scored, so overlapping windows are weighted slightly low; this is kept, since it is
  what the published loop computes. A last window of one token (which scores nothing; the
  guide's loop returns NaN there, 0/0) is left out.

Both report ``tokens`` = targets actually scored. For the same L and S the two conventions give
different numbers (each ``ours`` window sees one more token of context); neither is wrong.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

# (begin, length, first): inputs stream[begin : begin + length]; window position i (0-based)
# predicts stream[begin + i + 1] and is scored when i >= first.
Window = tuple[int, int, int]


def build_stream(dataset: Any, max_tokens: int | None = None) -> np.ndarray:
    """The dataset's sequences concatenated in on-disk order, as int64 ``[N]``.

    Args:
        dataset: an ``IndexedDataset`` (or any sequence of 1-D token arrays) in file order; the
            EOD tokens appended by preprocessing are part of the sequences and are kept.
        max_tokens: keep only the first this many tokens (None: all).

    Raises:
        ValueError: ``max_tokens < 2`` or a stream shorter than 2 tokens (no target to score).
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2 (got {max_tokens}): the first token is "
                         "never a target")
    parts, total = [], 0
    for i in range(len(dataset)):
        seq = np.asarray(dataset[i])
        if max_tokens is not None and total + len(seq) > max_tokens:
            seq = seq[:max_tokens - total]
        parts.append(seq.astype(np.int64))
        total += len(seq)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(stream) < 2:
        raise ValueError(f"the evaluation stream has {len(stream)} token(s); need at least 2")
    return stream


CONVENTIONS = ("ours", "hf")


def plan_windows(num_tokens: int, seq_length: int, stride: int | None = None,
                 convention: str = "ours") -> list[Window]:
    """The windows of the stream under ``convention`` (module docstring).

    Args:
        num_tokens: stream length N (>= 2).
        seq_length: window length L in tokens (``--seq-length``).
        stride: S, tokens between window starts, ``1 <= S <= L`` (None: S = L, plain).
        convention: ``"ours"`` (every target once, up to L per window) or ``"hf"`` (the HF
            guide's windows of L tokens scoring up to L - 1).

    Returns:
        ``[(begin, length, first), ...]``; with ``"ours"`` the ``length - first`` values sum to
        ``N - 1``. An ``"hf"`` window of L stream tokens is ``(b, e - 1 - b, first)``: its last
        token predicts nothing, so it is not fed.

    Raises:
        ValueError: ``N < 2``, ``L < 1`` or ``S`` outside ``[1, L]`` (a larger stride would
            leave targets unscored).
    """
    stride = seq_length if stride is None else stride
    if num_tokens < 2:
        raise ValueError(f"a stream of {num_tokens} token(s) has no target")
    if seq_length < 1:
        raise ValueError(f"--seq-length must be >= 1 (got {seq_length})")
    if not 1 <= stride <= seq_length:
        raise ValueError(f"--stride must be in [1, --seq-length={seq_length}] (got {stride}); "
                         "a stride above the window length would skip targets")
    if convention not in CONVENTIONS:
        raise ValueError(f"window convention must be one of {CONVENTIONS} (got {convention!r})")
    if convention == "hf":
        return _plan_windows_hf(num_tokens, seq_length, stride)
    last = num_tokens - 1  # index of the last target
    windows: list[Window] = []
    scored_to = 0  # highest target index scored so far (0: none; t_0 is never a target)
    for begin in range(0, last, stride):
        end = min(begin + seq_length, last)  # highest target this window can score
        windows.append((begin, end - begin, scored_to - begin if scored_to > begin else 0))
        scored_to = end
        if end == last:
            break
    return windows


def _plan_windows_hf(n: int, L: int, S: int) -> list[Window]:
    """The HF guide's loop: ``for b in range(0, N, S)``, ``e = min(b + L, N)``, targets from
    ``max(e_prev, b + 1)`` to ``e - 1``, stop once ``e == N``."""
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n, S):
        end = min(begin + L, n)
        if end - begin >= 2:     # a one-token window scores nothing (the guide: NaN)
            windows.append((begin, end - 1 - begin, max(prev_end, begin + 1) - begin - 1))
        prev_end = end
        if end == n:
            break
    return windows


def hf_guide_weights(windows: Sequence[Window]) -> list[int]:
    """Per ``"hf"`` window, the guide's ``num_loss_tokens``: its non-masked labels minus one,
    ``e - e_prev - 1`` (``e = begin + length + 1``; ``e_prev`` the previous window's, 0 first).
    """
    out, prev_end = [], 0
    for begin, length, _ in windows:
        end = begin + length + 1
        out.append(end - prev_end - 1)
        prev_end = end
    return out


def window_batches(stream: np.ndarray, windows: Sequence[Window], micro_batch_size: int,
                   pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Group windows into micro-batches of inputs and labels.

    Yields:
        ``tokens [b, s]`` int64 and ``labels [b, s]`` int64 with ``s`` the longest window of the
        batch; labels are the next stream token at scored positions and -100 elsewhere.
        Shorter windows are right-padded with ``pad_id`` (under causal attention, padding after
        a position cannot change its prediction).
    """
    if micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1 (got {micro_batch_size})")
    for start in range(0, len(windows), micro_batch_size):
        chunk = windows[start:start + micro_batch_size]
        width = max(length for _, length, _ in chunk)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        labels = torch.full((len(chunk), width), -100, dtype=torch.int64)
        for row, (begin, length, first) in enumerate(chunk):
            tokens[row, :length] = torch.from_numpy(stream[begin:begin + length])
            labels[row, first:length] = torch.from_numpy(stream[begin + 1 + first:
                                                                begin + 1 + length])
        yield tokens, labels


@torch.no_grad()
def stream_perplexity(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      stream: np.ndarray, seq_length: int, stride: int | None = None, *,
                      micro_batch_size: int = 1, dp_rank: int = 0, dp_size: int = 1,
                      dp_group: Any = None, device: torch.device | str = "cpu",
                      progress: bool = False, convention: str = "ours") -> dict[str, float | int]:
    """Perplexity of ``stream`` under a model (module docstring: with ``convention="ours"``
    every target is scored once; ``"hf"`` reproduces the HF guide's loop and its weighting).

    The windows are dealt round-robin to the ``dp_size`` data-parallel ranks (window k to rank
    ``k % dp_size``); each TP rank of a model-parallel group takes the same windows, so TP
    collectives inside ``loss_fn`` stay in step. Sums of NLL (fp64) and of scored tokens are
    all-reduced over ``dp_group`` when ``dp_size > 1``.

    Args:
        loss_fn: ``loss_fn(tokens [b, s], labels [b, s]) -> per-token NLL [b, s]`` in nats,
            zero (or ignored) where ``labels == -100``; for ``LlamaModel`` this is
            ``lambda t, l: model(t, labels=l)``.
        stream: int token ids ``[N]`` (:func:`build_stream`).
        seq_length: window length L.
        stride: S in ``[1, L]`` (None: plain, S = L).
        micro_batch_size: windows per forward call.
        dp_rank, dp_size, dp_group: data-parallel split of the windows.
        device: where the batches go.
        progress: show a tqdm bar on DP rank 0.
        convention: ``"ours"`` or ``"hf"`` (``--window-convention``).

    Returns:
        ``{"ppl": exp(nll), "nll": mean NLL per target in nats (``"hf"``: the guide's weighted
        mean), "tokens": targets scored}`` (``tokens == N - 1`` with ``"ours"``).
    """
    windows = plan_windows(len(stream), seq_length, stride, convention)
    mine = windows[dp_rank::dp_size]
    weights = hf_guide_weights(windows)[dp_rank::dp_size] if convention == "hf" else None
    nll = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)     # the mean's denominator
    scored_all = torch.zeros((), dtype=torch.float64)
    batches = window_batches(stream, mine, micro_batch_size)
    if progress and dp_rank == 0:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(mine) / micro_batch_size), desc="ppl")
    done = 0
    for tokens, labels in batches:
        tokens, labels = tokens.to(device), labels.to(device)
        losses = loss_fn(tokens, labels)
        scored = labels != -100
        n_scored = scored.sum().cpu().double()
        scored_all += n_scored
        if weights is None:
            nll += losses.double()[scored].sum().cpu()
            count += n_scored
        else:   # the guide: mean NLL of each window x (its labels - 1), over the sum of those
            row_sum = torch.where(scored, losses.double(), 0.0).sum(dim=1).cpu()
            row_n = scored.sum(dim=1).cpu().double()
            w = torch.tensor(weights[done:done + len(row_n)], dtype=torch.float64)
            nll += (row_sum / row_n * w).sum()
            count += w.sum()
        done += len(tokens)
    totals = torch.stack([nll, count, scored_all])
    if dp_size > 1:
        # NCCL reduces device tensors only; gloo reduces CPU tensors.
        comm_device = device if dist.get_backend(dp_group) == "nccl" else "cpu"
        totals = totals.to(comm_device)
        dist.all_reduce(totals, group=dp_group)
        totals = totals.cpu()
    tokens_scored = int(round(float(totals[2])))
    expected = sum(length - first for _, length, first in windows)
    if tokens_scored != expected:
        raise RuntimeError(f"scored {tokens_scored} targets, expected {expected}: the "
                           "windows were not all evaluated (mismatched DP ranks?)")
    mean = float(totals[0]) / float(totals[1])
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = float("inf")
    return {"ppl": ppl, "nll": mean, "tokens": tokens_scored}
