"""LLaMA model: config and presets, TP decoder, RoPE, attention backends, counting, HF adapter.

Names are imported lazily so ``import megatron_lite.model.model_config`` stays light.
"""

import importlib

_EXPORTS = {
    "ModelConfig": "model_config", "model_preset": "presets", "padded_vocab_size": "model_config",
    "LlamaModel": "llama", "num_parameters": "counting", "flops_per_token": "counting",
    "config_from_hf": "hf_adapter", "config_to_hf": "hf_adapter", "hf_to_megatron_lite": "hf_adapter",
    "megatron_lite_to_hf": "hf_adapter",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
