"""Column- and row-parallel linear layers (Shoeybi et al. 2019, "Megatron-LM", sec. 3, fig. 3).

Weights follow ``torch.nn.Linear`` layout ``[out, in]``. With TP = t:

- ``ColumnParallelLinear``: Y = X A^T with A split by output rows, rank r holds A_r ``[out/t, in]``;
  forward: copy X into the TP region (identity), Y_r = X A_r^T ``[.., out/t]`` (optionally
  all-gathered to ``[.., out]``); backward: dX = sum_r dY_r A_r (all-reduce).
- ``RowParallelLinear``: Y = X A^T with A split by input columns, rank r holds A_r ``[out, in/t]``
  and consumes X_r ``[.., in/t]``; forward: Y = all-reduce_r(X_r A_r^T); backward: identity for dY,
  dX_r = dY A_r is local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.layers.init import replicated_parameter, set_tensor_model_parallel_attributes, sharded_normal_weight
from megatron_lite.parallel.mappings import (copy_to_tensor_model_parallel_region,
                                             gather_from_tensor_model_parallel_region,
                                             reduce_from_tensor_model_parallel_region,
                                             scatter_to_tensor_model_parallel_region)
from megatron_lite.parallel.state import get_tensor_model_parallel_world_size


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

    Shapes: input ``[.., input_size]`` replicated; weight ``[output_size/TP, input_size]``
    (``tensor_model_parallel=True``, ``partition_dim=0``).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, gather_output: bool = False,
                 init_std: float = 0.02, params_dtype: torch.dtype = torch.float32, device=None,
                 copy_input: bool = True, real_output_size: int | None = None,
                 output_sizes: list[int] | None = None):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
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
        """x ``[.., input_size]`` -> ``[.., output_size/TP]`` (or ``[.., output_size]`` if gather_output)."""
        if self.copy_input:
            x = copy_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def extra_repr(self) -> str:
        """Full (unsharded) sizes and the output mode, for ``print(model)``."""
        return f"in={self.input_size}, out={self.output_size}, gather_output={self.gather_output}"


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

    Shapes: weight ``[output_size, input_size/TP]`` (``partition_dim=1``); output ``[.., output_size]``
    replicated across TP.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, input_is_parallel: bool = True,
                 init_std: float = 0.02, params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if input_size % tp:
            raise ValueError(f"RowParallelLinear input size {input_size} is not divisible by TP={tp}")
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.weight = sharded_normal_weight((output_size, input_size), 1, init_std, dtype=params_dtype,
                                            device=device)
        if bias:
            self.bias = replicated_parameter((output_size,), 0.0, dtype=params_dtype, device=device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[.., input_size/TP]`` (or full if not input_is_parallel) -> ``[.., output_size]``."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        """Full (unsharded) sizes and the input mode, for ``print(model)``."""
        return f"in={self.input_size}, out={self.output_size}, input_is_parallel={self.input_is_parallel}"
