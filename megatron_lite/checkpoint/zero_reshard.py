"""Resume ZeRO-1/2/3 optimizer state at a different data-parallel size D (same TP, stage, model).

DeepSpeed 0.19.8 loads ZeRO optimizer partitions only at the D they were saved with (its
"universal checkpoint" needs an offline conversion that does not know our TP layout). Here the
saved partitions of this rank's TP shard are read one file at a time and cut into full
(unpartitioned over DP) per-parameter tensors: fp32 master weight and every elementwise optimizer
state (AdamW: ``exp_avg``, ``exp_avg_sq``), plus the step count. They are then written into the
new engine's partitions with DeepSpeed's public ``safe_set_full_fp32_param`` /
``safe_set_full_optimizer_state``, so training continues as the uninterrupted run would (up to
reduction-order rounding of the gradients, which D changes). Works for fp32 and bf16, with or
without CPU offload of the optimizer (and, at ZeRO-3, of the parameters), for the elementwise
optimizers AdamW and Lion; frozen parameters (CPT's ``--freeze-layers``) have no partitions and
are skipped, and must be the same set in both runs.

Saved layouts (read from DeepSpeed 0.19.8's ``runtime/zero/stage_1_and_2.py`` ``state_dict``,
``runtime/zero/stage3.py`` ``_rigid_state_dict`` and ``utils/zero_to_fp32.py``; the code below is
ours), per TP rank ``tp`` and saved DP rank ``r`` in ``[bf16_]zero_pp_rank_{r}_mp_rank_{tp:02d}_
optim_states.pt`` under ``["optimizer_state_dict"]``:

* Stage 1/2: param group ``g`` is one flat vector: the group's parameters in ``param_shapes[g]``
  order (``mp_rank_{tp:02d}_model_states.pt``), each followed by
  ``param_alignment_paddings[g][i]`` zeros, then tail padding to a multiple of D x alignment.
  Rank ``r`` owns elements ``[r*P, (r+1)*P)`` (``P`` = the partition size, the length of its
  ``base_optimizer_state["state"][g]`` tensors); ``single_partition_of_fp32_groups[g]`` is that
  slice with the tail padding (``group_paddings[g]``) cut off.
* Stage 3: every parameter is partitioned on its own: rank ``r`` holds elements
  ``[r*c, (r+1)*c)`` of the flattened parameter, ``c = ceil(numel / D)`` (zeros past ``numel``),
  laid end to end in ``param_shapes`` order (all groups) across the concatenation of the rank's
  ``fp32_flat_groups`` (and of its base optimizer's per-sub-group state tensors).

Memory (CPU): the full fp32 state of this TP shard (4 bytes x (1 + number of state tensors) per
parameter: 12 bytes/param for AdamW) plus one saved rank's file at a time (twice at ZeRO-3, whose
sub-groups are concatenated), i.e. ~12 x (1 + 2/D) bytes/param of the shard at peak.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections import OrderedDict

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.weights import load_into, module_state
from megatron_lite.parallel import get_data_parallel_rank, get_tensor_model_parallel_rank

# Optimizers whose ZeRO state is elementwise over the flat fp32 partition (so a partition can be
# cut per parameter and re-partitioned). Adafactor's RMS is taken over the partition itself.
SUPPORTED_OPTIMIZERS = ("adamw", "lion")
_NO_OPTIM = ("pass --no-load-optim (fresh optimizer state, data position kept) or resume with the "
             "same D")


def check_supported(path: str, saved: dict, cfg) -> None:
    """Refuse, before anything is loaded, a DP-size change this module cannot reshard.

    Args:
        path: the checkpoint folder. saved: its ``trainer_state.json``. cfg: this run's RunConfig.

    Raises:
        ValueError: one line naming the flag and the way out: another ZeRO stage, an optimizer
            outside :data:`SUPPORTED_OPTIMIZERS` (``cpu_adam`` included: untested, its op needs a
            C++ build), or ``--fp16`` (untested: no fp16 on CPU). CPU offload of the optimizer
            and parameters (torch AdamW/Lion on CPU) is supported.
    """
    d_old, d_new = saved["data_parallel_size"], cfg.derived.data_parallel_size
    head = (f"{path}: ZeRO-{saved['zero_stage']} optimizer state saved at D={d_old}, this run "
            f"has D={d_new}")
    if saved["zero_stage"] != cfg.parallel.zero_stage:
        raise ValueError(f"{head} and --zero-stage {cfg.parallel.zero_stage}: resharding keeps "
                         f"the stage; resume with --zero-stage {saved['zero_stage']} or "
                         f"{_NO_OPTIM}")
    if cfg.optimizer.optimizer not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"{head}: resharding supports --optimizer {'/'.join(SUPPORTED_OPTIMIZERS)}"
                         f", not {cfg.optimizer.optimizer} (its state is not elementwise); "
                         f"{_NO_OPTIM}")
    if cfg.derived.precision == "fp16":
        # The loss scaler is carried like DeepSpeed's own load does, but fp16 has no CPU path to
        # test it on; refuse rather than ship it untested.
        raise ValueError(f"{head}: resharding an --fp16 run is not supported (untested); "
                         f"{_NO_OPTIM}")


def _optim_file(path: str, dp: int, tp: int) -> str:
    hits = glob.glob(os.path.join(path, f"*zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt"))
    if len(hits) != 1:
        raise FileNotFoundError(f"{path}: expected one zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_"
                                f"states.pt (saved DP rank {dp} of TP rank {tp}), found "
                                f"{len(hits)}")
    return hits[0]


def _model_states(path: str, stage: int, tp: int) -> dict:
    name = (f"zero_pp_rank_0_mp_rank_{tp:02d}_model_states.pt" if stage == 3
            else f"mp_rank_{tp:02d}_model_states.pt")
    f = os.path.join(path, name)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: {name} missing (needed for the parameter shapes)")
    return torch.load(f, map_location="cpu", weights_only=False, mmap=True)


def _split_state(state: dict, part_numel: int, where: str) -> tuple[dict, dict]:
    """(partitioned tensors, scalars) of one flat parameter's optimizer state."""
    parts, scalars = {}, {}
    for k, v in state.items():
        if torch.is_tensor(v) and v.dim() == 1 and v.numel() == part_numel:
            parts[k] = v
        elif torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float)):
            scalars[k] = v
        else:
            raise ValueError(f"{where}: optimizer state {k!r} is neither elementwise over the "
                             f"partition nor a scalar; cannot reshard it ({_NO_OPTIM})")
    return parts, scalars


@dataclasses.dataclass
class _Layout:
    """Where each parameter of a TP shard lies in the saved flat vectors.

    ``groups``: per param group, ``{name: shape}`` in flat order; ``shapes``: name -> shape;
    ``names``: all names in flat order. Stage 3 only: ``chunk`` (elements per rank of each
    parameter), ``offs`` (offset of its chunk in a rank's concatenated vector), ``total3``.
    """

    groups: list
    shapes: dict
    names: list
    chunk: dict = dataclasses.field(default_factory=dict)
    offs: dict = dataclasses.field(default_factory=dict)
    total3: int = 0


def _layout(groups: list, stage: int, saved_dp: int) -> _Layout:
    names = [n for g in groups for n in g]
    shapes = {n: torch.Size(s) for g in groups for n, s in g.items()}
    lay = _Layout(groups, shapes, names)
    if stage == 3:   # offsets of each parameter's chunk in a rank's concatenated flat vector
        lay.chunk = {n: math.ceil(shapes[n].numel() / saved_dp) for n in names}
        o = 0
        for n in names:
            lay.offs[n], o = o, o + lay.chunk[n]
        lay.total3 = o
    return lay


def _load_rank(path: str, r: int, tp_rank: int, saved_dp: int) -> tuple[str, dict]:
    """(file, ``optimizer_state_dict``) of saved DP rank ``r``, its partition count checked."""
    f = _optim_file(path, r, tp_rank)
    sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    pc = sd.get("partition_count")
    if any(c != saved_dp for c in (pc if isinstance(pc, list) else [pc])):
        raise ValueError(f"{f}: partition_count {pc} but trainer_state.json says D={saved_dp}")
    return f, sd


def _sources_stage3(sd: dict, f: str, lay: _Layout, saved_dp: int) -> tuple[dict, list]:
    """(``srcs[key] = [this rank's one flat vector for all groups]``, per sub-group (tensors,
    scalars)) of a ZeRO-3 rank file."""
    base = sd["optimizer_state_dict"]["state"]   # index i = sub-group i's flat tensor
    if sorted(base) != list(range(len(sd["fp32_flat_groups"]))):
        raise ValueError(f"{f}: optimizer state for sub-groups {sorted(base)}, but "
                         f"{len(sd['fp32_flat_groups'])} fp32 flat groups")
    parts = [_split_state(base[i], t.numel(), f) for i, t in enumerate(sd["fp32_flat_groups"])]
    srcs = {"fp32": [torch.cat([t.reshape(-1) for t in sd["fp32_flat_groups"]])]}
    for k in parts[0][0]:
        srcs[k] = [torch.cat([p[k].reshape(-1) for p, _ in parts])]
    if srcs["fp32"][0].numel() != lay.total3:
        raise ValueError(f"{f}: {srcs['fp32'][0].numel()} fp32 elements, the parameter "
                         f"shapes need {lay.total3} at D={saved_dp}")
    return srcs, parts


def _sources_stage12(sd: dict, f: str, lay: _Layout, r: int) -> tuple[dict, list, list, list]:
    """(``srcs[key][g]`` = rank ``r``'s flat vector of group ``g`` without tail padding, per
    group (tensors, scalars), each group's start in the full flat vector, alignment paddings)
    of a ZeRO-1/2 rank file."""
    base = sd["base_optimizer_state"]
    elastic = not (isinstance(base, dict) and "state" in base)   # tail padding cut off
    base = dict(enumerate(base)) if elastic else base["state"]
    srcs: dict = {"fp32": []}
    parts, starts = [], []
    for g in range(len(lay.groups)):
        lean = sd["single_partition_of_fp32_groups"][g].reshape(-1)
        size = lean.numel() + sd["group_paddings"][g]   # the padded partition size P
        pt, sc = _split_state(base[g], lean.numel() if elastic else size, f)
        parts.append((pt, sc))
        srcs["fp32"].append(lean)
        for k, v in pt.items():
            srcs.setdefault(k, []).append(v.reshape(-1)[:lean.numel()])
        starts.append(r * size)
    pads = sd.get("param_alignment_paddings") or [[0] * len(g) for g in lay.groups]
    return srcs, parts, starts, pads


def _merge_scalars(scalars: dict, parts: list, f: str) -> None:
    """Add ``parts``' scalar states (``step``) to ``scalars``; they must agree everywhere."""
    for _, sc in parts:
        for k, v in sc.items():
            if k in scalars and float(scalars[k]) != float(v):
                raise ValueError(f"{f}: optimizer {k!r} {float(v)} differs from another "
                                 f"partition's {float(scalars[k])}")
            scalars.setdefault(k, v.clone() if torch.is_tensor(v) else v)


def _scatter_stage3(full: dict, srcs: dict, lay: _Layout, r: int) -> None:
    """Copy rank ``r``'s chunk of every parameter into the full flat tensors."""
    for n in lay.names:
        lo = r * lay.chunk[n]
        cnt = max(0, min(lay.chunk[n], lay.shapes[n].numel() - lo))
        for k, src in srcs.items():
            full[n][k][lo:lo + cnt] = src[0][lay.offs[n]:lay.offs[n] + cnt].float()


def _scatter_stage12(full: dict, srcs: dict, lay: _Layout, starts: list, pads: list) -> None:
    """Copy the part of every parameter a ZeRO-1/2 rank holds into the full flat tensors."""
    for g, group in enumerate(lay.groups):
        start = starts[g]
        end = start + srcs["fp32"][g].numel()
        o = 0
        for i, n in enumerate(group):
            numel = lay.shapes[n].numel()
            lo, hi = max(o, start), min(o + numel, end)
            if lo < hi:
                for k, src in srcs.items():
                    full[n][k][lo - o:hi - o] = src[g][lo - start:hi - start].float()
            o += numel + pads[g][i]


def read_full_state(path: str, stage: int, saved_dp: int, tp_rank: int) -> dict:
    """Reconstruct this TP shard's full optimizer state from the saved ZeRO partitions.

    Args:
        path: checkpoint folder. stage: saved ZeRO stage (1, 2 or 3). saved_dp: saved D.
        tp_rank: the TP shard to read (the ``mp_rank`` of the file names).

    Returns:
        ``{"params": {name: {"fp32": t, key: t, ...}}, "scalars": {key: value}, "global":
        {loss_scaler, dynamic_loss_scale, overflow}, "engine": {global_steps, global_samples,
        skipped_steps}}``; each ``t`` is a float32 CPU tensor of the parameter's TP-shard shape
        (e.g. ``[3*h/TP... , h]``), ``scalars`` holds the step count (AdamW ``step``), equal in
        every group and saved rank.

    Raises:
        FileNotFoundError: a saved rank's file is missing.
        ValueError: files that disagree (step, partition count) or a layout we do not handle.
    """
    ms = _model_states(path, stage, tp_rank)
    groups = [OrderedDict(g) for g in ms["param_shapes"]]
    engine_counters = {k: ms.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}
    del ms   # (param_shapes lists the flat order itself, round_robin_gradients included)
    lay = _layout(groups, stage, saved_dp)
    full: dict[str, dict[str, torch.Tensor]] = {}   # name -> key -> flat full tensor
    scalars: dict = {}
    glob_state: dict = {}
    for r in range(saved_dp):
        f, sd = _load_rank(path, r, tp_rank, saved_dp)
        if r == 0:
            glob_state = {k: sd.get(k) for k in ("loss_scaler", "dynamic_loss_scale", "overflow")}
        if stage == 3:
            srcs, parts = _sources_stage3(sd, f, lay, saved_dp)
        else:
            srcs, parts, starts, pads = _sources_stage12(sd, f, lay, r)
        _merge_scalars(scalars, parts, f)
        if not full:
            full = {n: {k: torch.zeros(lay.shapes[n].numel(), dtype=torch.float32) for k in srcs}
                    for n in lay.names}
        elif set(srcs) != set(full[lay.names[0]]):
            raise ValueError(f"{f}: optimizer state keys {sorted(srcs)} differ from saved rank "
                             f"0's {sorted(full[lay.names[0]])}")
        if stage == 3:
            _scatter_stage3(full, srcs, lay, r)
        else:
            _scatter_stage12(full, srcs, lay, starts, pads)
        del sd, srcs, parts
    params = {n: {k: v.view(lay.shapes[n]) for k, v in d.items()} for n, d in full.items()}
    return {"params": params, "scalars": scalars, "global": glob_state, "engine": engine_counters}


def _flat_partitions(opt) -> list[torch.Tensor]:
    """The engine's flat fp32 master partitions (keys of the base optimizer's state)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):        # stage 3
        return list(opt.fp32_partitioned_groups_flat)
    return list(opt.single_partition_of_fp32_groups)       # stage 1/2


def write_full_state(engine, full: dict, where: str) -> None:
    """Write :func:`read_full_state`'s tensors into ``engine``'s (new-D) partitions.

    Local (DeepSpeed's setters copy this rank's slice of the full value; nothing is
    communicated). The base optimizer's per-partition state is created first (DeepSpeed creates
    it lazily at the first step): elementwise keys as zeros, scalar keys (``step``) with the saved
    value; at stage 1/2 the parameters' state fragments are then linked to it (DeepSpeed's
    ``_lazy_init_hp_params_optimizer_state``, which it would otherwise run after the first step),
    and every parameter's fp32 master and state are set. The training-dtype weights are not
    touched: the caller loads them from the checkpoint, where they are the masters' rounding.

    Raises:
        ValueError: this run's trainable parameters differ from the saved ones (e.g. another
            ``--freeze-layers``), or a shape differs.
    """
    # why: heavy optional dependency (DeepSpeed), imported where the engine exists
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = engine.optimizer
    base = opt.optimizer
    params = full["params"]
    mine = OrderedDict((n, p) for n, p in engine.module.named_parameters() if p.requires_grad)
    if set(mine) != set(params):
        raise ValueError(f"{where}: trainable parameters differ from the checkpoint's (another "
                         f"--freeze-layers/--freeze-embeddings?): only here "
                         f"{sorted(set(mine) - set(params))[:3]}, only saved "
                         f"{sorted(set(params) - set(mine))[:3]}; {_NO_OPTIM}")
    keys = sorted(k for k in next(iter(params.values())) if k != "fp32")
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for flat in _flat_partitions(opt):
        st = base.state[flat]   # torch optimizers keep state in a defaultdict keyed by tensor
        for k in keys:
            st[k] = torch.zeros_like(flat)
        for k, v in full["scalars"].items():
            st[k] = (v.to(flat.device if on_device else "cpu", copy=True) if torch.is_tensor(v)
                     else v)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):   # stage 1/2: link the fragments
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for n, p in mine.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(params[n]["fp32"].shape) != shape:
            raise ValueError(f"{where}: {n} saved {tuple(params[n]['fp32'].shape)}, model {shape}")
        dev = p.device
        _set(p, params[n]["fp32"].to(dev), None, safe_set_full_fp32_param,
             safe_set_full_optimizer_state)
        for k in keys:
            _set(p, params[n][k].to(dev), k, safe_set_full_fp32_param,
                 safe_set_full_optimizer_state)
    g = full["global"]
    for k in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if g.get(k) is not None and hasattr(opt, k):
            setattr(opt, k, g[k])
    for k, v in full["engine"].items():
        if v is not None:
            setattr(engine, k, v)


def _set(p, value, key, set_fp32, set_state) -> None:
    """One parameter's fp32 master (``key`` None) or optimizer state ``key``.

    DeepSpeed 0.19.8's ZeRO-3 setter narrows ``value`` at ``chunk * dp_rank`` for ``chunk``
    elements, which runs past the end on the last rank when ``numel % D != 0``; there the value
    is zero-padded to ``chunk * D`` and the partition written directly (the padding stays zero, as
    DeepSpeed keeps it)."""
    if hasattr(p, "ds_id"):
        opt = p._z3_optimizer
        d = dist.get_world_size(group=opt._get_param_partition_group(p))
        if p.ds_numel % d:
            part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                        optim_state_key=key)
            c = part.numel()
            padded = torch.zeros(c * d, dtype=part.dtype, device=part.device)
            padded[:p.ds_numel] = value.reshape(-1)
            r = opt._get_param_partition_rank(p)
            part.data.copy_(padded[r * c:(r + 1) * c])
            return
    if key is None:
        set_fp32(p, value)
    else:
        set_state(p, value, key)


def load_resharded(engine, cfg, path: str, saved: dict) -> None:
    """Resume ``engine`` (built for this run's D) from ZeRO partitions saved at another D.

    Loads the module weights as a same-D resume would (DeepSpeed's module-only load; ZeRO-3
    through the ``model_tp_XX.pt`` shard), then the fp32 masters, optimizer state and step of
    every parameter (:func:`read_full_state`, :func:`write_full_state`). Collective over all ranks.

    Args:
        engine: the DeepSpeed engine. cfg: this run's RunConfig. path: checkpoint folder.
        saved: its ``trainer_state.json`` (``zero_stage``, ``data_parallel_size``).

    Raises:
        ValueError: see :func:`check_supported`, :func:`read_full_state`, :func:`write_full_state`.
    """
    check_supported(path, saved, cfg)
    tp = get_tensor_model_parallel_rank()
    stage = saved["zero_stage"]
    full = read_full_state(path, stage, saved["data_parallel_size"], tp)
    parent, tag = os.path.split(os.path.abspath(path))
    if stage == 3:
        load_into(engine.module, module_state(path, tp))
    else:
        engine.load_checkpoint(parent, tag=tag, load_optimizer_states=False,
                               load_lr_scheduler_states=False, load_module_only=True)
    write_full_state(engine, full, path)


def dump_full_state(engine, out_dir: str, tag: str) -> None:
    """Test support (``megatron_lite.testing.faults`` calls it from its resume hook for
    ``MEGATRON_LITE_DUMP_OPTIM_STATE=DIR``): after a load, DP rank 0 of each TP rank saves
    ``DIR/<tag>_tp<tp>.pt`` = ``{"params": {name: {"fp32", "exp_avg", ...}}, "step": [the
    distinct step counts], "model_mismatch": [names whose training-dtype weight is not the fp32
    master's rounding]}``, gathered with DeepSpeed's ``safe_get_full_*`` (collective over DP)."""
    # why: heavy optional dependency (DeepSpeed), imported where the engine exists
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    base = opt.optimizer
    steps = {float(base.state[f]["step"]) for f in _flat_partitions(opt)
             if "step" in base.state.get(f, {})}
    keys = sorted({k for f in _flat_partitions(opt) for k, v in base.state.get(f, {}).items()
                   if torch.is_tensor(v) and v.shape == f.shape})
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and keys:
        # stage 1/2 link the state fragments only at the first step (a same-D load did not)
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out, mismatch = {}, []
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            d = {"fp32": safe_get_full_fp32_param(p).detach().cpu().clone()}
            for k in keys:
                d[k] = safe_get_full_optimizer_state(p, k).detach().cpu().clone()
            out[n] = d
            # the training-dtype weight must be the rounding of the fp32 master
            if hasattr(p, "ds_id"):
                import deepspeed  # why: heavy optional dependency, only needed at ZeRO-3

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    w = p.detach().cpu().clone()
            else:
                w = p.detach().cpu().clone()
            if not torch.equal(w, d["fp32"].to(w.dtype)):
                mismatch.append(n)
    if get_data_parallel_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        f = os.path.join(out_dir, f"{tag}_tp{get_tensor_model_parallel_rank()}.pt")
        torch.save({"params": out, "step": sorted(steps), "model_mismatch": mismatch}, f + ".tmp")
        os.replace(f + ".tmp", f)
