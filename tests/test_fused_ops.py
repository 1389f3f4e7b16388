"""Hand-written backward passes used for speed (megatron_lite/ops/swiglu_rmsnorm.py, the in-place
vocab-parallel cross entropy): values and gradients equal the plain PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.ops.swiglu_rmsnorm import rms_norm, rms_norm_reference, swiglu, swiglu_reference


def _grads(fn, inputs, dy):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    out.backward(dy)
    return out.detach(), [x.grad for x in inputs]


def test_swiglu_gradcheck_and_equals_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x,))
    gu = torch.randn(4, 16, 2 * 24, generator=g)
    dy = torch.randn(4, 16, 24, generator=g)
    out, (grad,) = _grads(swiglu, [gu], dy)
    ref, (ref_grad,) = _grads(swiglu_reference, [gu], dy)
    assert torch.equal(out, ref)  # same forward ops
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)
    assert grad.is_contiguous() and grad.shape == gu.shape
    with torch.no_grad():  # inference path: the reference itself
        assert torch.equal(swiglu(gu), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 32, generator=g) * 3).to(dtype)
    w = torch.randn(32, generator=g).to(dtype)
    dy = torch.randn(3, 5, 32, generator=g).to(dtype)
    out, (gx, gw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), [x, w], dy)
    ref, (rx, rw) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], dy)
    assert torch.equal(out, ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gx.float(), rx.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=tol, atol=tol)
    # (gradcheck in float64 does not apply: like HF, the statistics are taken in fp32.)


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_inplace_flag(inplace):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 40, generator=g) * 4
    labels = torch.randint(0, 40, (2, 7), generator=g)
    labels[0, 3] = -100
    dy = torch.rand(2, 7, generator=g)
    x = logits.clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf, as the LM head's output is
    loss = vocab_parallel_cross_entropy(y, labels, inplace=inplace)
    assert torch.equal(y.detach(), logits) != inplace  # overwritten only when allowed
    loss.backward(dy)
    ref_x = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x.view(-1, 40), labels.view(-1), reduction="none").view(2, 7)
    ref.backward(dy)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)
    assert loss[0, 3] == 0 and torch.all(x.grad[0, 3] == 0)
