"""The ``mpu`` object DeepSpeed accepts (``deepspeed.initialize(..., mpu=megatron_lite.parallel.mpu)``).

DeepSpeed asks it for the model-parallel (here: tensor-parallel) and data-parallel groups so ZeRO
partitions optimizer state over the "data-parallel" group only and the global grad norm sums TP-sharded
parameters over the TP group while counting replicated ones (``tensor_model_parallel = False``)
once. Pipeline parallelism is 1, so "model parallel" equals "tensor parallel".

With context parallelism the group DeepSpeed sees as data-parallel is the DP x CP group (every rank
with this TP rank), as in Megatron-LM (``get_data_parallel_group(with_context_parallel=True)`` for
the gradient reduction and the distributed optimizer): its ranks hold the same parameters, and
averaging over it sums the CP ranks' shares of each sample's gradient. The data loader uses the
DP group alone (``parallel.state``), so the CP ranks of a replica read the same samples.
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
    """Rank of this process in the DP x CP group."""
    return _state.get_data_parallel_rank(with_context_parallel=True)


def get_data_parallel_world_size() -> int:
    """DP x CP degree (world / TP)."""
    return _state.get_data_parallel_world_size(with_context_parallel=True)


def get_data_parallel_group():
    """DP x CP process group (``None`` before initialization)."""
    return _state.get_data_parallel_group(with_context_parallel=True)


# DeepSpeed also probes these names (megatron.mpu compatibility).
get_tensor_model_parallel_rank = get_model_parallel_rank
get_tensor_model_parallel_world_size = get_model_parallel_world_size
get_tensor_model_parallel_group = get_model_parallel_group
get_tensor_model_parallel_src_rank = _state.get_tensor_model_parallel_src_rank
