"""RoPE scaling == HuggingFace transformers' RoPE init functions; fp32 cos/sin; packed position_ids."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from megatron_lite.model.rope import RotaryEmbedding, apply_rotary_pos_emb, rope_inv_freq


def ours(kind="none", factor=1.0, base=10000.0, hidden=64, heads=4, kv_channels=None, max_pos=256,
         orig=None, beta_fast=32.0, beta_slow=1.0, attn_factor=None, truncate=True, low=1.0, high=4.0):
    return SimpleNamespace(hidden_size=hidden, num_attention_heads=heads, num_query_groups=None,
                           kv_channels=kv_channels, seq_length=max_pos, max_position_embeddings=max_pos,
                           rotary_base=base, rope_scaling_type=kind, rope_scaling_factor=factor,
                           rope_original_max_position_embeddings=orig, yarn_beta_fast=beta_fast,
                           yarn_beta_slow=beta_slow, yarn_attention_factor=attn_factor, yarn_truncate=truncate,
                           llama3_low_freq_factor=low, llama3_high_freq_factor=high, attention_backend="eager",
                           no_fused_rope=True)


def hf(rope_parameters, hidden=64, heads=4, head_dim=None, max_pos=256):
    kw = {"head_dim": head_dim} if head_dim else {}
    return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, max_position_embeddings=max_pos,
                       rope_parameters=dict(rope_parameters), **kw)


def assert_same(a, b):
    inv_a, fac_a = a
    inv_b, fac_b = b
    assert inv_a.dtype == torch.float32 and inv_a.shape == inv_b.shape
    torch.testing.assert_close(inv_a, inv_b.float(), rtol=2e-7, atol=0)
    assert fac_a == pytest.approx(fac_b, rel=1e-12)


@pytest.mark.parametrize("base,hidden,heads,kv", [(10000.0, 64, 4, None), (500000.0, 256, 4, None),
                                                  (1e6, 64, 8, 32)])
def test_none_equals_hf_default(base, hidden, heads, kv):
    cfg = hf({"rope_type": "default", "rope_theta": base}, hidden, heads, kv)
    assert_same(rope_inv_freq(ours(base=base, hidden=hidden, heads=heads, kv_channels=kv)),
                LlamaRotaryEmbedding.compute_default_rope_parameters(cfg))


@pytest.mark.parametrize("factor,base,kv", [(2.0, 10000.0, None), (4.0, 500000.0, None), (8.0, 1e6, 32)])
def test_linear_equals_hf(factor, base, kv):
    cfg = hf({"rope_type": "linear", "factor": factor, "rope_theta": base}, head_dim=kv)
    assert_same(rope_inv_freq(ours("linear", factor, base, kv_channels=kv)), ROPE_INIT_FUNCTIONS["linear"](cfg))


@pytest.mark.parametrize("factor,base,kv", [(2.0, 10000.0, None), (8.0, 500000.0, 32)])
def test_ntk_is_base_change(factor, base, kv):
    """Static NTK-aware == HF default RoPE with base * s^(d/(d-2)); lowest freq == unscaled / s exactly."""
    d = kv or 16
    cfg = hf({"rope_type": "default", "rope_theta": base * factor ** (d / (d - 2))}, head_dim=kv)
    got = rope_inv_freq(ours("ntk", factor, base, kv_channels=kv))
    assert_same(got, LlamaRotaryEmbedding.compute_default_rope_parameters(cfg))
    plain, _ = rope_inv_freq(ours("none", base=base, kv_channels=kv))
    torch.testing.assert_close(got[0][-1], plain[-1] / factor, rtol=1e-5, atol=0)
    assert got[0][0] == 1.0  # the highest frequency is untouched


@pytest.mark.parametrize("factor,max_pos,seq_len", [(2.0, 128, None), (2.0, 128, 64), (2.0, 128, 300),
                                                    (4.0, 256, 1000), (8.0, 64, 65)])
def test_dynamic_equals_hf(factor, max_pos, seq_len):
    # HF's dynamic init reads max_position_embeddings as the original length; ours reads
    # --rope-original-max-position-embeddings (set here to the same value).
    cfg = hf({"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0}, max_pos=max_pos)
    got = rope_inv_freq(ours("dynamic", factor, max_pos=4 * max_pos, orig=max_pos), seq_len=seq_len)
    assert_same(got, ROPE_INIT_FUNCTIONS["dynamic"](cfg, seq_len=seq_len))


@pytest.mark.parametrize("factor,orig,bf,bs,af,trunc,base,kv", [
    (4.0, 64, 32.0, 1.0, None, True, 10000.0, None),
    (4.0, 64, 16.0, 2.0, None, False, 10000.0, None),
    (16.0, 4096, 32.0, 1.0, None, True, 500000.0, 128),
    (2.0, 512, 32.0, 1.0, 1.5, True, 10000.0, 64),
    (8.0, 2048, 64.0, 0.5, None, False, 1e6, 128),
])
def test_yarn_equals_hf(factor, orig, bf, bs, af, trunc, base, kv):
    params = {"rope_type": "yarn", "factor": factor, "rope_theta": base, "original_max_position_embeddings": orig,
              "beta_fast": bf, "beta_slow": bs, "truncate": trunc}
    if af is not None:
        params["attention_factor"] = af
    cfg = hf(params, hidden=kv * 4 if kv else 64, head_dim=kv, max_pos=int(orig * factor))
    got = rope_inv_freq(ours("yarn", factor, base, hidden=kv * 4 if kv else 64, kv_channels=kv,
                             max_pos=int(orig * factor), orig=orig, beta_fast=bf, beta_slow=bs,
                             attn_factor=af, truncate=trunc))
    assert_same(got, ROPE_INIT_FUNCTIONS["yarn"](cfg))
    if af is None:  # YaRN eq. 22 by hand
        assert got[1] == pytest.approx(0.1 * math.log(factor) + 1.0)


@pytest.mark.parametrize("factor,mscale,mscale_all_dim,af", [
    (4.0, 0.707, 1.0, None), (4.0, 1.0, 1.0, None), (40.0, 0.707, 0.707, None),
    (2.0, 0.707, None, None), (2.0, None, 1.0, None), (8.0, 1.0, 0.5, 1.3), (0.5, 1.0, 0.5, None)])
def test_yarn_mscale_equals_hf(factor, mscale, mscale_all_dim, af):
    """HF's attention factor: explicit, else get_mscale(s, m) / get_mscale(s, m_all) when both are
    set, else 0.1 ln s + 1 (issue 14: the project used the last one always)."""
    params = {"rope_type": "yarn", "factor": factor, "rope_theta": 10000.0,
              "original_max_position_embeddings": 64}
    for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim), ("attention_factor", af)):
        if v is not None:
            params[k] = v
    cfg = hf(params, max_pos=max(64, int(64 * factor)))
    c = ours("yarn", max(factor, 1.0), max_pos=max(64, int(64 * factor)), orig=64, attn_factor=af)
    c.rope_scaling_factor = factor if factor >= 1 else 1.0
    c.yarn_mscale, c.yarn_mscale_all_dim = mscale, mscale_all_dim
    if factor < 1:   # we refuse s < 1; HF's get_mscale is 1 there: compare the factor alone
        from megatron_lite.model.rope import yarn_attention_factor

        assert yarn_attention_factor(factor, af, mscale, mscale_all_dim) == \
            ROPE_INIT_FUNCTIONS["yarn"](cfg)[1]
        return
    assert_same(rope_inv_freq(c), ROPE_INIT_FUNCTIONS["yarn"](cfg))


@pytest.mark.parametrize("factor,orig,low,high,base,kv", [(8.0, 8192, 1.0, 4.0, 500000.0, 128),
                                                          (32.0, 8192, 1.0, 4.0, 500000.0, 64),
                                                          (4.0, 256, 2.0, 8.0, 10000.0, None)])
def test_llama3_equals_hf(factor, orig, low, high, base, kv):
    params = {"rope_type": "llama3", "factor": factor, "rope_theta": base, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": orig}
    cfg = hf(params, hidden=(kv or 16) * 4, head_dim=kv, max_pos=int(orig * factor))
    got = rope_inv_freq(ours("llama3", factor, base, hidden=(kv or 16) * 4, kv_channels=kv,
                             max_pos=int(orig * factor), orig=orig, low=low, high=high))
    assert_same(got, ROPE_INIT_FUNCTIONS["llama3"](cfg))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="--rope-scaling-type"):
        rope_inv_freq(ours("longrope", 2.0))
    with pytest.raises(ValueError, match="--rope-scaling-factor"):
        rope_inv_freq(ours("linear", 0.5))


@pytest.mark.parametrize("kind,params", [
    ("none", {"rope_type": "default"}),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("linear", {"rope_type": "linear", "factor": 2.0}),
])
def test_rotary_embedding_equals_hf_forward(kind, params):
    factor = params.get("factor", 1.0)
    cfg = hf({**params, "rope_theta": 10000.0}, max_pos=256)
    ref = LlamaRotaryEmbedding(cfg)
    emb = RotaryEmbedding(ours(kind, factor, orig=params.get("original_max_position_embeddings")))
    pos = torch.tensor([[0, 1, 2, 3, 200, 255], [7, 0, 1, 2, 3, 4]])
    cos, sin = emb(pos)
    hcos, hsin = ref(torch.zeros(1, dtype=torch.float32), pos)
    assert cos.shape == (2, 6, 16) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, hcos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hsin, rtol=0, atol=1e-6)


def test_dynamic_forward_follows_hf_cache():
    """Grow past the original length, shrink but stay above it (kept), drop below it (reset)."""
    cfg = hf({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, max_pos=64)
    ref = LlamaRotaryEmbedding(cfg)
    emb = RotaryEmbedding(ours("dynamic", 2.0, max_pos=64))
    x = torch.zeros(1)
    for length in (32, 100, 80, 160, 40, 64, 65):
        pos = torch.arange(length)[None]
        cos, sin = emb(pos)
        hcos, hsin = ref(x, pos)
        torch.testing.assert_close(cos, hcos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, hsin, rtol=0, atol=1e-6)
        torch.testing.assert_close(emb.inv_freq, ref.inv_freq, rtol=1e-6, atol=0)


def test_cos_sin_fp32_under_bf16_distinguish_256_257():
    fp32_freqs = RotaryEmbedding(ours(base=500000.0)).inv_freq
    emb = RotaryEmbedding(ours(base=500000.0)).to(torch.bfloat16)  # as a bf16 model would do
    assert emb.inv_freq.dtype == torch.float32 and torch.equal(emb.inv_freq, fp32_freqs)  # not rounded
    assert torch.tensor(257.0, dtype=torch.bfloat16) == 256  # why fp32 matters: bf16 cannot hold 257
    cos, sin = emb(torch.tensor([[256, 257]]))
    assert cos.dtype == sin.dtype == torch.float32
    # highest frequency (theta_0 = 1 rad/token): cos(256) vs cos(257) differ by ~0.7
    assert cos[0, 0, 0].item() == pytest.approx(math.cos(256.0), abs=1e-5)
    assert cos[0, 1, 0].item() == pytest.approx(math.cos(257.0), abs=1e-5)
    q = torch.randn(1, 2, 2, 16, dtype=torch.bfloat16)
    q[:, 1] = q[:, 0]
    qr, kr = apply_rotary_pos_emb(q, q, cos, sin, fused=False)
    assert qr.dtype == torch.bfloat16 and not torch.equal(qr[:, 0], qr[:, 1])


def test_packed_position_ids_used_not_arange():
    """Positions reset at a document start inside a packed row: doc 2 rotated as if alone."""
    emb = RotaryEmbedding(ours())
    torch.manual_seed(0)
    q = torch.randn(1, 10, 4, 16)
    k = torch.randn(1, 10, 2, 16)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    cos, sin = emb(pos)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin, fused=False)
    cos2, sin2 = emb(torch.arange(6)[None])
    q2, k2 = apply_rotary_pos_emb(q[:, 4:], k[:, 4:], cos2, sin2, fused=False)
    torch.testing.assert_close(qr[:, 4:], q2, rtol=0, atol=0)
    torch.testing.assert_close(kr[:, 4:], k2, rtol=0, atol=0)
    ca, _ = emb(torch.arange(10)[None])
    assert not torch.allclose(ca[:, 4:], cos2)  # arange positions would have given a different rotation


def test_apply_equals_hf_fp32():
    torch.manual_seed(1)
    emb = RotaryEmbedding(ours())
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = emb(torch.randint(0, 200, (2, 5)))
    hq, hk = hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    oq, ok = apply_rotary_pos_emb(q, k, cos, sin, fused=False)
    torch.testing.assert_close(oq, hq, rtol=0, atol=1e-6)
    torch.testing.assert_close(ok, hk, rtol=0, atol=1e-6)
