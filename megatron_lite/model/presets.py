"""Named model shapes for ``--model-size`` (architecture only; the run picks everything else).

``3b``/``7b``/``13b`` are the recipe's shapes (chapter 11 / appendix 15): 3B = OpenLLaMA-3B
(hidden 3200, 32 layers, 32 heads, FFN 8640), 7B = LLaMA-2-7B width with 8 KV groups (GQA),
13B = LLaMA-2-13B width with 8 KV groups. ``125m`` is GPT-3-Small/OPT-125M width with the LLaMA
SwiGLU FFN (8h/3 rounded up to 256), ``1b`` is TinyLlama-1.1B (22 layers, 4 KV groups, FFN 5632),
``tiny`` is a 2-layer GQA model for CPU tests and the quickstart.
"""

from __future__ import annotations

# seq_length default per preset in tokens; the recipe's base context is 4k.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352,
                 seq_length=256),
    "125m": dict(hidden_size=768, num_layers=12, num_attention_heads=12, num_query_groups=None,
                 ffn_hidden_size=2048, seq_length=2048),
    "1b": dict(hidden_size=2048, num_layers=22, num_attention_heads=32, num_query_groups=4, ffn_hidden_size=5632,
               seq_length=4096),
    "3b": dict(hidden_size=3200, num_layers=32, num_attention_heads=32, num_query_groups=None,
               ffn_hidden_size=8640, seq_length=4096),
    "7b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=11008,
               seq_length=4096),
    "13b": dict(hidden_size=5120, num_layers=40, num_attention_heads=40, num_query_groups=8,
                ffn_hidden_size=13824, seq_length=4096),
}


def model_preset(name: str) -> dict:
    """Field values of preset ``name`` (a fresh dict; ``num_query_groups=None`` means MHA).

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    if name not in MODEL_PRESETS:
        raise ValueError(f"--model-size {name!r} is not a preset; choose one of {', '.join(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])
