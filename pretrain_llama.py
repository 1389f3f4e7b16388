"""Pretrain a LLaMA-style model: parse flags (and --config YAML), build, train.

    torchrun --nnodes N --nproc_per_node P pretrain_llama.py --tp T --zero-stage 1 ...
    python pretrain_llama.py --help          # every flag, grouped by config section
    python pretrain_llama.py ... --dry-run   # validate and print the resolved plan
"""

import os
import sys


def main(argv=None) -> int:
    from megatron_lite.config import ConfigError, format_plan, parse_args

    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"pretrain_llama.py: error: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(cfg))
        return 0
    from megatron_lite.training.pretrain import pretrain
    from megatron_lite.training.trainer import TooManySkippedSteps

    try:
        pretrain(cfg)
    except ConfigError as e:
        print(f"pretrain_llama.py: error: {e}", file=sys.stderr)
        return 2
    except TooManySkippedSteps as e:
        print(f"pretrain_llama.py: training aborted: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
