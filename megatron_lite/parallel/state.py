"""Tensor- and data-parallel process groups (pipeline parallel size is fixed at 1).

Layout (same as Megatron-LM ``initialize_model_parallel`` with PP = 1): with world size
``W = TP x DP``, ranks ``[k*TP, (k+1)*TP)`` form tensor-parallel group ``k`` (adjacent ranks, so a
TP group stays inside one node when ``TP <= GPUs per node``) and the ranks with equal TP rank form a
data-parallel group.

Without ``torch.distributed`` or before :func:`initialize_model_parallel`, every getter answers a
single-process layout (TP = 1, TP rank 0, group ``None``); the data-parallel getters then answer the
default group's world if one exists (pure data parallelism), else 1.
"""

from __future__ import annotations

import torch.distributed as dist

_TP_GROUP = None
_DP_GROUP = None
_TP_SIZE: int | None = None
_INITIALIZED = False


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1) -> None:
    """Create the TP and DP groups. Call after ``torch.distributed.init_process_group``.

    Args:
        tensor_model_parallel_size: TP degree (``--tensor-model-parallel-size`` / ``--tp``).
        pipeline_model_parallel_size: must be 1 (pipeline parallelism is not implemented).

    Raises:
        RuntimeError: torch.distributed is not initialized, or groups already exist.
        ValueError: PP != 1, TP < 1, or the world size is not a multiple of TP.
    """
    global _TP_GROUP, _DP_GROUP, _TP_SIZE, _INITIALIZED
    if pipeline_model_parallel_size != 1:
        raise ValueError(f"--pipeline-model-parallel-size {pipeline_model_parallel_size} is not supported; "
                         "megatron_lite implements PP = 1 only (use TP and ZeRO instead)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group() first")
    if _INITIALIZED:
        raise RuntimeError("model parallel groups are already initialized; call destroy_model_parallel() first")
    tp = int(tensor_model_parallel_size)
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp}; "
                         f"launch a multiple of {tp} processes or change --tp")
    rank = dist.get_rank()
    dp = world // tp
    # Every rank must call new_group for every group, in the same order (torch.distributed contract).
    for k in range(dp):
        ranks = list(range(k * tp, (k + 1) * tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _TP_GROUP = group
    for t in range(tp):
        ranks = list(range(t, world, tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _DP_GROUP = group
    _TP_SIZE = tp
    _INITIALIZED = True


def model_parallel_is_initialized() -> bool:
    """True once :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _INITIALIZED


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself stays; destroy it with torch.distributed)."""
    global _TP_GROUP, _DP_GROUP, _TP_SIZE, _INITIALIZED
    _TP_GROUP = _DP_GROUP = None
    _TP_SIZE = None
    _INITIALIZED = False


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tensor_model_parallel_group():
    """The TP group of this rank, or ``None`` when not initialized (single-process use)."""
    return _TP_GROUP


def get_tensor_model_parallel_world_size() -> int:
    """TP degree; 1 when the groups are not initialized."""
    return _TP_SIZE if _INITIALIZED else 1


def get_tensor_model_parallel_rank() -> int:
    """This rank's index inside its TP group; 0 when not initialized."""
    if not _INITIALIZED:
        return 0
    return dist.get_rank() % _TP_SIZE


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (for broadcasting batches across TP)."""
    if not _INITIALIZED:
        return 0
    return (dist.get_rank() // _TP_SIZE) * _TP_SIZE


def get_data_parallel_group():
    """The DP group; ``None`` (meaning the default group, if any) when not initialized."""
    return _DP_GROUP


def get_data_parallel_world_size() -> int:
    """DP degree = world / TP; the default group's size when not initialized, 1 without distributed."""
    if _INITIALIZED:
        return dist.get_world_size() // _TP_SIZE
    return dist.get_world_size() if _dist_ready() else 1


def get_data_parallel_rank() -> int:
    """This rank's index inside its DP group (= global rank // TP)."""
    if _INITIALIZED:
        return dist.get_rank() // _TP_SIZE
    return dist.get_rank() if _dist_ready() else 0
