"""``--compile``: ``torch.compile`` of each transformer block (torchtitan's per-block scheme), and
``--fused-kernels``: which library runs RMSNorm, SwiGLU and RoPE (``megatron_lite/ops/kernels.py``).

Per block rather than the whole model: every block has the same code and shapes, so dynamo traces
one block once and the L blocks reuse its compiled code (compile time independent of depth), and
activation recomputation keeps working unchanged (``torch.utils.checkpoint`` around a compiled
block, or the selective checkpoint inside it).

What runs where inside a compiled block:

* RMSNorm, SwiGLU, RoPE, the residual adds and dropout are traced and fused (the torch path's
  RMSNorm/SwiGLU switch to their references under compile, see ``ops/kernels.py``).
* The TP collectives (``parallel/mappings.py``: autograd Functions around ``dist.all_reduce`` with a
  host timer) are not traceable; dynamo breaks the graph around them and they run eagerly, so the
  values are those of eager mode.
* Attention with packed documents (``cu_seqlens``), and the flash/flex backends, run eagerly
  between two graphs (``model/attention.py``, ``_IN_GRAPH_BACKENDS``): the document boundaries are
  host data, and a graph specialised on them would be recompiled on every new layout.

No recompilation after the first step: the only per-batch values a block sees besides fixed-shape
tensors are ``cu_seqlens`` (its length, the number of documents + 1, changes from batch to batch)
and ``max_seqlen`` (an int). :func:`compile_transformer_blocks` registers a forward pre-hook on the
model that marks ``cu_seqlens``'s length dynamic (one symbolic size instead of one graph per
document count) and passes ``max_seqlen`` as None (an int argument is specialised by dynamo;
the attention recomputes it from the boundaries it already reads to the host). Without
``--reset-attention-mask`` every training batch's ``cu_seqlens`` is just the row starts; the hook
then passes None (the same attention), which keeps sdpa/eager attention inside the graph (measured
on CPU: compiled/eager 1.11 with attention in the graph, 1.01 with it eager between graphs,
``bench/bench_train.py``). What still
compiles once more, on first use: evaluation (``no_grad``/``eval()`` are guarded modes) and a
batch of another shape ``[b, s]``.

Dropout inside a compiled block draws from inductor's own RNG (seeded from torch's generator), so
with ``--hidden-dropout > 0`` compiled and eager runs drop different elements (both correct).
"""

from __future__ import annotations

import torch

from megatron_lite.model.transformer import RMSNorm, SelfAttention, SwiGLUMLP
from megatron_lite.ops.kernels import resolve_fused_kernels

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def _set_arg(args: list, kwargs: dict, index: int, name: str, value) -> None:
    if name in kwargs:
        kwargs[name] = value
    elif len(args) > index:
        args[index] = value


def _only_row_starts(cu: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether ``cu_seqlens`` holds exactly the row starts of ``tokens`` [b, s] (one causal segment
    per row, what every batch carries without ``--reset-attention-mask``)."""
    b, s = tokens.shape
    return cu.numel() == b + 1 and cu.tolist() == list(range(0, b * s + 1, s))


class _BlockInputs:
    """Forward pre-hook of LlamaModel ``(tokens, position_ids, cu_seqlens, max_seqlen, labels)``
    that keeps the compiled blocks' inputs stable from batch to batch (see the module docstring)."""

    def __init__(self, packed_documents: bool):
        self.packed_documents = packed_documents

    def __call__(self, module, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        cu = kwargs.get("cu_seqlens") if "cu_seqlens" in kwargs else (args[2] if len(args) > 2 else None)
        tokens = kwargs.get("tokens") if "tokens" in kwargs else args[0]
        if cu is not None and not self.packed_documents and _only_row_starts(cu, tokens):
            # The same attention as cu_seqlens=None (one segment per row), and None lets the
            # sdpa/eager call into the compiled graph. Decided per run, not per batch: a run whose
            # batches may carry documents keeps the tensor always, so the graph never flips.
            cu = None
            _set_arg(args, kwargs, 2, "cu_seqlens", None)
        if cu is not None:
            torch._dynamo.mark_dynamic(cu, 0)
        _set_arg(args, kwargs, 3, "max_seqlen", None)
        return tuple(args), kwargs


def compile_transformer_blocks(model, backend: str = "inductor", packed_documents: bool = True) -> None:
    """Compile every ``model.layers[i]`` in place (``nn.Module.compile``: parameter names and the
    state dict are unchanged) and make packed-document batches reuse the compiled code.

    Args:
        model: a ``LlamaModel`` (before or after DeepSpeed wraps it; the engine calls it).
        backend: ``torch.compile`` backend: ``inductor`` (default, C++/Triton code generation),
            ``aot_eager`` (traced, not code-generated; for tests) or ``eager`` (dynamo only).
        packed_documents: whether batches may carry document boundaries (training:
            ``--reset-attention-mask``). False: a ``cu_seqlens`` of only row starts is dropped
            before the blocks (same attention), so sdpa/eager attention stays inside the graph;
            ``cu_seqlens`` with documents still works then (attention eager), compiled once more.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend {backend!r} unknown; choose one of {', '.join(COMPILE_BACKENDS)}")
    for layer in model.layers:
        layer.compile(backend=backend)
    model.register_forward_pre_hook(_BlockInputs(packed_documents), with_kwargs=True)


def use_fused_kernels(model, name: str, device_type: str) -> None:
    """Point every RMSNorm, SwiGLU MLP and attention block of ``model`` at ``--fused-kernels name``.

    Raises:
        ValueError: the kernels cannot run here (one line, see ``ops.kernels.fused_kernels_unavailable``).
    """
    kernels = resolve_fused_kernels(name, device_type)
    for module in model.modules():
        if isinstance(module, (RMSNorm, SwiGLUMLP, SelfAttention)):
            module.kernels = kernels
