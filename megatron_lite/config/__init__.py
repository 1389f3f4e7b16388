"""The run's configuration: one dataclass tree, its command line and YAML, derived values, checks.

Where each part lives:

* :mod:`~megatron_lite.config.sections` - the section dataclasses above the model and data layers
  (parallel, optimizer, schedule, training, checkpoint, logging, eval, cpt); the model and data
  sections are declared by their own layers (``model/model_config.py``, ``data/data_config.py``),
  all with the one field helper :func:`megatron_lite.config_field.arg`;
* :mod:`~megatron_lite.config.tree` - ``RunConfig``/``Derived``, field metadata, applying a
  ``{section: {key: value}}`` tree;
* :mod:`~megatron_lite.config.cli` - argparse, YAML, :func:`parse_args` and :func:`load_config`;
* :mod:`~megatron_lite.config.derive` - :func:`finalize`: derived values (D, mu_tok, A, GB_tok,
  steps, peak LR) and the checks each one needs;
* :mod:`~megatron_lite.config.checks` - checks that derive nothing (intervals, output paths,
  device and kernels, optimizer, spike guard, noise scale, :func:`check_runtime` at launch);
* :mod:`~megatron_lite.config.deepspeed_json` - a user's ``--deepspeed-config`` JSON;
* :mod:`~megatron_lite.config.batch_ramp`, :mod:`~megatron_lite.config.lr_scaling` - the batch
  ramp-up and the peak-LR scaling rules;
* :mod:`~megatron_lite.config.plan_text` - the resolved plan printed at start and by ``--dry-run``.

Precedence: dataclass default < ``--config run.yaml`` < command-line flag.
"""

from megatron_lite.config.cli import build_parser, load_config, parse_args, yaml_with_lines
from megatron_lite.config.derive import finalize
from megatron_lite.config.plan_text import format_plan
from megatron_lite.config.tree import Derived, RunConfig, apply_tree, did_you_mean, section_classes
from megatron_lite.errors import ConfigError

__all__ = ["ConfigError", "Derived", "RunConfig", "apply_tree", "build_parser", "did_you_mean",
           "finalize", "format_plan", "load_config", "parse_args", "section_classes",
           "yaml_with_lines"]
