"""SwiGLU activation and RMSNorm as autograd Functions with hand-written backward passes.

Both compute exactly what the plain PyTorch references below compute (same ops in the same order
in forward, so forward outputs are bitwise equal); the gain is in backward, which autograd would
otherwise run as a chain of separate element-wise kernels, each allocating a full-size temporary:

* :func:`swiglu` on the fused ``[gate | up]`` output of ``gate_up_proj`` writes both input
  gradients straight into one ``[.., 2F]`` buffer (``out=`` slices), so the ``cat`` that
  autograd's ``chunk`` backward performs (one extra pass and allocation of ``[b, s, 2F/TP]`` per
  layer) disappears, and two temporaries with it.
* :func:`rms_norm` saves only ``x`` and the per-row ``rstd`` ``[.., 1]`` and computes
  ``dx = rstd * (g - x_hat * mean(g * x_hat))``, ``g = dy * w`` in fewer passes than autograd's
  pow/mean/rsqrt/mul chain.

Tests: tests/test_fused_ops.py (values and gradients against the references and torch.func).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up = [gate | up]`` ``[.., 2F]`` -> ``[.., F]`` (Shazeer 2020, eq. 6)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        out = act * up
        ctx.save_for_backward(gate, up, act)
        return out

    @staticmethod
    def backward(ctx, dy):
        gate, up, act = ctx.saved_tensors
        f = gate.shape[-1]
        grad = torch.empty(gate.shape[:-1] + (2 * f,), dtype=gate.dtype, device=gate.device)
        # d up = dy * silu(gate); d gate = silu'(gate) * (dy * up), silu' by ATen's own kernel,
        # which reads dy * up from the gate half and overwrites it element by element (no temp).
        torch.mul(dy, act, out=grad[..., f:])
        dgate = torch.mul(dy, up, out=grad[..., :f])
        torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)
        return grad


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the fused ``[gate | up]`` projection.

    Args:
        gate_up: ``[.., 2F]`` (per TP rank: ``[b, s, 2 F/TP]``), any float dtype.

    Returns:
        ``[.., F]`` = silu(gate) * up, equal to :func:`swiglu_reference`; the gradient w.r.t.
        ``gate_up`` is one contiguous ``[.., 2F]`` tensor.
    """
    # Under torch.compile the reference: inductor fuses it and derives the backward itself, while
    # dynamo cannot trace _SwiGLU.backward (out= into a non-contiguous slice) and would break the graph.
    if not torch.is_grad_enabled() or not gate_up.requires_grad or torch.compiler.is_compiling():
        return swiglu_reference(gate_up)
    return _SwiGLU.apply(gate_up)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019, eq. 4), statistics in fp32 and the
    normalised value cast back to x's dtype before the weight, as HF ``LlamaRMSNorm``."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd                       # [.., H] fp32
        dw = None
        if ctx.needs_input_grad[1]:
            # weight * xhat.to(dtype): dW = sum over rows of dy * xhat (in xhat's rounded dtype)
            dw = (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).float()                 # dL/dxhat
            # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)) (rstd' = -rstd^3 x / H)
            dot = (g * xhat).mean(-1, keepdim=True)
            dx = g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with a hand-written backward; values equal :func:`rms_norm_reference`.

    Args:
        x: ``[.., H]`` activations (``[b, s, H]``), any float dtype.
        weight: ``[H]`` scale.
        eps: added to mean(x^2) before the square root.

    Returns:
        ``[.., H]`` in the promotion of x's and the weight's dtypes.
    """
    # Under torch.compile the reference, which inductor fuses into one kernel each way.
    if (not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad)
            or torch.compiler.is_compiling()):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
