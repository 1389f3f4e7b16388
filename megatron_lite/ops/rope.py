"""Fused rotate-half RoPE: torch custom op front for ``csrc/rope.cpp`` / ``csrc/rope_cuda.cu``.

The extension ``megatron_lite._rope_ops`` registers (TORCH_LIBRARY, C++) two ops:

* ``megatron_lite::rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor``
  ``out = x * cos + rotate_half(x) * sin`` (Su et al. 2021, RoFormer eq. 34, GPT-NeoX/HF layout),
* ``megatron_lite::rope_bwd(Tensor grad, Tensor cos, Tensor sin) -> Tensor``
  ``grad_x = grad * cos + rotate_half^T(grad * sin)`` with ``rotate_half^T = -rotate_half``.

This module adds their fake (meta) kernels for torch.compile and the autograd formula
(``torch.library.register_autograd``), so the forward op is differentiable and traceable. Shapes:
x [b, s, h, d] (any float dtype, output in x's dtype, math in fp32); cos/sin [b, s, d] fp32, which
receive no gradient (they are position tables, not parameters).

Build: ``flock /tmp/ml_build.lock python setup.py build_ext --inplace``. Without the build,
:func:`fused_rope` warns once and runs :func:`rope_reference`.
"""

from __future__ import annotations

import warnings

import torch

try:
    import megatron_lite._rope_ops as _rope_ops  # noqa: F401  (loading it registers the ops)
    _EXT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
    _rope_ops = None
    _EXT_ERROR = exc

_warned = False


def fused_rope_available() -> bool:
    """True when the C++ extension loaded and registered ``torch.ops.megatron_lite.rope_fwd``."""
    return _rope_ops is not None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch RoPE: x [b, s, h, d], cos/sin [b, s, d] -> [b, s, h, d] in x's dtype (fp32 math)."""
    xf = x.float()
    c, s_ = cos.float()[:, :, None, :], sin.float()[:, :, None, :]
    return (xf * c + _rotate_half(xf) * s_).to(x.dtype)


def rope_backward_reference(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`rope_reference` w.r.t. x: grad * cos - rotate_half(grad * sin)."""
    gf = grad.float()
    c, s_ = cos.float()[:, :, None, :], sin.float()[:, :, None, :]
    return (gf * c - _rotate_half(gf * s_)).to(grad.dtype)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        raise ValueError(f"fused_rope expects x [b, s, h, d], cos/sin [b, s, d]; got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if x.shape[:2] != cos.shape[:2] or x.shape[-1] != cos.shape[-1] or x.shape[-1] % 2:
        raise ValueError(f"fused_rope shape mismatch: x {tuple(x.shape)} vs cos {tuple(cos.shape)} "
                         "(need equal b, s, d and even d)")


if _rope_ops is not None:
    @torch.library.register_fake("megatron_lite::rope_fwd")
    def _rope_fwd_fake(x, cos, sin):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("megatron_lite::rope_bwd")
    def _rope_bwd_fake(grad, cos, sin):
        return torch.empty_like(grad, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)

    def _backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return torch.ops.megatron_lite.rope_bwd(grad, cos, sin), None, None

    torch.library.register_autograd("megatron_lite::rope_fwd", _backward, setup_context=_setup_context)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x by RoPE with the native kernel (reference fallback, one warning, if not built).

    Args:
        x: [b, s, h, d] fp32/bf16/fp16 queries or keys.
        cos, sin: [b, s, d] (fp32 expected; other dtypes are upcast).

    Returns:
        [b, s, h, d] in x's dtype, differentiable w.r.t. x.

    Raises:
        ValueError: mismatched shapes or odd head dim.
    """
    global _warned
    _check(x, cos, sin)
    if _rope_ops is None:
        if not _warned:
            _warned = True
            warnings.warn(f"megatron_lite._rope_ops not built ({_EXT_ERROR}); fused RoPE falls back to the "
                          "PyTorch reference. Build it with `python setup.py build_ext --inplace`.",
                          RuntimeWarning, stacklevel=2)
        return rope_reference(x, cos, sin)
    return torch.ops.megatron_lite.rope_fwd(x, cos.float(), sin.float())
