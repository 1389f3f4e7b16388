"""Tensor-, context- and data-parallel process groups (pipeline parallel size is fixed at 1).

Layout (Megatron-LM ``initialize_model_parallel`` with PP = 1, its default ``tp-cp-ep-dp-pp``
order): with world size ``W = TP x CP x DP`` the rank is ``r = (dp * CP + cp) * TP + tp``, so

* ranks ``[k*TP, (k+1)*TP)`` form tensor-parallel group ``k`` (adjacent ranks: a TP group stays
  inside one node when ``TP <= GPUs per node``);
* the context-parallel group of a rank holds the CP ranks with its TP rank and DP replica
  (stride TP; the ring attention's point-to-point partners);
* the data-parallel group holds the ranks with its TP rank and CP rank (stride TP x CP): ranks
  of one such group read different samples;
* the data-parallel x context-parallel group holds every rank with its TP rank (stride TP):
  gradients are averaged and ZeRO partitions optimizer state over it (every rank in it holds the
  same parameters; CP ranks of a replica saw different tokens of the same samples). With CP = 1 it
  is the data-parallel group.

Without ``torch.distributed`` or before :func:`initialize_model_parallel`, every getter answers a
single-process layout (TP = CP = 1, ranks 0, groups ``None``); the data-parallel getters then
answer the default group's world if one exists (pure data parallelism), else 1.
"""

from __future__ import annotations

import torch.distributed as dist

_TP_GROUP = None
_DP_GROUP = None
_CP_GROUP = None
_DP_CP_GROUP = None
_CP_GLOBAL_RANKS: list[int] | None = None
_TP_SIZE: int | None = None
_CP_SIZE: int | None = None
_INITIALIZED = False


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1) -> None:
    """Create the TP, CP, DP and DP x CP groups. Call after ``torch.distributed.init_process_group``.

    Args:
        tensor_model_parallel_size: TP degree (``--tensor-model-parallel-size`` / ``--tp``).
        pipeline_model_parallel_size: must be 1 (pipeline parallelism is not implemented).
        context_parallel_size: CP degree (``--context-parallel-size``).

    Raises:
        RuntimeError: torch.distributed is not initialized, or groups already exist.
        ValueError: PP != 1, TP < 1, CP < 1, or the world size is not a multiple of TP x CP.
    """
    global _TP_GROUP, _DP_GROUP, _CP_GROUP, _DP_CP_GROUP, _CP_GLOBAL_RANKS, _TP_SIZE, _CP_SIZE, _INITIALIZED
    if pipeline_model_parallel_size != 1:
        raise ValueError(f"--pipeline-model-parallel-size {pipeline_model_parallel_size} is not supported; "
                         "megatron_lite implements PP = 1 only (use TP and ZeRO instead)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group() first")
    if _INITIALIZED:
        raise RuntimeError("model parallel groups are already initialized; call destroy_model_parallel() first")
    tp, cp = int(tensor_model_parallel_size), int(context_parallel_size)
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp}; "
                         f"launch a multiple of {tp} processes or change --tp")
    if cp < 1 or world % (tp * cp):
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
                         f"--context-parallel-size {cp}; launch a multiple of {tp * cp} processes")
    rank = dist.get_rank()
    # Every rank must call new_group for every group, in the same order (torch.distributed contract).
    for kind, ranks in _group_ranks(world, tp, cp):
        group = dist.new_group(ranks)
        if rank in ranks:
            if kind == "tp":
                _TP_GROUP = group
            elif kind == "cp":
                _CP_GROUP, _CP_GLOBAL_RANKS = group, ranks
            elif kind == "dp":
                _DP_GROUP = group
            else:
                _DP_CP_GROUP = group
    if cp == 1:  # the same ranks: one communicator, not two
        _DP_CP_GROUP = _DP_GROUP
    _TP_SIZE, _CP_SIZE = tp, cp
    _INITIALIZED = True


def _group_ranks(world: int, tp: int, cp: int):
    """(kind, ranks) of every group, in creation order, for ``r = (dp * cp + c) * tp + t``."""
    dp = world // (tp * cp)
    for k in range(world // tp):
        yield "tp", list(range(k * tp, (k + 1) * tp))
    for d in range(dp):
        for t in range(tp):
            yield "cp", [(d * cp + c) * tp + t for c in range(cp)]
    for c in range(cp):
        for t in range(tp):
            yield "dp", [(d * cp + c) * tp + t for d in range(dp)]
    if cp > 1:
        for t in range(tp):
            yield "dp_cp", list(range(t, world, tp))


def model_parallel_is_initialized() -> bool:
    """True once :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _INITIALIZED


def destroy_model_parallel() -> None:
    """Forget the groups (the process group itself stays; destroy it with torch.distributed)."""
    global _TP_GROUP, _DP_GROUP, _CP_GROUP, _DP_CP_GROUP, _CP_GLOBAL_RANKS, _TP_SIZE, _CP_SIZE, _INITIALIZED
    _TP_GROUP = _DP_GROUP = _CP_GROUP = _DP_CP_GROUP = None
    _CP_GLOBAL_RANKS = None
    _TP_SIZE = _CP_SIZE = None
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


def get_context_parallel_group():
    """The CP group of this rank (ranks sharing TP rank and DP replica); ``None`` when not initialized."""
    return _CP_GROUP


def get_context_parallel_world_size() -> int:
    """CP degree; 1 when the groups are not initialized."""
    return _CP_SIZE if _INITIALIZED else 1


def get_context_parallel_rank() -> int:
    """This rank's index inside its CP group (``(rank // TP) % CP``); 0 when not initialized."""
    if not _INITIALIZED:
        return 0
    return (dist.get_rank() // _TP_SIZE) % _CP_SIZE


def get_context_parallel_global_ranks() -> list[int]:
    """Global ranks of this rank's CP group, by CP rank (``[rank]`` when not initialized)."""
    if not _INITIALIZED:
        return [dist.get_rank() if _dist_ready() else 0]
    return list(_CP_GLOBAL_RANKS)


def get_data_parallel_group(with_context_parallel: bool = False):
    """The DP group (same TP and CP rank), or with ``with_context_parallel`` the DP x CP group
    (same TP rank: where gradients are averaged and ZeRO partitions); ``None`` (meaning the default
    group, if any) when not initialized."""
    return _DP_CP_GROUP if with_context_parallel else _DP_GROUP


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    """DP degree = world / (TP x CP) (x CP with ``with_context_parallel``); the default group's
    size when not initialized, 1 without distributed."""
    if _INITIALIZED:
        return dist.get_world_size() // (_TP_SIZE * (1 if with_context_parallel else _CP_SIZE))
    return dist.get_world_size() if _dist_ready() else 1


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    """This rank's index inside its DP group (``rank // (TP x CP)``), or inside its DP x CP group
    (``rank // TP``) with ``with_context_parallel``."""
    if _INITIALIZED:
        return dist.get_rank() // (_TP_SIZE * (1 if with_context_parallel else _CP_SIZE))
    return dist.get_rank() if _dist_ready() else 0
