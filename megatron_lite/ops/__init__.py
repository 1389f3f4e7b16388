"""Python fronts of the native ops in ``csrc/``, each beside its pure-PyTorch reference.

``fused_rope(x, cos, sin)``: rotate-half RoPE as the torch custom op ``megatron_lite::rope_fwd``
(C++ OpenMP CPU kernel, CUDA kernel when built with CUDA); falls back to the reference with one
warning when ``megatron_lite._rope_ops`` is not built.
"""

from megatron_lite.ops.rope import fused_rope, fused_rope_available, rope_reference

__all__ = ["fused_rope", "fused_rope_available", "rope_reference"]
