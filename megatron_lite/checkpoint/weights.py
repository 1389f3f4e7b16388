"""Module weights of a checkpoint: read one TP shard (:func:`module_state`), gather a ZeRO-3
shard for saving (:func:`zero3_gathered_state_dict`), copy a shard into a possibly partitioned
model (:func:`load_into`) and build a model for inference at any TP degree
(:func:`load_model_for_inference`).

Where the weights of TP rank ``XX`` are in one of our checkpoint folders: ``model_tp_XX.pt``
(written at ZeRO-3, whose DeepSpeed module file holds no weights) if present, else the
``"module"`` entry of DeepSpeed's ``mp_rank_XX_model_states.pt``.
"""

from __future__ import annotations

import contextlib
import os

import torch

from megatron_lite.checkpoint.layout import find_checkpoint, read_saved_config
from megatron_lite.config import RunConfig
from megatron_lite.model import hf_adapter
from megatron_lite.model.llama import LlamaModel


def module_state(path: str, tp_rank: int) -> dict:
    """The full (unpartitioned over DP) state dict of TP shard ``tp_rank`` in checkpoint folder
    ``path``, on CPU in its saved dtype.

    Raises:
        FileNotFoundError: neither ``model_tp_XX.pt`` nor ``mp_rank_XX_model_states.pt`` exists.
    """
    z3 = os.path.join(path, f"model_tp_{tp_rank:02d}.pt")
    if os.path.isfile(z3):
        return torch.load(z3, map_location="cpu", weights_only=False)
    f = os.path.join(path, f"mp_rank_{tp_rank:02d}_model_states.pt")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: no weights for TP rank {tp_rank} ({os.path.basename(f)})")
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


def zero3_gathered_state_dict(module: torch.nn.Module, keep: bool) -> dict | None:
    """This TP shard's full (unpartitioned over DP) state dict of a ZeRO-3 ``module``.

    Collective over the DP group the parameters are partitioned on: every rank must call it. Gathers
    one submodule's own parameters at a time (peak memory: the largest layer, not the shard) and
    copies them to CPU in their training dtype (what DeepSpeed's consolidated state dict holds).
    Returns the dict (``state_dict()`` keys, shared parameters kept shared) where ``keep``, else
    None.
    """
    import deepspeed  # why: heavy optional dependency, only needed at ZeRO-3

    sd: dict | None = {} if keep else None
    seen: dict[int, str] = {}  # id(param) -> first key (tied parameters stay one tensor)

    def visit(m: torch.nn.Module, prefix: str) -> None:
        params = [p for p in m._parameters.values() if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if sd is not None:
                for name, p in m._parameters.items():
                    if p is None:
                        continue
                    if id(p) in seen:
                        sd[prefix + name] = sd[seen[id(p)]]
                    else:
                        sd[prefix + name] = p.detach().to("cpu", copy=True)
                        seen[id(p)] = prefix + name
                for name, b in m._buffers.items():
                    if b is not None and name not in m._non_persistent_buffers_set:
                        sd[prefix + name] = b.detach().to("cpu", copy=True)
        for name, child in m._modules.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(module, "")
    return sd


@torch.no_grad()
def load_into(model: torch.nn.Module, shard: dict) -> None:
    """Copy ``shard`` (full TP-shard tensors, our names) into ``model``; at ZeRO-3 the partitioned
    parameters are gathered, written on every rank and re-partitioned (DP rank 0's copy kept).

    Raises:
        KeyError: the shard and the model do not have the same parameter names.
        ValueError: a tensor's shape differs from the parameter's.
    """
    params = dict(model.named_parameters())
    if set(params) != set(shard):
        raise KeyError(f"base weights do not match the model: missing "
                       f"{sorted(set(params) - set(shard))[:5]}, unexpected "
                       f"{sorted(set(shard) - set(params))[:5]}")
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    if zero3:
        import deepspeed  # why: heavy optional dependency, only needed at ZeRO-3

        ctx = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        for name, p in params.items():
            if tuple(p.shape) != tuple(shard[name].shape):
                raise ValueError(f"{name}: base shard {tuple(shard[name].shape)} vs model "
                                 f"{tuple(p.shape)}")
            p.data.copy_(shard[name].to(p.dtype))


def load_model_for_inference(load_dir: str, tp_rank: int = 0, tp_size: int = 1):
    """Build the model of a checkpoint and load its weights for TP rank ``tp_rank`` of ``tp_size``.

    Args:
        load_dir: a ``--save`` folder (its latest complete checkpoint) or a checkpoint folder.
        tp_rank, tp_size: the TP shard to load, at any TP degree the model allows (a different
            degree than the saved one is resharded in memory; every rank reads all saved shards).
            When ``tp_size`` > 1 the caller must have initialized the TP process groups first.

    Returns:
        ``(model, RunConfig)``: ``LlamaModel`` in eval mode with fp32 weights on CPU.

    Raises:
        FileNotFoundError: no complete checkpoint / no shard for a saved TP rank.
        ValueError: ``tp_rank``/``tp_size`` invalid for the model (heads/groups/ffn % TP).
    """
    if os.path.isfile(load_dir):
        raise FileNotFoundError(f"{load_dir}: is a file; give the checkpoint folder (the --save "
                                "folder of the run, or one iter_XXXXXXX folder in it)")
    path = find_checkpoint(load_dir)
    if path is None:
        raise FileNotFoundError(f"{load_dir}: no complete checkpoint (need manifest.json)")
    cfg = RunConfig.from_dict(read_saved_config(path), source=os.path.join(path, "run_config.json"))
    saved_tp = cfg.parallel.tensor_model_parallel_size
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    if tp_size == saved_tp:
        sd = module_state(path, tp_rank)
    else:
        # Reshard through the full (HF-layout) weights: every TP layer splits a plain row or
        # column range, so concatenating the saved shards and re-splitting is exact.
        cfg.model.validate(saved_tp)
        full = hf_adapter.megatron_lite_to_hf([module_state(path, r) for r in range(saved_tp)],
                                              cfg.model)
        sd = hf_adapter.hf_to_megatron_lite(full, cfg.model, tp_rank, tp_size)
        cfg.parallel.tensor_model_parallel_size = tp_size
    cfg.model.validate(tp_size)
    cfg.derived.padded_vocab_size = cfg.model.padded_vocab_size(tp_size)
    model = LlamaModel(cfg.model)
    sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}
    model.load_state_dict(sd)
    model.eval()
    return model, cfg


__all__ = ["load_into", "load_model_for_inference", "module_state", "zero3_gathered_state_dict"]
