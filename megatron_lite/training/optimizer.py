"""Optimizers (AdamW, Lion, Adafactor, paged AdamW, DeepSpeed CPU Adam) with weight-decay param
groups and an all-rank "skip this update" guard.

Weight-decay policy: matrices (``ndim >= 2``) are decayed; norms' gains and biases (``ndim < 2``)
are not (as in Megatron-LM's ``_get_param_groups`` and GPT-3 practice: decaying a gain pulls the
normalised activations towards zero, which is not regularisation). Embedding policy: the input
embedding and the untied output layer are matrices and ARE decayed by default, as in Megatron-LM;
``--no-decay-embeddings`` excludes any parameter whose name contains ``embed``, ``output_layer`` or
``lm_head``.

The guard (:class:`SkipGuard`, a mixin put in front of any torch optimizer) makes ``step`` skip
when told to (``begin_step(force_skip=True)``) or when any rank holds a non-finite gradient (one
all-reduce MAX over the world group per engine step). DeepSpeed calls the base optimizer's
``step`` on every rank (with ZeRO on each rank's partition, possibly once per param group), so a
skip is taken by all ranks alike and leaves parameters and optimizer state untouched. For the fp32
ZeRO-0 case, where DeepSpeed's engine neither records the grad norm nor lets us see it before the
update, ``clip_grad`` makes the guard compute the global norm itself (TP-sharded parameters summed
over the TP group, replicated ones counted once: DeepSpeed's ``clip_grad_norm_`` rule) and clip.

``--optimizer`` and the ZeRO stages (checked by :func:`megatron_lite.config.checks.check_optimizer`
before any process group):

    ===========  ======  =========  ========  ==========================================
    optimizer    ZeRO-0  ZeRO-1/2   ZeRO-3    offload (--offload-optimizer, ZeRO >= 1)
    ===========  ======  =========  ========  ==========================================
    adamw        yes     yes        yes       yes (torch AdamW on CPU)
    lion         yes     yes        yes       yes (torch ops on CPU)
    adafactor    yes     yes (*)    yes (*)   yes (*)
    paged_adamw  CUDA    CUDA       CUDA      refused (bitsandbytes pages GPU memory)
    cpu_adam     no      offload    offload   required (DeepSpeedCPUAdam, AVX C++ kernel)
    ===========  ======  =========  ========  ==========================================

(*) ZeRO >= 1 hands the optimizer each rank's flat 1-D fp32 partition, so Adafactor there keeps a
full (unfactored) second moment and scales its relative step by the partition's RMS instead of
each matrix's: it trains, but it is not the factored algorithm and saves no memory; ZeRO-0 keeps
the parameter shapes. AdamW and Lion are elementwise, so every stage gives the same update.
Sources: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2)
from ``lion-pytorch``; Adafactor (Shazeer & Stern 2018) is ``torch.optim.Adafactor``; paged AdamW
is ``bitsandbytes.optim.PagedAdamW`` (untested here: no GPU in CI); CPU Adam is
``deepspeed.ops.adam.DeepSpeedCPUAdam`` (adamw_mode; our subclass is not exactly that type, so
ZeRO drives it through plain ``step()`` rather than ZeRO-3's per-sub-group fast path). Every
optimizer's state is a plain torch ``state_dict``, saved and restored by DeepSpeed's checkpoint
with the rest of the engine.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_lite.config.checks import check_optimizer, check_optimizer_runtime
from megatron_lite.parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_rank

_EMBED_KEYS = ("embed", "output_layer", "lm_head")


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay_embeddings: bool = False) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (empty groups dropped).

    Returns:
        ``[{"params": [...], "weight_decay": wd, "name": "decay"},
        {"params": [...], "weight_decay": 0.0, "name": "no_decay"}]``.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitioned params are flat
        skip = ndim < 2 or (no_decay_embeddings and any(k in name for k in _EMBED_KEYS))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def _world_any(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def tp_aware_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of full (data-parallel reduced) gradients, TP-replicated ones counted once.

    Sums ``g**2`` over TP-sharded parameters (``tensor_model_parallel`` True) on every TP rank and
    over replicated ones on TP rank 0 only, then all-reduces over the TP group (DeepSpeed
    ``runtime/utils.clip_grad_norm_`` rule; Megatron-LM ``clip_grads.get_grad_norm_fp32``).
    """
    tp_rank = get_tensor_model_parallel_rank()
    total, device = None, torch.device("cpu")
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            sq = p.grad.detach().float().pow(2).sum()
            total = sq if total is None else total + sq
            device = p.grad.device
    total = torch.zeros((), device=device) if total is None else total
    group = get_tensor_model_parallel_group()
    if group is not None and dist.is_initialized():
        dist.all_reduce(total, group=group)
    return float(total.sqrt().item())


class SkipGuard:
    """Mixin (listed first among the bases) adding the all-rank skip guard to a torch optimizer.

    Args:
        params: param groups (see :func:`param_groups`).
        clip_grad: when > 0, compute the TP-aware global norm and clip in :meth:`step` (use only
            where the optimizer sees full gradients: ZeRO-0 fp32; DeepSpeed clips otherwise).
        *args, **kwargs: the wrapped optimizer's own arguments.

    Attributes:
        skipped: whether the last engine step was skipped.
        _global_grad_norm: the norm computed here (DeepSpeed's engine reads this attribute name).
    """

    def __init__(self, params, *args, clip_grad: float = 0.0, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.clip_grad = float(clip_grad)
        # ZeRO rewrites each group's "params" in place but may swap the list of groups while it
        # steps one group at a time, so keep the group dicts to check all of them at once.
        self._all_groups = list(self.param_groups)
        self._decision: bool | None = None
        self.skipped = False

    def begin_step(self, force_skip: bool = False) -> None:
        """Call before each engine step; ``force_skip`` (same on all ranks) skips it."""
        self._decision = True if force_skip else None
        self.skipped = bool(force_skip)
        if force_skip:
            self._global_grad_norm = float("nan")

    def _decide(self) -> bool:
        grads = [p.grad for g in self._all_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        local_bad = False
        if grads:
            s = torch.stack([g.detach().float().abs().sum() for g in grads]).sum()
            local_bad = not math.isfinite(float(s))
        bad = _world_any(local_bad, device)
        if not bad and self.clip_grad > 0:
            params = [p for g in self._all_groups for p in g["params"]]
            norm = tp_aware_grad_norm(params)
            self._global_grad_norm = norm
            bad = not math.isfinite(norm)
            if not bad and norm > self.clip_grad:
                coef = self.clip_grad / (norm + 1e-6)
                for g in grads:
                    g.mul_(coef)
        return bad

    @torch.no_grad()
    def step(self, closure=None, *args, **kwargs):
        """The wrapped optimizer's update unless this step was decided non-finite on any rank
        (then a no-op that leaves parameters and optimizer state untouched). Returns None when
        skipped."""
        if self._decision is None:
            self._decision = self._decide()
            self.skipped = self._decision
        if self._decision:
            return None
        return super().step(closure, *args, **kwargs)


class GuardedAdamW(SkipGuard, torch.optim.AdamW):
    """``torch.optim.AdamW`` with the :class:`SkipGuard` (``clip_grad`` keyword, then AdamW's)."""


class GuardedAdafactor(SkipGuard, torch.optim.Adafactor):
    """``torch.optim.Adafactor`` with the :class:`SkipGuard`."""


def _guarded(base: type, name: str) -> type:
    """A SkipGuard subclass of an optional dependency's optimizer class (built on first use)."""
    return type(name, (SkipGuard, base), {"__doc__": f"``{base.__module__}.{base.__name__}`` "
                                                     f"with the SkipGuard."})


def _lion_class() -> type:
    try:
        from lion_pytorch import Lion  # why: optional dependency, only for --optimizer lion
    except ImportError:
        raise ValueError("--optimizer lion needs the lion-pytorch package (pip install "
                         "lion-pytorch; it is in requirements.txt)") from None
    global _GUARDED_LION
    if _GUARDED_LION is None:
        _GUARDED_LION = _guarded(Lion, "GuardedLion")
    return _GUARDED_LION


_GUARDED_LION = None


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device,
                    clip_in_optimizer: bool) -> SkipGuard:
    """The guarded optimizer named by ``--optimizer`` for ``model`` (this rank's TP shard).

    The initial LR is the peak ``--lr``; the scheduler overwrites it before every update.

    Raises:
        ConfigError: the optimizer cannot run here (missing package, no CUDA for paged_adamw).
    """
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay, o.no_decay_embeddings)
    clip = o.clip_grad if clip_in_optimizer else 0.0
    name = o.optimizer
    check_optimizer(cfg)
    check_optimizer_runtime(cfg, device.type != "cuda")
    if name == "adamw":
        # torch's fused AdamW has a CPU kernel too (one pass over each tensor instead of ~10
        # element-wise ops): 9.5 ms of CPU time per step against 33.7 ms for the single-tensor
        # loop, quickstart's 5M parameters, 1 thread. ZeRO-Offload keeps DeepSpeed's CPU path.
        fused = not cfg.parallel.offload_optimizer
        return GuardedAdamW(groups, clip_grad=clip, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                            eps=o.adam_eps, weight_decay=o.weight_decay, fused=fused or None)
    if name == "lion":
        wd = o.weight_decay if o.lion_weight_decay is None else o.lion_weight_decay
        for g in groups:  # the no-decay group stays at 0
            g["weight_decay"] = wd if g["weight_decay"] else 0.0
        return _lion_class()(groups, clip_grad=clip, lr=o.lr, betas=(o.lion_beta1, o.lion_beta2),
                             weight_decay=wd)
    if name == "adafactor":
        return GuardedAdafactor(groups, clip_grad=clip, lr=o.lr,
                                beta2_decay=o.adafactor_beta2_decay,
                                eps=(o.adafactor_eps1, o.adafactor_eps2), d=o.adafactor_d,
                                weight_decay=o.weight_decay)
    if name == "paged_adamw":
        import bitsandbytes as bnb  # why: optional dependency, only for paged_adamw

        cls = _guarded(bnb.optim.PagedAdamW, "GuardedPagedAdamW")
        return cls(groups, clip_grad=clip, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                   eps=o.adam_eps, weight_decay=o.weight_decay)
    # cpu_adam: DeepSpeed JIT-builds its C++ op on first use (~1-2 min, cached in
    # $TORCH_EXTENSIONS_DIR). Not exactly DeepSpeedCPUAdam's type, so ZeRO calls plain step().
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # why: heavy op (JIT C++ build), cpu_adam only

    cls = _guarded(DeepSpeedCPUAdam, "GuardedCPUAdam")
    return cls(groups, clip_grad=clip, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
               eps=o.adam_eps, weight_decay=o.weight_decay, adamw_mode=True)
