"""Column- and row-parallel linear layers (Shoeybi et al. 2019, "Megatron-LM", sec. 3, fig. 3).

Weights follow ``torch.nn.Linear`` layout ``[out, in]``. With TP = t:

- ``ColumnParallelLinear``: Y = X A^T with A split by output rows, rank r holds A_r ``[out/t, in]``;
  forward: copy X into the TP region (identity), Y_r = X A_r^T ``[.., out/t]`` (optionally
  all-gathered to ``[.., out]``); backward: dX = sum_r dY_r A_r (all-reduce).
- ``RowParallelLinear``: Y = X A^T with A split by input columns, rank r holds A_r ``[out, in/t]``
  and consumes X_r ``[.., in/t]``; forward: Y = all-reduce_r(X_r A_r^T); backward: identity for dY,
  dX_r = dY A_r is local.

With sequence parallelism (``sequence_parallel=True``, Korthikanti et al. 2022, sec. 4.2.2) the
activations outside these layers are this rank's sequence slice ``[b, s/t, H]`` (sequence dim 1):

- ``ColumnParallelLinear`` all-gathers its input along s instead of copying it, and keeps only the
  local slice for backward, all-gathering it again there for the weight gradient (Megatron's
  ``LinearWithGradAccumulationAndAsyncCommunication``): the saved input costs ``1/t`` of the
  gathered one. The input gradient ``sum_r dY_r A_r`` is reduce-scattered along s.
- ``RowParallelLinear`` reduce-scatters its output along s instead of all-reducing it; its
  (replicated) bias then sees only this rank's tokens, so its gradient is summed over TP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.layers.init import replicated_parameter, set_tensor_model_parallel_attributes, sharded_normal_weight
from megatron_lite.parallel.mappings import (copy_to_tensor_model_parallel_region, gather_along_sequence,
                                             gather_from_tensor_model_parallel_region,
                                             reduce_from_tensor_model_parallel_region,
                                             reduce_scatter_along_sequence,
                                             reduce_scatter_to_sequence_parallel_region,
                                             scatter_to_tensor_model_parallel_region)
from megatron_lite.parallel.state import get_tensor_model_parallel_world_size


class _SequenceParallelLinear(torch.autograd.Function):
    """y = all_gather_s(x_local) W^T + b; saves x_local (not the gathered input) for backward."""

    @staticmethod
    def forward(ctx, x_local, weight, bias):
        ctx.save_for_backward(x_local, weight)
        ctx.has_bias = bias is not None
        return F.linear(gather_along_sequence(x_local), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_local, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            # the partial input gradients of all TP ranks summed, this rank's tokens kept
            grad_x = reduce_scatter_along_sequence(grad_out.matmul(weight.to(grad_out.dtype)))
        if need_w:
            x_full = gather_along_sequence(x_local)
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(
                x_full.reshape(-1, x_full.shape[-1])).to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


class ColumnParallelLinear(torch.nn.Module):
    """Linear layer with its output dimension split across the TP group.

    Args:
        input_size: in features (full).
        output_size: out features (full); must be divisible by TP.
        bias: add a bias (sharded like the output). LLaMA uses none.
        gather_output: all-gather the output to ``[.., output_size]``; else ``[.., output_size/TP]``.
        init_std: weight ~ N(0, init_std^2), drawn TP-independently (see ``layers/init.py``).
        params_dtype: parameter dtype.
        device: parameter device (``meta`` for shape-only models); default: torch's default device.
        copy_input: apply ``copy_to_tensor_model_parallel_region`` to the input. Pass False when the
            caller already did it once for several layers sharing the input (saves all-reduces).
        real_output_size: rows >= this are padding (padded vocab) and initialised to zero.
        output_sizes: fuse several logical outputs (e.g. ``[q, k, v]`` sizes, summing to
            ``output_size``) into one GEMM: each is split over TP on its own, so this rank's output
            is ``[.., out_1/TP | out_2/TP | ...]`` (split it with ``torch.split``). Incompatible
            with ``gather_output``.
        sequence_parallel: the input is this rank's sequence slice ``[b, s/TP, input_size]``;
            it is all-gathered along s inside the GEMM (backward: reduce-scatter), replacing the
            copy. The output is ``[b, s, ..]``. Identity at TP = 1.

    Shapes: input ``[.., input_size]`` replicated (``[b, s/TP, input_size]`` with SP); weight ``[output_size/TP, input_size]``
    (``tensor_model_parallel=True``, ``partition_dim=0``).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, gather_output: bool = False,
                 init_std: float = 0.02, params_dtype: torch.dtype = torch.float32, device=None,
                 copy_input: bool = True, real_output_size: int | None = None,
                 output_sizes: list[int] | None = None, sequence_parallel: bool = False):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(sequence_parallel) and tp > 1
        if output_size % tp:
            raise ValueError(f"ColumnParallelLinear output size {output_size} is not divisible by TP={tp}")
        if output_sizes is not None and gather_output:
            raise ValueError("a fused ColumnParallelLinear (output_sizes) cannot gather_output: the gathered "
                             "layout would interleave the blocks by rank")
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.copy_input = gather_output, copy_input
        self.weight = sharded_normal_weight((output_size, input_size), 0, init_std, dtype=params_dtype,
                                            device=device, real_rows=real_output_size, fused_rows=output_sizes)
        if bias:
            self.bias = replicated_parameter((output_size // tp,), 0.0, dtype=params_dtype, device=device)
            set_tensor_model_parallel_attributes(self.bias, True, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[.., input_size]`` -> ``[.., output_size/TP]`` (or ``[.., output_size]`` if gather_output).
        With sequence parallelism x is ``[b, s/TP, input_size]`` and the output ``[b, s, ..]``."""
        if self.sequence_parallel:
            y = _SequenceParallelLinear.apply(x, self.forward_weight(), self.bias)
        else:
            if self.copy_input:
                x = copy_to_tensor_model_parallel_region(x)
            y = F.linear(x, self.forward_weight(), self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def forward_weight(self) -> torch.Tensor:
        """The ``[rows, input_size]`` matrix the GEMM multiplies by: ``self.weight`` here; a
        subclass whose GEMM spans several parameters (``layers/qkv_linear.py``) assembles it."""
        return self.weight

    def extra_repr(self) -> str:
        """Full (unsharded) sizes and the output mode, for ``print(model)``."""
        sp = ", sequence_parallel=True" if self.sequence_parallel else ""
        return f"in={self.input_size}, out={self.output_size}, gather_output={self.gather_output}{sp}"


class RowParallelLinear(torch.nn.Module):
    """Linear layer with its input dimension split across the TP group; outputs are summed.

    Args:
        input_size: in features (full); must be divisible by TP.
        output_size: out features (full).
        bias: add a replicated bias after the reduction.
        input_is_parallel: the input is already this rank's ``[.., input_size/TP]`` slice (output of
            a ColumnParallelLinear); else a full ``[.., input_size]`` input is split here.
        init_std: weight ~ N(0, init_std^2), TP-independent.
        params_dtype, device: as for ColumnParallelLinear.
        sequence_parallel: reduce-scatter the output along s (dim 1) to this rank's
            ``[b, s/TP, output_size]`` instead of all-reducing it (backward: all-gather). The bias,
            replicated, then gets gradients from this rank's tokens only and is summed over TP.

    Shapes: weight ``[output_size, input_size/TP]`` (``partition_dim=1``); output ``[.., output_size]``
    replicated across TP (``[b, s/TP, output_size]`` with SP).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, input_is_parallel: bool = True,
                 init_std: float = 0.02, params_dtype: torch.dtype = torch.float32, device=None,
                 sequence_parallel: bool = False):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(sequence_parallel) and tp > 1
        if input_size % tp:
            raise ValueError(f"RowParallelLinear input size {input_size} is not divisible by TP={tp}")
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.weight = sharded_normal_weight((output_size, input_size), 1, init_std, dtype=params_dtype,
                                            device=device)
        if bias:
            self.bias = replicated_parameter((output_size,), 0.0, dtype=params_dtype, device=device)
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[.., input_size/TP]`` (or full if not input_is_parallel) -> ``[.., output_size]``
        (``[b, s/TP, output_size]`` with sequence parallelism)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(F.linear(x, self.weight))
            # identity forward, all-reduce backward: the bias gradient summed over all tokens
            return y + copy_to_tensor_model_parallel_region(self.bias) if self.bias is not None else y
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        """Full (unsharded) sizes and the input mode, for ``print(model)``."""
        sp = ", sequence_parallel=True" if self.sequence_parallel else ""
        return f"in={self.input_size}, out={self.output_size}, input_is_parallel={self.input_is_parallel}{sp}"
