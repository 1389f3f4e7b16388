"""ModelConfig (presets, overrides, validation errors), padded vocab, parameter/FLOP counts,
meta-device 7B/13B models and the HF config mapping (checked against transformers itself)."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron_lite.model.model_config import MODEL_PRESETS, ModelConfig, model_preset, padded_vocab_size
from megatron_lite.model.counting import flops_per_token, num_parameters
from megatron_lite.model.hf_adapter import config_from_hf, config_to_hf
from megatron_lite.model.llama import LlamaModel
from megatron_lite.model.rope import RotaryEmbedding


def test_every_field_is_a_flag_with_help():
    for f in dataclasses.fields(ModelConfig):
        assert "arg" in f.metadata and f.metadata["arg"]["help"], f.name


def test_recipe_presets():
    assert {k: model_preset("3b")[k] for k in ("hidden_size", "num_layers", "num_attention_heads",
                                               "ffn_hidden_size")} == dict(hidden_size=3200, num_layers=32,
                                                                           num_attention_heads=32, ffn_hidden_size=8640)
    c7 = ModelConfig(model_size="7b").validate(8)
    assert (c7.hidden_size, c7.num_layers, c7.num_attention_heads, c7.num_query_groups, c7.ffn_hidden_size,
            c7.head_dim) == (4096, 32, 32, 8, 11008, 128)
    c13 = ModelConfig(model_size="13b").validate(8)
    assert (c13.hidden_size, c13.num_layers, c13.num_attention_heads, c13.num_query_groups,
            c13.ffn_hidden_size) == (5120, 40, 40, 8, 13824)
    c3 = ModelConfig(model_size="3b").validate(4)
    assert c3.num_query_groups == 32 and c3.head_dim == 100  # MHA
    for name in MODEL_PRESETS:
        ModelConfig(model_size=name).validate(1)
    with pytest.raises(ValueError, match="--model-size '2b' is not a preset"):
        model_preset("2b")


def test_explicit_values_override_preset_even_when_set_after_construction():
    c = ModelConfig(model_size="7b", num_layers=4, num_query_groups=32).validate(1)
    assert (c.num_layers, c.hidden_size, c.num_query_groups) == (4, 4096, 32)
    # A parser builds ModelConfig() first and sets attributes afterwards.
    c = ModelConfig()
    c.model_size, c.seq_length = "tiny", 64
    c.validate(2)
    assert (c.hidden_size, c.seq_length, c.max_position_embeddings) == (128, 64, 64)
    # No preset: generic defaults (LLaMA SwiGLU width, MHA, 4096 tokens).
    c = ModelConfig(hidden_size=4096, num_layers=2, num_attention_heads=32).validate()
    assert (c.ffn_hidden_size, c.num_query_groups, c.seq_length) == (11008, 32, 4096)


@pytest.mark.parametrize("kw,tp,message", [
    (dict(), 1, "set --model-size .* or --hidden-size, --num-layers, --num-attention-heads"),
    (dict(model_size="7b"), 3, "--num-attention-heads 32 is not divisible by --tensor-model-parallel-size 3"),
    (dict(hidden_size=100, num_layers=2, num_attention_heads=8), 1,
     "--hidden-size 100 is not divisible by --num-attention-heads 8"),
    (dict(model_size="tiny", ffn_hidden_size=350), 4, "--ffn-hidden-size 350 is not divisible"),
    (dict(model_size="tiny", num_query_groups=3), 1, "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (dict(model_size="tiny", num_attention_heads=12, num_query_groups=3, kv_channels=16), 4,
     r"--num-query-groups 3 and --tensor-model-parallel-size \(--tp\) 4: one must divide the other"),
    (dict(model_size="tiny", seq_length=512, max_position_embeddings=256), 1,
     "--seq-length 512 exceeds --max-position-embeddings 256.*--rope-scaling-type"),
    (dict(model_size="tiny", attention_dropout=0.1), 1, "--attention-dropout"),
    (dict(model_size="tiny", recompute_num_layers=1), 1, "needs --recompute-granularity full"),
    (dict(model_size="tiny", recompute_granularity="full", recompute_num_layers=3), 1, r"\[1, --num-layers 2\]"),
    (dict(model_size="tiny", kv_channels=33), 1, "odd"),
])
def test_validation_errors_name_flags(kw, tp, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw).validate(tp)


def test_scaled_rope_allows_long_sequences_and_vocab_required():
    ModelConfig(model_size="tiny", seq_length=1024, max_position_embeddings=1024, rope_scaling_type="yarn",
                rope_scaling_factor=4.0, rope_original_max_position_embeddings=256).validate(2)
    with pytest.raises(ValueError, match="--vocab-size is not set"):
        LlamaModel(ModelConfig(model_size="tiny"))


def test_padded_vocab_size():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(300, 128, 2) == 512
    assert padded_vocab_size(1, 1, 1) == 1
    with pytest.raises(ValueError):
        padded_vocab_size(0, 128, 1)
    c = ModelConfig(model_size="tiny", vocab_size=32001).validate(2)
    assert c.padded_vocab_size() == 32256 and c.padded_vocab_size(1) == 32128
    assert ModelConfig(model_size="tiny").padded_vocab_size() is None


def test_llama7b_parameter_count_exact():
    c = ModelConfig(hidden_size=4096, num_layers=32, num_attention_heads=32, ffn_hidden_size=11008, vocab_size=32000)
    non_emb, total = num_parameters(c)
    assert total == 6_738_415_616  # LLaMA-7B (Touvron et al. 2023)
    V, H, L, F = 32000, 4096, 32, 11008
    assert total == 2 * V * H + H + L * (4 * H * H + 3 * H * F + 2 * H)
    assert non_emb == total - 2 * V * H
    tied_non, tied_total = num_parameters(dataclasses.replace(c, tie_word_embeddings=True))
    assert (tied_non, tied_total) == (non_emb, total - V * H)
    with pytest.raises(ValueError, match="--vocab-size"):
        num_parameters(ModelConfig(model_size="7b"))


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_meta_device_counts_match_hf(size):
    """Our 7B/13B on the meta device (no memory) and HF's have exactly num_parameters() params."""
    c = ModelConfig(model_size=size, vocab_size=32000)
    non_emb, total = num_parameters(c)
    model = LlamaModel(c, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == total  # 32000 needs no padding at TP=1
    with torch.device("meta"):
        hf = LlamaForCausalLM(config_to_hf(c))
    assert sum(p.numel() for p in hf.parameters()) == total
    H, V = c.hidden_size, 32000
    assert non_emb == total - 2 * V * H
    L, F, kv = c.num_layers, c.ffn_hidden_size, 8 * 128  # 8 KV groups x head dim 128
    assert total == 2 * V * H + H + L * (2 * H * H + 2 * H * kv + 3 * H * F + 2 * H)
    assert total == {"7b": 5_933_109_248, "13b": 11_338_142_720}[size]


def test_tiny_counts_match_hf_tied_and_untied():
    for tied in (False, True):
        c = ModelConfig(model_size="tiny", vocab_size=1000, tie_word_embeddings=tied)
        hf = LlamaForCausalLM(config_to_hf(c))
        assert num_parameters(c)[1] == sum(p.numel() for p in hf.parameters())


def test_flops_per_token_equals_megatron_and_palm_formulas():
    # MHA with 3H' = 8H: Megatron-LM's 72 L H^2 (1 + s/(6H) + V/(12 L H)) (no recompute).
    L, H, s, V = 12, 768, 2048, 50000
    c = ModelConfig(hidden_size=H, num_layers=L, num_attention_heads=12, ffn_hidden_size=2048, vocab_size=V)
    assert flops_per_token(c, s) == pytest.approx(72 * L * H * H * (1 + s / (6 * H) + V / (12 * L * H)), rel=1e-12)
    # GQA 7B: PaLM's 6 N + 12 L nh d s, N = non-embedding params - norms + LM head.
    c = ModelConfig(model_size="7b", vocab_size=32000)
    non_emb, _ = num_parameters(c)
    n_matmul = non_emb - (2 * 32 + 1) * 4096 + 32000 * 4096
    assert flops_per_token(c, 4096) == pytest.approx(6 * n_matmul + 12 * 32 * 32 * 128 * 4096, rel=1e-12)
    assert flops_per_token(c) == flops_per_token(c, 4096)
    assert flops_per_token(c, 8192) > flops_per_token(c, 4096)
    with pytest.raises(ValueError, match="seq_length"):
        flops_per_token(c, 0)


ROPE_CASES = [
    dict(),
    dict(rope_scaling_type="linear", rope_scaling_factor=4.0),
    dict(rope_scaling_type="ntk", rope_scaling_factor=4.0),
    dict(rope_scaling_type="dynamic", rope_scaling_factor=2.0, max_position_embeddings=512,
         rope_original_max_position_embeddings=128),
    dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, max_position_embeddings=512,
         rope_original_max_position_embeddings=128, yarn_beta_fast=16.0),
    dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, max_position_embeddings=512,
         rope_original_max_position_embeddings=128, rotary_base=500000.0),
]


@pytest.mark.parametrize("kw", ROPE_CASES, ids=lambda kw: kw.get("rope_scaling_type", "none"))
def test_config_to_hf_rope_matches_hf_rotary(kw):
    c = ModelConfig(model_size="tiny", vocab_size=1000, seq_length=128, **kw).validate()
    hc = config_to_hf(c)
    assert isinstance(hc, LlamaConfig) and hc.num_key_value_heads == 2 and hc.head_dim == 32
    pos = torch.arange(0, 300, 7).unsqueeze(0)
    cos, sin = RotaryEmbedding(c)(pos)
    hcos, hsin = LlamaRotaryEmbedding(hc)(torch.zeros(1, dtype=torch.float32), pos)
    torch.testing.assert_close(cos, hcos, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin, hsin, rtol=0, atol=2e-6)
    back = config_from_hf(hc).validate()
    for name in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "vocab_size", "norm_epsilon", "tie_word_embeddings"):
        assert getattr(back, name) == getattr(c, name), name
    if c.rope_scaling_type != "ntk":  # static NTK comes back as plain RoPE with the scaled base
        assert (back.rope_scaling_type, back.rope_scaling_factor) == (c.rope_scaling_type, c.rope_scaling_factor)
    cos2, sin2 = RotaryEmbedding(back)(pos)
    torch.testing.assert_close(cos2, cos, rtol=0, atol=2e-6)


def test_config_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="bias"):
        config_from_hf(LlamaConfig(attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(LlamaConfig(hidden_act="gelu"))
    c = config_from_hf(LlamaConfig(head_dim=64))
    assert c.kv_channels == 64 and c.validate().head_dim == 64


def test_hf_adapter_shape_and_consistency_errors():
    from megatron_lite.model.hf_adapter import hf_to_megatron_lite, megatron_lite_to_hf

    c = ModelConfig(model_size="tiny", vocab_size=1000, num_layers=1)
    sd = LlamaForCausalLM(config_to_hf(c)).state_dict()
    shards = [hf_to_megatron_lite(sd, c, r, 2) for r in range(2)]
    assert shards[0]["embedding.weight"].shape == (512, 128)  # 1000 -> 1024 padded, / TP
    assert torch.all(shards[1]["embedding.weight"][1000 - 512:] == 0)
    assert torch.equal(megatron_lite_to_hf(shards, c)["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    shards[1]["final_norm.weight"] = shards[1]["final_norm.weight"] + 1
    with pytest.raises(ValueError, match="final_norm.weight differs between TP shards"):
        megatron_lite_to_hf(shards, c)
    bad = dict(sd)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(10, 128)
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(10, 128\)"):
        hf_to_megatron_lite(bad, c, 0, 1)
    bad = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="lacks lm_head.weight.*tie_word_embeddings=True"):
        hf_to_megatron_lite(bad, c, 0, 1)
    with pytest.raises(ValueError, match="does not know"):
        hf_to_megatron_lite({**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}, c, 0, 1)


def test_llama3_factor_order_and_hf_unsupported_rope_fields_are_refused():
    import transformers

    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.hf_adapter import config_from_hf

    cfg = ModelConfig(model_size="tiny", vocab_size=256, seq_length=64, rope_scaling_type="llama3",
                      rope_scaling_factor=8.0, llama3_low_freq_factor=4.0, llama3_high_freq_factor=1.0)
    with pytest.raises(ValueError, match="--llama3-high-freq-factor"):
        cfg.validate(1)
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    # (YaRN mscale/mscale_all_dim used to be refused here; they are honoured since issue 14:
    # tests/test_rope.py::test_yarn_mscale_equals_hf and tests/test_convert_checkpoint.py.)
    for rope, match in (({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
                         "partial_rotary_factor"),
                        ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                          "low_freq_factor": 1.0}, "high_freq_factor"),
                        ({"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0},
                         "longrope")):
        hf = transformers.LlamaConfig(**base)
        hf.rope_parameters = rope
        with pytest.raises(ValueError, match=match):
            config_from_hf(hf)
