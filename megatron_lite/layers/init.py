"""TP-independent weight initialisation: draw the full master weight, keep this rank's slice.

This is Megatron-LM's CPU init path (``_initialize_affine_weight_cpu``) with one refinement: each
weight takes ONE 62-bit seed from the default torch generator and draws its master values from a
dedicated ``torch.Generator`` seeded with it. Hence, with the same ``torch.manual_seed`` on every
rank, (a) every TP rank sees the same master weight and a TP = k model's shards are exact slices of
the TP = 1 model's weights, and (b) the default stream advances by one draw per weight whatever its
size, padding or dtype, so later weights do not depend on earlier shapes' padding.

The master is drawn on the target device (a CUDA generator on GPU, so a 13B model does not crawl
through CPU normal sampling); CPU and CUDA generators give different values for the same seed, so
init is TP-independent per device type, not identical between a CPU and a GPU build.
"""

from __future__ import annotations

import torch

from megatron_lite.parallel.state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size


def resolve_device(device) -> torch.device:
    """``device`` or, if None, torch's current default device (respects ``with torch.device('meta')``)."""
    if device is not None:
        return torch.device(device)
    return torch.get_default_device()


def set_tensor_model_parallel_attributes(param: torch.nn.Parameter, is_parallel: bool,
                                         partition_dim: int | None) -> None:
    """Mark ``param`` as TP-sharded (``tensor_model_parallel=True``, ``partition_dim``) or replicated."""
    param.tensor_model_parallel = bool(is_parallel)
    param.partition_dim = partition_dim if is_parallel else None
    param.partition_stride = 1


def _draw_shard(full_shape: tuple[int, int], partition_dim: int, std: float, dtype: torch.dtype,
                device: torch.device, real_rows: int | None) -> torch.Tensor:
    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if full_shape[partition_dim] % tp:
        raise ValueError(f"weight dim {partition_dim} of size {full_shape[partition_dim]} is not divisible by "
                         f"tensor-parallel size {tp}")
    shard_shape = list(full_shape)
    shard_shape[partition_dim] //= tp
    # Always consume exactly one draw so the stream stays aligned across devices and TP degrees.
    seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())
    if device.type == "meta":
        return torch.empty(shard_shape, dtype=dtype, device=device)
    gen_device = device if device.type in ("cuda", "cpu") else torch.device("cpu")
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    master = torch.zeros(full_shape, dtype=torch.float32, device=gen_device)
    rows = full_shape[0] if real_rows is None else real_rows
    master[:rows].normal_(0.0, std, generator=gen)
    return master.chunk(tp, dim=partition_dim)[rank].to(device=device, dtype=dtype).contiguous()


def sharded_normal_weight(full_shape: tuple[int, int], partition_dim: int, std: float, *,
                          dtype: torch.dtype, device=None, real_rows: int | None = None,
                          fused_rows: list[int] | None = None) -> torch.nn.Parameter:
    """Create this rank's shard of a weight initialised ~ N(0, std^2), independent of the TP degree.

    Args:
        full_shape: (rows, cols) of the unsharded (master) weight, e.g. (V_pad, H) or (out, in).
        partition_dim: 0 (rows split: column-parallel / vocab-parallel) or 1 (cols: row-parallel).
        std: normal standard deviation.
        dtype: parameter dtype (the master is drawn in fp32, then cast).
        device: target device; ``meta`` allocates nothing and skips the draw of values.
        real_rows: rows >= real_rows are padding (padded vocab) and are set to zero, so padding never
            changes the values of real rows.
        fused_rows: for a fused column-parallel weight (e.g. [Q; K; V]): the row counts of its
            logical blocks (summing to ``full_shape[0]``). Each block is drawn as its own master
            and split over TP separately; the shard is ``[B1_r; B2_r; ...]`` (Megatron's fused
            ``linear_qkv``/``linear_fc1`` layout), recorded as ``param.partition_sizes``.

    Returns:
        Parameter of shape ``full_shape`` with ``partition_dim`` divided by TP, TP attributes set.

    Raises:
        ValueError: the partitioned dimension (or a fused block) is not divisible by the TP degree.
    """
    device = resolve_device(device)
    if fused_rows is None:
        weight = _draw_shard(full_shape, partition_dim, std, dtype, device, real_rows)
    else:
        if partition_dim != 0 or sum(fused_rows) != full_shape[0]:
            raise ValueError(f"fused_rows {fused_rows} must split dim 0 of {full_shape}")
        weight = torch.cat([_draw_shard((rows, full_shape[1]), 0, std, dtype, device, None)
                            for rows in fused_rows], dim=0)
    param = torch.nn.Parameter(weight)
    set_tensor_model_parallel_attributes(param, True, partition_dim)
    param.partition_sizes = list(fused_rows) if fused_rows is not None else None
    return param


def kv_group_replicated_weight(block_rows: list[int], cols: int, groups: int, group_index: int,
                               first_replica: bool, std: float, *, dtype: torch.dtype,
                               device=None) -> torch.nn.Parameter:
    """The rows of KV group ``group_index`` of fused blocks (e.g. [K; V]), replicated on the TP
    ranks that share that group (GQA with fewer KV groups than TP ranks, ``parallel/kv_groups``).

    Each block ``[rows, cols]`` is drawn as its own master exactly as :func:`sharded_normal_weight`
    draws a fused block (one seed from the default stream per block), so the values equal the TP = 1
    model's; the parameter is ``[B1_j; B2_j; ...]`` with ``B_j = B.chunk(groups)[group_index]``.

    Attributes set: ``tensor_model_parallel = first_replica`` (the marker DeepSpeed's and our grad
    norms read: the copies count once, on the first rank of each sharing group, never on a rank
    that is not the group's first, and TP rank 0 is always a first), ``partition_dim = None``,
    ``partition_sizes`` = the per-group block rows.

    Raises:
        ValueError: a block's rows not divisible by ``groups``.
    """
    device = resolve_device(device)
    pieces = []
    for rows in block_rows:
        if rows % groups:
            raise ValueError(f"KV block of {rows} rows is not divisible by {groups} groups")
        seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())  # one draw per block, as above
        shape = (rows // groups, cols)
        if device.type == "meta":
            pieces.append(torch.empty(shape, dtype=dtype, device=device))
            continue
        gen_device = device if device.type in ("cuda", "cpu") else torch.device("cpu")
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        master = torch.zeros((rows, cols), dtype=torch.float32, device=gen_device).normal_(0.0, std, generator=gen)
        pieces.append(master.chunk(groups, dim=0)[group_index].to(device=device, dtype=dtype))
    param = torch.nn.Parameter(torch.cat(pieces, dim=0).contiguous())
    param.tensor_model_parallel = bool(first_replica)
    param.partition_dim = None
    param.partition_stride = 1
    param.partition_sizes = [rows // groups for rows in block_rows]
    return param


def replicated_parameter(shape: tuple[int, ...], fill: float, *, dtype: torch.dtype, device=None) -> torch.nn.Parameter:
    """A TP-replicated parameter (norm weight, row-parallel bias) filled with ``fill``."""
    device = resolve_device(device)
    param = torch.nn.Parameter(torch.full(shape, fill, dtype=dtype, device=device) if device.type != "meta"
                               else torch.empty(shape, dtype=dtype, device=device))
    set_tensor_model_parallel_attributes(param, False, None)
    return param
