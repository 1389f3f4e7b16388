"""megatron_lite: a compact Megatron-style codebase for pretraining and continued pretraining of
LLaMA-style decoder-only language models (TP layers, packed data, DeepSpeed ZeRO)."""

__version__ = "0.1.0"
