"""The ``mpu`` object DeepSpeed accepts (``deepspeed.initialize(..., mpu=megatron_lite.parallel.mpu)``).

DeepSpeed asks it for the model-parallel (here: tensor-parallel) and data-parallel groups so ZeRO
partitions optimizer state over the DP group only and the global grad norm sums TP-sharded
parameters over the TP group while counting replicated ones (``tensor_model_parallel = False``)
once. Pipeline parallelism is 1, so "model parallel" equals "tensor parallel".
"""

from __future__ import annotations

from megatron_lite.parallel import state as _state


def get_model_parallel_rank() -> int:
    """TP rank of this process."""
    return _state.get_tensor_model_parallel_rank()


def get_model_parallel_world_size() -> int:
    """TP degree."""
    return _state.get_tensor_model_parallel_world_size()


def get_model_parallel_group():
    """TP process group (``None`` before initialization)."""
    return _state.get_tensor_model_parallel_group()


def get_data_parallel_rank() -> int:
    """DP rank of this process."""
    return _state.get_data_parallel_rank()


def get_data_parallel_world_size() -> int:
    """DP degree."""
    return _state.get_data_parallel_world_size()


def get_data_parallel_group():
    """DP process group (``None`` before initialization)."""
    return _state.get_data_parallel_group()


# DeepSpeed also probes these names (megatron.mpu compatibility).
get_tensor_model_parallel_rank = get_model_parallel_rank
get_tensor_model_parallel_world_size = get_model_parallel_world_size
get_tensor_model_parallel_group = get_model_parallel_group
get_tensor_model_parallel_src_rank = _state.get_tensor_model_parallel_src_rank
