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
context (except near the start), the sliding-window perplexity of Press et al. (2021), "Train Short,
Test Long", section 2.2 and of the HuggingFace perplexity guide.
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


def plan_windows(num_tokens: int, seq_length: int, stride: int | None = None) -> list[Window]:
    """Windows covering every target of an ``num_tokens`` stream exactly once (module docstring).

    Args:
        num_tokens: stream length N (>= 2).
        seq_length: window length L in tokens (``--seq-length``).
        stride: S, tokens between window starts, ``1 <= S <= L`` (None: S = L, plain).

    Returns:
        ``[(begin, length, first), ...]``; the ``length - first`` values sum to ``N - 1``.

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
                      progress: bool = False) -> dict[str, float | int]:
    """Perplexity of ``stream`` under a model, every target scored once (module docstring).

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

    Returns:
        ``{"ppl": exp(nll), "nll": mean NLL per target in nats, "tokens": targets scored}``
        (``tokens == N - 1``).
    """
    windows = plan_windows(len(stream), seq_length, stride)
    mine = windows[dp_rank::dp_size]
    nll = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    batches = window_batches(stream, mine, micro_batch_size)
    if progress and dp_rank == 0:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(mine) / micro_batch_size), desc="ppl")
    for tokens, labels in batches:
        tokens, labels = tokens.to(device), labels.to(device)
        losses = loss_fn(tokens, labels)
        scored = labels != -100
        nll += losses.double()[scored].sum().cpu()
        count += scored.sum().cpu().double()
    totals = torch.stack([nll, count])
    if dp_size > 1:
        # NCCL reduces device tensors only; gloo reduces CPU tensors.
        comm_device = device if dist.get_backend(dp_group) == "nccl" else "cpu"
        totals = totals.to(comm_device)
        dist.all_reduce(totals, group=dp_group)
        totals = totals.cpu()
    tokens_scored = int(round(float(totals[1])))
    if tokens_scored != len(stream) - 1:
        raise RuntimeError(f"scored {tokens_scored} targets, expected {len(stream) - 1}: the "
                           "windows were not all evaluated (mismatched DP ranks?)")
    mean = float(totals[0]) / tokens_scored
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = float("inf")
    return {"ppl": ppl, "nll": mean, "tokens": tokens_scored}
