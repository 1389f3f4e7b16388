"""Fused RoPE custom op == PyTorch reference (fwd/bwd, fp32/bf16/fp16), opcheck, torch.compile, fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_lite.ops import rope as rope_ops
from megatron_lite.ops.rope import fused_rope, fused_rope_available, rope_backward_reference, rope_reference

HERE = os.path.dirname(os.path.abspath(__file__))

needs_ext = pytest.mark.skipif(not fused_rope_available(), reason="megatron_lite._rope_ops not built "
                               "(python setup.py build_ext --inplace)")


def inputs(b=2, s=7, h=3, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype)
    # general (not duplicated-half) cos/sin so the backward's index pairing is really tested
    cos = torch.randn(b, s, d, generator=g).to(device)
    sin = torch.randn(b, s, d, generator=g).to(device)
    return x, cos, sin


def by_hand(x, cos, sin):
    """out[i] = x[i] cos[i] - x[i+d/2] sin[i]; out[i+d/2] = x[i+d/2] cos[i+d/2] + x[i] sin[i+d/2]."""
    x = x.double()
    half = x.shape[-1] // 2
    c, s = cos.double()[:, :, None], sin.double()[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), -1)


def test_reference_equals_hand_formula():
    x, cos, sin = inputs()
    torch.testing.assert_close(rope_reference(x, cos, sin).double(), by_hand(x, cos, sin), rtol=1e-6, atol=1e-6)
    # backward reference == autograd through the reference
    xr = x.clone().requires_grad_()
    g = torch.randn_like(x)
    rope_reference(xr, cos, sin).backward(g)
    torch.testing.assert_close(rope_backward_reference(g, cos, sin), xr.grad, rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float16, 0.0)])
def test_fused_equals_reference_forward_backward(dtype, tol):
    """Same fp32 math then one rounding, so fused == reference bit for bit in every dtype."""
    x, cos, sin = inputs(b=3, s=33, h=4, d=64, dtype=dtype)
    g = torch.randn(x.shape).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_r = fused_rope(xa, cos, sin), rope_reference(xb, cos, sin)
    assert out_f.dtype == dtype
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=tol)
    out_f.backward(g)
    out_r.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=tol)


@needs_ext
def test_fused_large_multithreaded_and_strided():
    """Above the OpenMP threshold and with a non-contiguous input (a transposed view)."""
    x, cos, sin = inputs(b=2, s=128, h=8, d=64)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(fused_rope(xt, cos, sin), rope_reference(x, cos, sin), rtol=0, atol=0)


@needs_ext
def test_opcheck():
    x, cos, sin = inputs(d=8)
    for xx in (x, x.clone().requires_grad_()):
        torch.library.opcheck(torch.ops.megatron_lite.rope_fwd.default, (xx, cos, sin))
    torch.library.opcheck(torch.ops.megatron_lite.rope_bwd.default, (x, cos, sin))


@needs_ext
def test_torch_compile_fullgraph_forward_backward():
    x, cos, sin = inputs(d=8)
    compiled = torch.compile(lambda a, c, s: fused_rope(a, c, s) * 2.0, fullgraph=True, backend="aot_eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xa, cos, sin)
    ref = rope_reference(xb, cos, sin) * 2.0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


@needs_ext
def test_bad_inputs_raise():
    x, cos, sin = inputs()
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_rope(x, cos[:, :, :8], sin[:, :, :8])
    with pytest.raises(RuntimeError, match="fp32 cos/sin"):
        torch.ops.megatron_lite.rope_fwd(x, cos.double(), sin.double())


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(rope_ops, "_rope_ops", None)
    monkeypatch.setattr(rope_ops, "_EXT_ERROR", ImportError("simulated missing build"))
    monkeypatch.setattr(rope_ops, "_warned", False)
    x, cos, sin = inputs()
    with pytest.warns(RuntimeWarning, match="falls back") as rec:
        out1 = fused_rope(x, cos, sin)
        out2 = fused_rope(x, cos, sin)
    assert len([w for w in rec if "falls back" in str(w.message)]) == 1
    torch.testing.assert_close(out1, rope_reference(x, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)


def test_fallback_when_extension_absent_in_fresh_process():
    """Import with the extension hidden: the front still works (reference) and warns exactly once."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["megatron_lite._rope_ops"] = None   # makes `from megatron_lite import _rope_ops` fail
        import torch
        from megatron_lite.ops.rope import fused_rope, fused_rope_available, rope_reference
        assert not fused_rope_available()
        x, c, s = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = fused_rope(x, c, s); fused_rope(x, c, s)
        assert sum("falls back" in str(m.message) for m in w) == 1, [str(m.message) for m in w]
        assert torch.equal(a, rope_reference(x, c, s))
        print("ok")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE), env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_equals_reference(dtype):
    x, cos, sin = inputs(b=2, s=64, h=4, d=64, dtype=dtype, device="cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_r = fused_rope(xa, cos, sin), rope_reference(xb, cos, sin)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 2e-2)
    g = torch.randn_like(out_f)
    out_f.backward(g)
    out_r.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 2e-2)
