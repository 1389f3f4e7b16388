"""DeepSpeed configuration from the run config (or a user JSON with "auto" fields) and engine setup.

DeepSpeed is the data-parallel engine: gradient averaging over the DP group, ZeRO 0-3, bf16/fp16
(dynamic loss scaling) and gradient clipping on the global norm. It is given
``mpu=megatron_lite.parallel.mpu`` so ZeRO partitions over DP only and the norm counts
TP-replicated parameters once. The engine never owns the LR schedule (we set the LR of each update,
see :mod:`megatron_lite.training.schedules`) nor the optimizer (ours, named by ``--optimizer``, is
passed in), so a user JSON's ``optimizer``/``scheduler`` blocks are dropped with a warning (the
recipe's template has them only as placeholders). With a batch-size ramp-up the engine is built
for the final batch and :func:`set_step_batch` moves it to each step's batch.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

from megatron_lite.config.deepspeed_json import read_json_with_comments
from megatron_lite.parallel import get_context_parallel_world_size, mpu

# Batch/precision/clipping fields: ours are the source of truth; the JSON may say "auto" or agree.
_AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping")


def _fill(d: dict, key: str, value: Any, where: str) -> None:
    cur = d.get(key, "auto")
    if cur == "auto" or cur is None:
        d[key] = value
    elif cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float))
                               and float(cur) == float(value)):
        raise ValueError(f"--deepspeed-config: {where}{key}={cur!r} contradicts this run's "
                         f"value {value!r}; set it to \"auto\" or change the flag")


def clip_in_optimizer(cfg) -> bool:
    """True where our optimizer must clip (fp32 ZeRO-0: DeepSpeed would not report the norm)."""
    return cfg.parallel.zero_stage == 0 and cfg.derived.precision == "fp32"


def build_ds_config(cfg) -> dict:
    """The DeepSpeed config dict for a finalized RunConfig.

    Returns:
        A dict for ``deepspeed.initialize(config=...)``.

    Raises:
        ValueError: a non-"auto" JSON value contradicts the run's batch sizes, precision or
            clipping.
    """
    d, tr, par = cfg.derived, cfg.training, cfg.parallel
    user = read_json_with_comments(par.deepspeed_config) if par.deepspeed_config else {}
    ds = copy.deepcopy(user)
    for block in ("optimizer", "scheduler"):
        if ds.pop(block, None) is not None:
            warnings.warn(f"--deepspeed-config: the {block!r} block is ignored (megatron_lite's "
                          f"optimizer and LR schedule come from the optimizer/schedule flags)")
    _fill(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", d.num_micro_batches, "")
    _fill(ds, "train_batch_size", d.global_batch_size, "")
    # DeepSpeed's data-parallel group is D x CP (parallel/mpu.py) and it checks train_batch_size =
    # micro x A x (its group size): in its count each CP rank reads its own micro-batches.
    ds["train_batch_size"] = d.global_batch_size * par.context_parallel_size
    clip = cfg.optimizer.clip_grad
    _fill(ds, "gradient_clipping", clip, "")
    if clip_in_optimizer(cfg):
        ds["gradient_clipping"] = 0.0  # our optimizer's SkipGuard clips and records the norm
    for name, on in (("bf16", d.precision == "bf16"), ("fp16", d.precision == "fp16")):
        block = ds.setdefault(name, {})
        if block.get("enabled", "auto") not in ("auto", on):
            raise ValueError(f"--deepspeed-config: {name}.enabled={block['enabled']} contradicts "
                             f"the run's precision {d.precision} (--bf16/--fp16)")
        block["enabled"] = on
    if d.precision == "fp16":
        fp16 = ds["fp16"]
        if tr.loss_scale is not None:
            fp16.setdefault("loss_scale", tr.loss_scale)
        else:
            fp16.setdefault("loss_scale", 0)  # 0 = dynamic
            fp16.setdefault("initial_scale_power", tr.initial_loss_scale_power)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = par.zero_stage
    h = int(cfg.model.hidden_size or 0)
    autos = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "stage3_param_persistence_threshold": 10 * h}
    for k, v in autos.items():
        if zero.get(k) == "auto":
            zero[k] = v
    for key, on in (("offload_optimizer", par.offload_optimizer),
                    ("offload_param", par.offload_params)):
        if on or key in zero:
            block = zero.setdefault(key, {})
            if block.get("device", "auto") in ("auto", None):
                block["device"] = "cpu" if on else "none"
    for k, v in list(zero.items()):
        if isinstance(v, dict):
            for kk, vv in v.items():
                if vv == "auto":
                    raise ValueError(f"--deepspeed-config: zero_optimization.{k}.{kk} is "
                                     f"\"auto\" but has no value to fill; give a number")
        elif v == "auto":
            raise ValueError(f"--deepspeed-config: zero_optimization.{k} is \"auto\" but has no "
                             f"value to fill; give a number")
    # Our optimizers are torch optimizers (SkipGuard subclasses): allow them under ZeRO and with
    # CPU offload (DeepSpeed would otherwise insist on its own DeepSpeedCPUAdam).
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    # The TrainingLogger prints our line; DeepSpeed's own progress lines (a JSON's
    # "steps_per_print": 10, as in the recipe's template) would interleave with it, so they are
    # always off. DeepSpeed reads 0 as "every step" in places, hence the largest int instead.
    if ds.get("steps_per_print") not in (None, "auto", 2 ** 31 - 1):
        warnings.warn(f"--deepspeed-config: steps_per_print={ds['steps_per_print']} is ignored "
                      f"(megatron_lite logs its own line every --log-interval steps)")
    ds["steps_per_print"] = 2 ** 31 - 1
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def skip_cpu_shm_comm_op() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op.

    DeepSpeed builds ``deepspeed_shm_comm`` (~50 s of C++ on a 2-core machine) when its comm layer
    starts, only to speed up intra-node CPU all-reduce; gloo does the same collectives. The build
    shares one lock-guarded folder under ``$TORCH_EXTENSIONS_DIR``, so a process killed mid-build
    leaves a lock every later DeepSpeed start waits on forever. Marking the op incompatible makes
    DeepSpeed use torch.distributed directly. ``MEGATRON_LITE_DS_SHM=1`` keeps the op.
    """
    if os.environ.get("MEGATRON_LITE_DS_SHM") == "1":
        return
    import deepspeed.ops  # why: heavy optional dependency, imported only when an engine is built

    compat = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compat, dict):
        compat["deepspeed_shm_comm"] = False


class _UntestedOptimizerFilter:
    """Drops DeepSpeed's "ZeRO with an untested optimizer" warning. Every optimizer we hand to
    ZeRO (torch AdamW/Adafactor, Lion, DeepSpeed CPU Adam, each with our skip guard) is run under
    ZeRO 1/2/3 by tests/test_optimizers.py; ``zero_allow_untested_optimizer`` already allows it."""

    def filter(self, record) -> bool:
        return "untested optimizer" not in record.getMessage()


def init_engine(model, optimizer, cfg):
    """``deepspeed.initialize`` with our optimizer, the TP-aware mpu and the built config.

    Returns:
        The DeepSpeed engine (the process group must already exist).
    """
    import deepspeed  # why: heavy optional dependency, imported only when an engine is built
    from deepspeed.utils import logger as ds_logger  # why: as above

    if not any(isinstance(f, _UntestedOptimizerFilter) for f in ds_logger.filters):
        ds_logger.addFilter(_UntestedOptimizerFilter())
    # DeepSpeed's ZeRO calls it on every rank; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is "
                            r"deprecated", category=FutureWarning)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=build_ds_config(cfg), mpu=mpu,
                                           dist_init_required=False)
    return engine


def set_step_batch(engine, global_batch: int) -> int:
    """Point the engine at this step's global batch (batch-size ramp-up); returns A.

    ``engine.set_train_batch_size`` changes DeepSpeed's gradient-accumulation steps A; DeepSpeed
    finds the accumulation boundary as ``(micro_steps + 1) % A == 0``, so the micro-step counter
    (used for nothing else) is restarted at each step: the step's last micro-batch is then the
    boundary whatever the previous steps' A were. Called only at a step boundary.

    Args:
        global_batch: samples of the step (over the D data-parallel replicas); DeepSpeed counts
            them once per context-parallel rank (see :func:`build_ds_config`).

    Raises:
        ValueError: ``global_batch`` not a multiple of micro_batch_size x D (DeepSpeed's check).
    """
    ds_batch = int(global_batch) * get_context_parallel_world_size()
    if engine.train_batch_size() != ds_batch:
        engine.set_train_batch_size(ds_batch)
    engine.micro_steps = 0
    return engine.gradient_accumulation_steps()
