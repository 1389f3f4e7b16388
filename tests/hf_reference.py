"""The HF ``LlamaForCausalLM`` reference the parity tests compare against."""

import torch
from transformers import LlamaForCausalLM

from megatron_lite.model.hf_adapter import config_to_hf
from megatron_lite.model.model_config import ModelConfig


def hf_reference_model(c: ModelConfig, seed: int) -> LlamaForCausalLM:
    """HF model of ``c`` (eager attention, fp32) with O(1) logits: weights ~ N(0, 0.15^2), norm
    weights 1 + 0.2 N(0, 1); the default std 0.02 would make a 1e-5 bar meaningless. A tied head
    keeps the embedding's draw."""
    hc = config_to_hf(c)
    hc._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hc).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name != "lm_head.weight" or not c.tie_word_embeddings:
                p.normal_(0.0, 0.15)
    return model
