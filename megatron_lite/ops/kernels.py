"""Which implementation runs the per-row / element-wise ops: ``--fused-kernels torch|liger|apex``.

RMSNorm, SwiGLU and RoPE act on each token's row (RMSNorm: over H; SwiGLU: element by element on
this rank's ``[gate | up]`` columns; RoPE: per head), so tensor parallelism does not change them
and a library kernel can replace ours one for one. :func:`resolve_fused_kernels` maps the flag to
a :class:`FusedKernels` (three callables) or says why it cannot; the model reads it through one
call site per op (``RMSNorm.forward``, ``SwiGLUMLP.forward``, ``model.rope.apply_rotary_pos_emb``).

* ``torch`` (default; the only choice on CPU): our own autograd Functions
  (``ops/swiglu_rmsnorm.py``) and RoPE (the C++/CUDA op or its reference, ``--no-fused-rope``).
* ``liger`` (Liger-Kernel, Triton, CUDA): ``liger_kernel.ops.rms_norm.LigerRMSNormFunction`` in
  casting mode ``"llama"`` (fp32 statistics, the normalised value cast to x's dtype before the
  weight multiply: HF ``LlamaRMSNorm``'s order, the one ours follows), offset 0, not in place;
  ``liger_kernel.ops.swiglu.LigerSiLUMulFunction`` on the gate and up halves;
  ``liger_kernel.transformers.rope.liger_rotary_pos_emb`` (rotate-half, HF layout
  ``[b, heads, s, d]``, so q/k are passed as ``transpose(1, 2)`` views and transposed back).
* ``apex`` (NVIDIA apex, CUDA): RMSNorm only, ``apex.normalization.fused_layer_norm.
  FusedRMSNormAffineMixedDtypesFunction`` (Megatron-LM's MixedFusedRMSNorm; the output takes the
  weight's dtype). apex has no SwiGLU kernel, and its fused RoPE takes one ``[s, 1, 1, d]`` frequency
  table for the whole batch, which cannot express the per-sample positions of packed documents
  (``--reset-position-ids``), so SwiGLU and RoPE stay on the torch path.

Under ``torch.compile`` the torch path's RMSNorm and SwiGLU run their plain references
(``ops/swiglu_rmsnorm.py``): inductor derives and fuses their backward itself, and dynamo cannot
trace the hand-written SwiGLU backward (``out=`` into a non-contiguous slice).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Optional

import torch

from megatron_lite.ops.rope import fused_rope, rope_reference
from megatron_lite.ops.swiglu_rmsnorm import rms_norm, swiglu

FUSED_KERNEL_IMPLS = ("torch", "liger", "apex")

_INSTALL = {"liger": "pip install liger-kernel",
            "apex": "build NVIDIA apex with its CUDA extensions (pip install -v --no-build-isolation "
                    "--config-settings --build-option=--cpp_ext --config-settings --build-option=--cuda_ext "
                    "git+https://github.com/NVIDIA/apex)"}
# The module each library is probed by (importlib.util.find_spec: no import, no CUDA init).
_PROBE_MODULE = {"liger": "liger_kernel", "apex": "apex"}
_KERNEL_KIND = {"liger": "Triton", "apex": "CUDA C++"}  # for the CPU refusal


@dataclasses.dataclass(frozen=True)
class FusedKernels:
    """The callables one ``--fused-kernels`` choice runs.

    Attributes:
        name: ``torch``, ``liger`` or ``apex``.
        rms_norm: ``(x [.., H], weight [H], eps) -> [.., H]``, HF ``LlamaRMSNorm`` semantics.
        swiglu: ``(gate_up [.., 2F]) -> [.., F]`` = silu(gate) * up.
        rope: ``(q [b, s, hq, d], k [b, s, hk, d], cos [b, s, d], sin [b, s, d]) -> (q, k)``
            rotate-half RoPE; None: the model's own RoPE (C++ op, or ``--no-fused-rope``'s reference).
    """

    name: str
    rms_norm: Callable
    swiglu: Callable
    rope: Optional[Callable] = None


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


TORCH_KERNELS = FusedKernels("torch", rms_norm=_torch_rms_norm, swiglu=swiglu, rope=None)


def fused_kernels_unavailable(name: str, device_type: str) -> Optional[str]:
    """Why ``--fused-kernels name`` cannot run on ``device_type`` (one line), or None if it can.

    Args:
        name: the flag's value.
        device_type: ``"cpu"`` or ``"cuda"`` (the run's device).

    Returns:
        None, or a sentence naming the flag and how to fix it.
    """
    if name not in FUSED_KERNEL_IMPLS:
        return f"--fused-kernels {name!r} unknown; choose one of {', '.join(FUSED_KERNEL_IMPLS)}"
    if name == "torch":
        return None
    if device_type != "cuda":
        return (f"--fused-kernels {name} needs CUDA ({name}'s kernels are {_KERNEL_KIND[name]} GPU kernels); "
                f"this run is on {device_type}: use --fused-kernels torch")
    if importlib.util.find_spec(_PROBE_MODULE[name]) is None:
        return f"--fused-kernels {name}: {_PROBE_MODULE[name]} is not installed ({_INSTALL[name]})"
    return None


def _liger_kernels() -> FusedKernels:
    # why: optional GPU-only dependency (Triton), imported only when selected
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def liger_rms_norm(x, weight, eps):
        # (X, W, eps, offset, casting_mode, in_place): HF Llama casting, no in-place dY reuse.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def liger_swiglu(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return LigerSiLUMulFunction.apply(gate, up)

    def liger_rope(q, k, cos, sin):
        # Liger takes HF's [b, heads, s, d] and cos/sin [b, s, d] (unsqueezed at dim 1); our q/k
        # are [b, s, heads, d], so pass transposed views and transpose the results back.
        q2, k2 = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
        return q2.transpose(1, 2), k2.transpose(1, 2)

    return FusedKernels("liger", rms_norm=liger_rms_norm, swiglu=liger_swiglu, rope=liger_rope)


def _apex_kernels() -> FusedKernels:
    # why: optional GPU-only dependency (apex CUDA extensions), imported only when selected
    from apex.normalization.fused_layer_norm import FusedRMSNormAffineMixedDtypesFunction

    def apex_rms_norm(x, weight, eps):
        # (input, weight, normalized_shape, eps, memory_efficient)
        return FusedRMSNormAffineMixedDtypesFunction.apply(x, weight, (x.shape[-1],), eps, False)

    return FusedKernels("apex", rms_norm=apex_rms_norm, swiglu=swiglu, rope=None)


_LOADERS = {"liger": _liger_kernels, "apex": _apex_kernels}


def resolve_fused_kernels(name: str, device_type: str) -> FusedKernels:
    """The :class:`FusedKernels` for ``--fused-kernels name`` on ``device_type``.

    Raises:
        ValueError: the one-line reason of :func:`fused_kernels_unavailable` (config/checks.py turns
            it into a ConfigError before anything slow starts), or the library's import error.
    """
    reason = fused_kernels_unavailable(name, device_type)
    if reason is not None:
        raise ValueError(reason)
    if name == "torch":
        return TORCH_KERNELS
    try:
        return _LOADERS[name]()
    except Exception as exc:  # installed but broken (ABI, missing CUDA extension)
        raise ValueError(f"--fused-kernels {name}: importing {_PROBE_MODULE[name]} failed "
                         f"({type(exc).__name__}: {exc}); {_INSTALL[name]}") from exc
