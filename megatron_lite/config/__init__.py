"""The run's configuration: one dataclass tree, its command line and YAML, derived values, checks.

Where each part lives:

* :mod:`~megatron_lite.config.sections` - the section dataclasses above the model and data layers
  (parallel, optimizer, schedule, training, checkpoint, logging, eval, cpt); the model and data
  sections are declared by their own layers (``model/model_config.py``, ``data/data_config.py``),
  all with the one field helper :func:`megatron_lite.config_field.arg`;
* :mod:`~megatron_lite.config.tree` - ``RunConfig``/``Derived``, argparse and YAML;
* :mod:`~megatron_lite.config.derive` - derived values (D, mu_tok, A, GB_tok, steps) and checks;
* :mod:`~megatron_lite.config.plan` - the resolved plan printed at start and by ``--dry-run``.

Precedence: dataclass default < ``--config run.yaml`` < command-line flag.
"""

from megatron_lite.config.tree import (Derived, RunConfig, apply_tree, build_parser, did_you_mean,
                                       finalize, format_plan, load_config, parse_args,
                                       section_classes, yaml_with_lines)
from megatron_lite.errors import ConfigError

__all__ = ["ConfigError", "Derived", "RunConfig", "apply_tree", "build_parser", "did_you_mean",
           "finalize", "format_plan", "load_config", "parse_args", "section_classes",
           "yaml_with_lines"]
