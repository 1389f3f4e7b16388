"""Parameter and FLOP counts of a ``ModelConfig`` (one formula each; the planner and MFU use these).

Symbols: V vocab (true, unpadded: padding is an implementation artefact), H hidden, L layers,
nh query heads, g KV groups, d head dim, H' SwiGLU width, s sequence length.
"""

from __future__ import annotations


def _checked(config):
    config.resolve()
    missing = [f"--{n.replace('_', '-')}" for n in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size")
               if getattr(config, n) is None]
    if missing:
        raise ValueError(f"cannot count parameters/FLOPs: {', '.join(missing)} unset "
                         "(give --model-size and the tokenizer's --vocab-size)")
    return config


def _block_matmul_params(config) -> int:
    h, d = config.hidden_size, config.head_dim
    attn = h * config.num_attention_heads * d * 2 + h * config.num_query_groups * d * 2  # q, o ; k, v
    mlp = 3 * h * config.ffn_hidden_size  # gate, up, down
    return attn + mlp


def num_parameters(config) -> tuple[int, int]:
    """(non-embedding, total) parameter counts.

    total = V H (embedding) + V H (LM head, absent when tied) + H (final norm)
            + L (2 H nh d + 2 H g d + 3 H H' + 2 H).
    For MHA with nh d = H this is the familiar 2VH + H + L(4H^2 + 3HH' + 2H): LLaMA-7B (V = 32000,
    L = 32, H = 4096, H' = 11008) gives 6,738,415,616, the count of HF ``LlamaForCausalLM``.
    Non-embedding (the recipe's N_params, appendix 15.1) excludes the token embedding and the
    output layer: H + L (...).

    Raises:
        ValueError: architecture or ``vocab_size`` unset.
    """
    c = _checked(config)
    h, v = c.hidden_size, c.vocab_size
    non_embedding = h + c.num_layers * (_block_matmul_params(c) + 2 * h)
    total = non_embedding + v * h * (1 if c.tie_word_embeddings else 2)
    return non_embedding, total


def flops_per_token(config, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token, without activation recomputation.

    forward = 2 P_mm + 4 L s nh d + 2 H V, training = 3 x forward, where P_mm are the block matmul
    weights (q, k, v, o, gate, up, down), 4 L s nh d the attention score and value products
    (Q K^T and A V, 2 s d multiply-adds per head and token each, counted over the full s x s square as
    Megatron-LM and PaLM do), and 2 H V the LM head; the backward pass costs twice the forward.
    For MHA with 3H' = 8H (a SwiGLU MLP with the weights of GPT's 4H MLP) this equals Megatron-LM's 72 L H^2 (1 + s / (6H) + V / (12 L H)) per token
    (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", eq. 3
    and appendix, with the recomputation factor 4 replaced by 3), and it is PaLM's
    6 N + 12 L nh d s (Chowdhery et al. 2022, appendix B) with N counting the LM head and not the
    embedding lookup. This is the model-FLOPs numerator of MFU.

    Args:
        config: ``ModelConfig``.
        seq_length: tokens per sample (default ``config.seq_length``).

    Returns:
        FLOPs per token (float).

    Raises:
        ValueError: architecture or ``vocab_size`` unset, or seq_length < 1.
    """
    c = _checked(config)
    s = c.seq_length if seq_length is None else int(seq_length)
    if s < 1:
        raise ValueError(f"seq_length must be >= 1 tokens (got {s})")
    forward = (2 * c.num_layers * _block_matmul_params(c)
               + 4 * c.num_layers * s * c.num_attention_heads * c.head_dim
               + 2 * c.hidden_size * c.vocab_size)
    return 3.0 * forward
