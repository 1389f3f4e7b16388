"""Compute-optimal model size and data for a FLOP budget (Chinchilla scaling law).

Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", section 3.3 (approach 3):
the final pretraining loss is fitted as

    L(N, D) = E + A / N^α + B / D^β,   E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28

(N parameters, D training tokens; eq. 2 and the fitted values under it). Minimising L under the
compute constraint C = 6·N·D gives (their eq. 4)

    N_opt(C) = G · (C/6)^a,  D_opt(C) = G^-1 · (C/6)^b,
    G = (α·A / (β·B))^(1/(α+β)),  a = β/(α+β),  b = α/(α+β).

The widely quoted rule of thumb (their table 3, approaches 1-2) is about 20 tokens per parameter:
D = 20·N, hence N = sqrt(C / 120), D = 20·N.
"""

from __future__ import annotations

import dataclasses
import math

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAM = 20.0


def predicted_loss(n_params: float, tokens: float, e: float = E, a: float = A, b: float = B,
                   alpha: float = ALPHA, beta: float = BETA) -> float:
    """Chinchilla approach-3 loss L(N, D) = E + A/N^α + B/D^β (nats per token, their data).

    Args:
        n_params: N, parameters (> 0).
        tokens: D, training tokens (> 0).

    Raises:
        ValueError: non-positive N or D.
    """
    if n_params <= 0 or tokens <= 0:
        raise ValueError(f"N and D must be positive (got {n_params}, {tokens})")
    return e + a / n_params ** alpha + b / tokens ** beta


@dataclasses.dataclass(frozen=True)
class ComputeOptimal:
    """A compute-optimal allocation: parameters, tokens, FLOPs (= 6·N·D) and predicted loss."""

    n_params: float
    tokens: float
    flops: float
    loss: float

    @property
    def tokens_per_param(self) -> float:
        """D / N."""
        return self.tokens / self.n_params


def compute_optimal(flops: float, e: float = E, a: float = A, b: float = B, alpha: float = ALPHA,
                    beta: float = BETA) -> ComputeOptimal:
    """N_opt and D_opt minimising L(N, D) subject to 6·N·D = ``flops`` (Hoffmann et al. eq. 4).

    Args:
        flops: compute budget C, FLOPs (> 0).

    Returns:
        :class:`ComputeOptimal` with 6·N·D equal to ``flops``.

    Raises:
        ValueError: non-positive budget.
    """
    if flops <= 0:
        raise ValueError(f"FLOP budget must be positive (got {flops})")
    g = (alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
    n = g * (flops / 6.0) ** (beta / (alpha + beta))
    d = (flops / 6.0) ** (alpha / (alpha + beta)) / g
    return ComputeOptimal(n, d, 6.0 * n * d, predicted_loss(n, d, e, a, b, alpha, beta))


def twenty_tokens_rule(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> ComputeOptimal:
    """The D = 20·N rule of thumb under C = 6·N·D: N = sqrt(C / (6·20)), D = 20·N.

    Raises:
        ValueError: non-positive budget or ratio.
    """
    if flops <= 0 or tokens_per_param <= 0:
        raise ValueError("FLOP budget and tokens per parameter must be positive")
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    d = tokens_per_param * n
    return ComputeOptimal(n, d, 6.0 * n * d, predicted_loss(n, d))


def flops_for(n_params: float, tokens: float) -> float:
    """C = 6·N·D, FLOPs."""
    return 6.0 * n_params * tokens
