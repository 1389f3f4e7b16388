"""torchrun body shared by several fault checks (one launch instead of one per run): reads a JSON
list of ``{"name", "argv", "env"}`` and calls ``pretrain(parse_args(argv))`` for each in turn in
one process group, recording the final state or the error. Usage (see test_faults.py)::

    torchrun --nproc_per_node 2 tests/faults/driver.py SPEC.json RESULTS.json
"""

from __future__ import annotations

import json
import os
import sys

HOOKS = ("MEGATRON_LITE_INJECT_NAN", "MEGATRON_LITE_INJECT_RAISE", "MEGATRON_LITE_LOG_SAMPLES",
         "MEGATRON_LITE_DUMP_PARAMS", "MEGATRON_LITE_INJECT_SAVE_KILL")
# The fault hooks are Trainer callbacks built from these variables (megatron_lite/testing/faults.py),
# passed to pretrain as the entrypoints do.


def main(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from megatron_lite.config import parse_args
    from megatron_lite.testing import faults
    from megatron_lite.training.loop import pretrain

    with open(spec_path) as f:
        runs = json.load(f)
    results = {}
    for run in runs:
        for k in HOOKS:
            os.environ.pop(k, None)
        os.environ.update(run.get("env", {}))
        try:
            st = pretrain(parse_args(run["argv"]), callbacks=faults.callbacks_from_env())
            results[run["name"]] = {"iteration": st.iteration, "skipped": st.skipped_steps,
                                    "consumed_samples": st.consumed_samples}
        except Exception as e:  # noqa: BLE001 - recorded for the tests to assert on
            results[run["name"]] = {"error": f"{type(e).__name__}: {e}"}
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1], sys.argv[2])
