"""Process groups (TP, CP, DP; PP = 1), TP autograd collectives and the TP-aware RNG tracker."""

from megatron_lite.parallel.mappings import (copy_to_tensor_model_parallel_region,
                                             gather_from_tensor_model_parallel_region,
                                             reduce_from_tensor_model_parallel_region,
                                             scatter_to_tensor_model_parallel_region)
from megatron_lite.parallel.random import get_rng_tracker, model_parallel_manual_seed
from megatron_lite.parallel.utils import param_is_not_tensor_parallel_duplicate, tensor_parallel_grad_norm
from megatron_lite.parallel.state import (destroy_model_parallel, get_context_parallel_group,
                                          get_context_parallel_rank, get_context_parallel_world_size,
                                          get_data_parallel_group,
                                          get_data_parallel_rank, get_data_parallel_world_size,
                                          get_tensor_model_parallel_group, get_tensor_model_parallel_rank,
                                          get_tensor_model_parallel_src_rank,
                                          get_tensor_model_parallel_world_size, initialize_model_parallel,
                                          model_parallel_is_initialized)

__all__ = [
    "initialize_model_parallel", "destroy_model_parallel", "model_parallel_is_initialized",
    "get_tensor_model_parallel_group", "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_src_rank", "get_data_parallel_group", "get_data_parallel_rank",
    "get_data_parallel_world_size", "get_context_parallel_group", "get_context_parallel_rank",
    "get_context_parallel_world_size", "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region", "get_rng_tracker", "model_parallel_manual_seed",
    "param_is_not_tensor_parallel_duplicate", "tensor_parallel_grad_norm",
]
