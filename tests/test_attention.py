"""Attention backends == eager reference (forward, backward, GQA, documents); packed-sample invariant."""

import math

import numpy as np
import pytest
import torch

from megatron_lite.model import attention as attn_mod
from megatron_lite.model.attention import attention_forward, flash_attn_available, resolve_attention_backend

CPU_GRAD_BACKENDS = ["sdpa"]          # differentiable on CPU (flex has no CPU backward in torch 2.13)
CPU_FWD_BACKENDS = ["sdpa", "flex"]


def make(b, s, hq, hk, d, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype) for h in (hq, hk, hk)]


def numpy_reference(q, k, v, bounds, scale):
    """Independent float64 loop: each document, each head, causal softmax attention."""
    q, k, v = (t.detach().double().numpy() for t in (q, k, v))
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    qf, kf, vf = (t.reshape(b * s, t.shape[2], d) for t in (q, k, v))
    out = np.zeros_like(qf)
    for st, e in zip(bounds, bounds[1:]):
        for h in range(hq):
            sc = qf[st:e, h] @ kf[st:e, h // rep].T * scale
            sc[np.triu_indices(e - st, 1)] = -np.inf
            p = np.exp(sc - sc.max(-1, keepdims=True))
            out[st:e, h] = (p / p.sum(-1, keepdims=True)) @ vf[st:e, h // rep]
    return torch.from_numpy(out.reshape(b, s, hq, d))


CASES = [  # (b, s, hq, hk, d, cu_seqlens or None)
    (2, 16, 4, 4, 8, None),                               # MHA, one causal segment per row
    (2, 16, 4, 2, 8, [0, 5, 16, 20, 21, 32]),             # GQA 2:1, short docs -> dense mask path
    (1, 24, 6, 1, 8, [0, 3, 10, 24]),                     # MQA
    (2, 256, 2, 1, 8, [0, 100, 256, 300, 512]),           # avg 128 tokens/doc -> per-document loop
]


@pytest.mark.parametrize("b,s,hq,hk,d,cu", CASES)
def test_eager_equals_numpy(b, s, hq, hk, d, cu):
    q, k, v = make(b, s, hq, hk, d)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    out = attention_forward(q, k, v, cu_t, None, "eager", softmax_scale=0.3)
    ref = numpy_reference(q, k, v, cu or list(range(0, b * s + 1, s)), 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", CPU_FWD_BACKENDS)
@pytest.mark.parametrize("b,s,hq,hk,d,cu", CASES)
def test_backend_forward_equals_eager(backend, b, s, hq, hk, d, cu):
    q, k, v = make(b, s, hq, hk, d, seed=1)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    with torch.no_grad():
        ref = attention_forward(q, k, v, cu_t, None, "eager")
        out = attention_forward(q, k, v, cu_t, None, backend)
    assert out.shape == (b, s, hq, d) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", CPU_GRAD_BACKENDS)
@pytest.mark.parametrize("b,s,hq,hk,d,cu", CASES)
def test_backend_backward_equals_eager(backend, b, s, hq, hk, d, cu):
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu else None
    grads = {}
    for name in ("eager", backend):
        q, k, v = (t.requires_grad_() for t in make(b, s, hq, hk, d, seed=2))
        out = attention_forward(q, k, v, cu_t, None, name)
        w = torch.linspace(-1, 1, out.numel()).view_as(out)  # non-uniform upstream gradient
        (out * w).sum().backward()
        grads[name] = (q.grad, k.grad, v.grad)
    for ga, gb in zip(grads["eager"], grads[backend]):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("backend", ["eager"] + CPU_FWD_BACKENDS)
def test_packed_sample_invariant(backend):
    """Each document's outputs inside a packed [2, 64] batch == that document run alone."""
    b, s, hq, hk, d = 2, 64, 4, 2, 8
    q, k, v = make(b, s, hq, hk, d, seed=3)
    bounds = [0, 10, 40, 64, 64 + 33, 128]
    with torch.no_grad():
        packed = attention_forward(q, k, v, torch.tensor(bounds, dtype=torch.int32), 33, backend)
        flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
        for st, e in zip(bounds, bounds[1:]):
            alone = attention_forward(*(t[st:e][None] for t in flat), None, None, backend)
            torch.testing.assert_close(packed.reshape(b * s, hq, d)[st:e], alone[0], rtol=0, atol=2e-6)


def test_packed_invariant_per_document_loop_path():
    """Long documents take the per-document SDPA loop; outputs and grads equal each document alone."""
    s, d = 512, 8
    bounds = [0, 200, 512]
    q, k, v = (t.requires_grad_() for t in make(1, s, 2, 1, d, seed=4))
    out = attention_forward(q, k, v, torch.tensor(bounds, dtype=torch.int32), 312, "sdpa")
    out.sum().backward()
    for st, e in zip(bounds, bounds[1:]):
        qa, ka, va = (t.detach()[:, st:e].clone().requires_grad_() for t in (q, k, v))
        alone = attention_forward(qa, ka, va, None, None, "sdpa")
        alone.sum().backward()
        torch.testing.assert_close(out[:, st:e], alone, rtol=0, atol=2e-6)
        torch.testing.assert_close(q.grad[:, st:e], qa.grad, rtol=0, atol=2e-6)
        torch.testing.assert_close(k.grad[:, st:e], ka.grad, rtol=0, atol=2e-6)


def test_sdpa_paths_agree():
    """Dense block-diagonal mask and per-document loop give the same answer on the same input."""
    q, k, v = make(2, 256, 2, 2, 8, seed=5)
    cu = torch.tensor([0, 100, 256, 300, 512], dtype=torch.int32)
    loop = attention_forward(q, k, v, cu, None, "sdpa")
    old = attn_mod._MIN_AVG_DOC_TOKENS_FOR_LOOP
    try:
        attn_mod._MIN_AVG_DOC_TOKENS_FOR_LOOP = 10 ** 9
        dense = attention_forward(q, k, v, cu, None, "sdpa")
    finally:
        attn_mod._MIN_AVG_DOC_TOKENS_FOR_LOOP = old
    torch.testing.assert_close(dense, loop, rtol=0, atol=3e-6)


def test_flex_cpu_grad_raises_clear_error():
    q, k, v = (t.requires_grad_() for t in make(1, 16, 2, 2, 8))
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        attention_forward(q, k, v, None, None, "flex")


def test_flex_cpu_inference_with_grad_requiring_inputs():
    """Under no_grad, flex serves CPU inference even when q/k/v are parameters' outputs."""
    q, k, v = (t.requires_grad_() for t in make(1, 16, 2, 1, 8, seed=8))
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    with torch.no_grad():
        out = attention_forward(q, k, v, cu, 10, "flex")
        ref = attention_forward(q, k, v, cu, 10, "eager")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", CPU_FWD_BACKENDS)
def test_boundary_cache_follows_new_and_mutated_cu_seqlens(backend):
    """Host boundaries / flex block masks are cached per cu_seqlens tensor; a new tensor or an in-place
    edit (same object, new version) must not reuse the stale ones."""
    q, k, v = make(2, 16, 2, 2, 8, seed=9)
    cu = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    with torch.no_grad():
        for bounds in ([0, 5, 16, 20, 32], [0, 9, 16, 27, 32]):
            if bounds[1] == 9:
                cu[1], cu[3] = 9, 27  # in place: same object, bumped version
            for other in (cu, torch.tensor(bounds, dtype=torch.int32)):
                out = attention_forward(q, k, v, other, None, backend)
                ref = numpy_reference(q, k, v, bounds, 1 / math.sqrt(8))
                torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


def test_default_scale_and_bf16_dtype():
    q, k, v = make(1, 8, 2, 2, 16, seed=6)
    a = attention_forward(q, k, v, None, None, "sdpa")
    b = attention_forward(q, k, v, None, None, "sdpa", softmax_scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    out = attention_forward(*(t.bfloat16() for t in (q, k, v)), None, None, "sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), a, rtol=0, atol=2e-2)


def test_bad_inputs_raise():
    q, k, v = make(2, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="every row start"):
        attention_forward(q, k, v, torch.tensor([0, 4, 12, 16], dtype=torch.int32), None, "sdpa")
    with pytest.raises(ValueError, match="from 0 to b\\*s"):
        attention_forward(q, k, v, torch.tensor([0, 8, 15], dtype=torch.int32), None, "sdpa")
    with pytest.raises(ValueError, match="divisible"):
        attention_forward(q, *make(2, 8, 4, 3, 8)[1:], None, None, "sdpa")
    with pytest.raises(ValueError, match="--attention-backend"):
        attention_forward(q, k, v, None, None, "xformers")


def test_resolve_backend(capsys):
    attn_mod._announced.clear()
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"
    printed = capsys.readouterr().err  # stderr: stdout is for --json results
    assert printed.count("auto -> sdpa on cpu") == 1  # printed once
    assert resolve_attention_backend("eager", "cpu") == "eager"
    assert resolve_attention_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="--attention-backend"):
        resolve_attention_backend("fast", "cpu")
    if not flash_attn_available():
        with pytest.raises(ValueError, match="flash"):
            resolve_attention_backend("flash", "cpu")


def test_flash_path_wiring_with_fake_kernel(monkeypatch):
    """The flash backend's plumbing (flattening, cu_seqlens, max_seqlen, scale, causal) on CPU, with a
    stand-in ``flash_attn_varlen_func`` that follows flash-attn's documented varlen contract."""
    import sys
    import types

    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((cu_q.dtype, cu_q.tolist(), max_q, max_k, dropout_p, softmax_scale, causal))
        assert q.dim() == 3 and torch.equal(cu_q, cu_k)
        ref = numpy_reference(q[None], k[None], v[None], cu_q.tolist(), softmax_scale)[0]
        return ref.to(q.dtype)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_varlen))
    q, k, v = make(2, 16, 4, 2, 8, seed=10, dtype=torch.bfloat16)
    bounds = [0, 5, 16, 20, 32]
    out = attention_forward(q, k, v, torch.tensor(bounds, dtype=torch.int32), 12, "flash", softmax_scale=0.25)
    assert calls[-1] == (torch.int32, bounds, 12, 12, 0.0, 0.25, True)
    ref = attention_forward(q, k, v, torch.tensor(bounds, dtype=torch.int32), None, "eager", softmax_scale=0.25)
    assert out.shape == (2, 16, 4, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=1e-2)
    attention_forward(q, k, v, None, None, "flash")  # no documents: one segment per row
    assert calls[-1][1:4] == ([0, 16, 32], 16, 16) and calls[-1][5] == pytest.approx(1 / math.sqrt(8))
    with pytest.raises(ValueError, match="fp16/bf16"):
        attention_forward(q.float(), k.float(), v.float(), None, None, "flash")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
def test_cuda_backends_equal_eager(backend):
    if backend == "flash" and not flash_attn_available():
        pytest.skip("flash-attn not importable")
    bounds = [0, 100, 256, 300, 512]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    grads = {}
    for name in ("eager", backend):
        q, k, v = (t.requires_grad_() for t in make(2, 256, 8, 2, 64, seed=7, dtype=torch.bfloat16, device="cuda"))
        out = attention_forward(q, k, v, cu, 156, name)
        out.float().square().sum().backward()
        grads[name] = (out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float())
    for ga, gb in zip(grads["eager"], grads[backend]):
        torch.testing.assert_close(gb, ga, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,fused", [("eager", False), ("sdpa", True), ("sdpa", False), ("flex", True)])
def test_model_packed_sample_invariant(backend, fused):
    """Whole LlamaModel (RoPE with reset position_ids + document-masked attention): the logits of each
    document inside a packed row equal the logits of that document run alone."""
    from megatron_lite.model.model_config import ModelConfig
    from megatron_lite.model.llama import LlamaModel

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      vocab_size=100, seq_length=24, max_position_embeddings=64, attention_backend=backend,
                      no_fused_rope=not fused)
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    with torch.no_grad():  # sharpen attention so positions matter (init std 0.02 makes it near-uniform)
        scaled = [p.mul_(30.0) for n, p in model.named_parameters()
                  if any(key in n for key in ("qkv_proj", "q_proj", "k_proj"))]
    assert len(scaled) >= 2
    lengths = [7, 17]
    tokens = torch.randint(0, 100, (1, 24))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 24], dtype=torch.int32)
    with torch.no_grad():
        packed = model(tokens, pos, cu, 17)
        for st, n in zip((0, 7), lengths):
            alone = model(tokens[:, st:st + n], torch.arange(n)[None], None, None)
            torch.testing.assert_close(packed[:, st:st + n, :100], alone[:, :, :100], rtol=0, atol=2e-5)
        # without the document mask, document 2 attends to document 1 and its logits change
        # (the check above can fail). Shifted positions alone would not show: RoPE scores are relative.
        leaky = model(tokens, pos, None, None)
        assert (leaky[:, 7:, :100] - packed[:, 7:, :100]).abs().max() > 1e-3


def test_auto_backend_choice_is_announced_on_stderr_not_stdout(capsys):
    """Tools print machine-readable results (``eval_ppl --json``) on stdout; the one-time note on
    the attention backend must not land among them."""
    from megatron_lite.model import attention

    attention._announced.clear()
    assert attention.resolve_attention_backend("auto", "cpu") == "sdpa"
    out, err = capsys.readouterr()
    assert out == "" and "--attention-backend auto -> sdpa on cpu" in err
