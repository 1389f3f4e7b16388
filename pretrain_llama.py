"""Pretrain a LLaMA-style model: parse flags (and --config YAML), build, train.

    torchrun --nnodes N --nproc_per_node P pretrain_llama.py --tp T --zero-stage 1 ...
    python pretrain_llama.py --help          # every flag, grouped by config section
    python pretrain_llama.py ... --dry-run   # validate and print the resolved plan
"""

import os
import sys


def _refuse_cpt_settings(cfg) -> None:
    """The ``cpt`` section shares the config tree but only ``cpt_llama.py`` acts on it; a CPT
    setting given here would be silently ignored, so it is an error.

    Raises:
        ConfigError: naming the CPT flags that were set.
    """
    import dataclasses

    from megatron_lite.config import ConfigError

    section = getattr(cfg, "cpt", None)
    if section is None or not dataclasses.is_dataclass(section):
        return
    default = type(section)()
    changed = [f.name for f in dataclasses.fields(section)
               if getattr(section, f.name) != getattr(default, f.name)]
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise ConfigError(f"{flags}: continued-pretraining settings are read by cpt_llama.py "
                          "only; run cpt_llama.py with the same flags (or drop them)")


def main(argv=None) -> int:
    from megatron_lite.config import ConfigError, format_plan, parse_args

    try:
        cfg = parse_args(argv)
        _refuse_cpt_settings(cfg)
    except ConfigError as e:
        print(f"pretrain_llama.py: error: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(cfg))
        return 0
    from megatron_lite.training.pretrain import pretrain
    from megatron_lite.training.checkpoint_files import CheckpointSaveError
    from megatron_lite.training.trainer import TooManySkippedSteps

    try:
        pretrain(cfg)
    except ConfigError as e:
        print(f"pretrain_llama.py: error: {e}", file=sys.stderr)
        return 2
    except TooManySkippedSteps as e:
        print(f"pretrain_llama.py: training aborted: {e}", file=sys.stderr)
        return 1
    except CheckpointSaveError as e:
        # The previous checkpoint is intact and still `latest`; restarting resumes from it.
        print(f"pretrain_llama.py: checkpoint save failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
