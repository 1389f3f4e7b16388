"""Autoregressive generation for sanity checks: greedy or temperature / top-k / top-p sampling.

No KV cache: every new token re-runs the model on the (cropped) context. That costs O(n^2) but
needs nothing from the model beyond its forward, which is all a sanity check after training needs.
With TP, every rank computes the same full-vocabulary logits (gathered over the TP group) and the
token chosen on global rank 0 is broadcast, so all ranks extend the same sequence.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist


def top_p_top_k_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0) -> torch.Tensor:
    """Sampling distribution after temperature, top-k and nucleus (top-p) filtering.

    Nucleus sampling (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
    sec. 3.1): keep the smallest set of most probable tokens whose probability sums to at least
    ``top_p`` (the token that crosses ``top_p`` is kept), then renormalise.

    Args:
        logits: ``[V]`` fp32 next-token logits.
        temperature: > 0; logits are divided by it.
        top_p: in (0, 1]; 1 disables the nucleus cut.
        top_k: keep the k most probable tokens first; 0 disables.

    Returns:
        ``[V]`` probabilities (zero outside the kept set, summing to 1).

    Raises:
        ValueError: temperature <= 0, top_p outside (0, 1], top_k < 0.
    """
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0 (got {temperature}); use --greedy instead")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (got {top_p})")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (got {top_k})")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1:
        # A token is kept when the mass of the tokens before it is still below top_p.
        before = torch.cumsum(sorted_p, 0) - sorted_p
        keep &= before < top_p
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs)
    out[order] = kept / kept.sum()
    return out


@torch.no_grad()
def generate(logits_fn: Callable[[torch.Tensor], torch.Tensor], prompt_ids: Sequence[int],
             max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eod: int | None = None,
             max_context: int | None = None, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> list[int]:
    """Extend ``prompt_ids`` by up to ``max_new_tokens`` tokens.

    Args:
        logits_fn: ``logits_fn(tokens [1, s]) -> [1, s, V]`` full-vocabulary logits
            (``LoadedModel.logits``).
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: tokens to add at most.
        greedy: argmax decoding; otherwise sample from :func:`top_p_top_k_probs`.
        temperature, top_p, top_k: sampling settings (ignored when greedy).
        eod: stop after producing this id (None: never stop early).
        max_context: feed only the last this many tokens (the model's trained length).
        generator: RNG for sampling (seeded by the caller for reproducibility).
        device: where the context tensor is built.

    Returns:
        The new token ids only (without the prompt).

    Raises:
        ValueError: empty prompt.
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
    ids = list(int(i) for i in prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        ctx = ids[-max_context:] if max_context else ids
        logits = logits_fn(torch.tensor([ctx], dtype=torch.int64, device=device))[0, -1]
        if greedy:
            nxt = torch.argmax(logits).view(1)
        else:
            probs = top_p_top_k_probs(logits.float().cpu(), temperature, top_p, top_k)
            nxt = torch.multinomial(probs, 1, generator=generator)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Identical logits can still tie-break or sample differently across ranks; rank 0
            # decides for everyone.
            nxt = nxt.to(torch.int64).to(device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(nxt, src=0)
        token = int(nxt.item())
        ids.append(token)
        new.append(token)
        if eod is not None and token == eod:
            break
    return new
