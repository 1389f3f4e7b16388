"""Pretrain a LLaMA-style model: parse flags (and --config YAML), build, train.

    torchrun --nnodes N --nproc_per_node P pretrain_llama.py --tp T --zero-stage 1 ...
    python pretrain_llama.py --help          # every flag, grouped by config section
    python pretrain_llama.py ... --dry-run   # validate and print the resolved plan
"""

import dataclasses
import sys

from megatron_lite.utils import use_project_venv
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how

from megatron_lite.config import ConfigError, parse_args  # noqa: E402
from megatron_lite.entrypoints import run_entrypoint  # noqa: E402
from megatron_lite.training.loop import pretrain  # noqa: E402


def _refuse_cpt_settings(cfg) -> None:
    """The ``cpt`` section shares the config tree but only ``cpt_llama.py`` acts on it; a CPT
    setting given here would be silently ignored, so it is an error.

    Raises:
        ConfigError: naming the CPT flags that were set.
    """
    section = cfg.cpt
    default = type(section)()
    changed = [f.name for f in dataclasses.fields(section)
               if getattr(section, f.name) != getattr(default, f.name)]
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise ConfigError(f"{flags}: continued-pretraining settings are read by cpt_llama.py "
                          "only; run cpt_llama.py with the same flags (or drop them)")


def main(argv=None) -> int:
    """Parse, then dry-run or train (``pretrain(cfg, callbacks=...)``: the test fault hooks come
    in through :func:`megatron_lite.entrypoints.run_entrypoint`); the exit status is documented
    in :mod:`megatron_lite.entrypoints`."""
    def resolve():
        cfg = parse_args(argv)
        _refuse_cpt_settings(cfg)
        return cfg

    return run_entrypoint("pretrain_llama.py", resolve, pretrain)


if __name__ == "__main__":
    sys.exit(main())
