"""Time DeepSpeed's collectives (ZeRO reduce-scatter / all-gather / all-reduce) as DP communication.

DeepSpeed's engine and ZeRO optimizers call their collectives through the ``deepspeed.comm``
package (``from deepspeed import comm as dist; dist.all_reduce(...)``), looked up at call time, so
replacing those package attributes with thin wrappers times every collective the engine issues.
The wrappers add the seconds to :data:`megatron_lite.parallel.comm_timer.DP` and change nothing
else (same arguments, same return value). DeepSpeed's own ``comms_logger`` was not used: it
synchronises the device after every collective and keeps a list entry per call, growing for the
whole run, where this costs two clock reads per collective.

Only collectives inside the timed phases of a step count (the training timers take differences of
the totals), so evaluation and checkpoint traffic is left out of the step breakdown.
"""

from __future__ import annotations

import functools

from megatron_lite.parallel import comm_timer

# The collectives of deepspeed.comm that move data (barrier excluded: it is a wait, not traffic).
DEEPSPEED_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_fn", "all_gather", "all_gather_into_tensor",
    "allgather_fn", "all_gather_coalesced", "broadcast",
)


def _timed(fn, attr: str):
    # the hang tracker's name (attr: fn itself may be DeepSpeed's decorator, named log_wrapper)
    name = f"deepspeed.comm.{attr} [dp]"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = comm_timer.begin(name)
        try:
            return fn(*args, **kwargs)
        finally:
            comm_timer.end(comm_timer.DP, t0)
    wrapper.megatron_lite_timed = True
    return wrapper


def install_deepspeed_comm_timing() -> list[str]:
    """Wrap ``deepspeed.comm``'s collectives once per process (idempotent).

    Returns:
        The names wrapped by this call (empty when already installed).
    """
    import deepspeed.comm as ds_comm  # why: heavy optional dependency, loaded with the engine
    done = []
    for name in DEEPSPEED_COLLECTIVES:
        fn = getattr(ds_comm, name, None)
        if fn is None or getattr(fn, "megatron_lite_timed", False):
            continue
        setattr(ds_comm, name, _timed(fn, name))
        done.append(name)
    return done


__all__ = ["DEEPSPEED_COLLECTIVES", "install_deepspeed_comm_timing"]
