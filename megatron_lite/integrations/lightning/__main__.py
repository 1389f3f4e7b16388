"""Train with lightning.Trainer from a recipe-style YAML.

    python -m megatron_lite.integrations.lightning --config configs/lightning/tiny_cpu.yaml \\
        --data-path /data/corpus_text_document [--train-iters 100] [--dry-run]
    torchrun --nproc_per_node 8 -m megatron_lite.integrations.lightning --config FILE

Flags after ``--config`` are pretrain_llama.py's (they override the file). ``--ckpt-path`` resumes
from a Lightning checkpoint (``last`` = the newest in ``--save``). Exit status 2 on a config error.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    """Parse, resolve the YAML, build Trainer/module/datamodule and fit. Returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m megatron_lite.integrations.lightning",
                                description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="recipe-style YAML (model/data/optimizer/"
                   "scheduler/trainer sections; our own sections allowed)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the plan and the "
                   "Trainer arguments, and exit")
    p.add_argument("--ckpt-path", default=None, help="Lightning checkpoint to resume from "
                   "(path, or 'last')")
    args, flags = p.parse_known_args(argv)

    from megatron_lite.config import ConfigError, format_plan
    from megatron_lite.integrations.lightning import (MegatronDataModule, MegatronLlamaModule,
                                                      build_trainer, load_lightning_config,
                                                      trainer_kwargs)

    try:
        run = load_lightning_config(args.config, flags)
        kw = trainer_kwargs(run)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(format_plan(run.cfg))
        print("lightning.Trainer(" + ", ".join(f"{k}={v!r}" for k, v in sorted(kw.items())) + ")")
        return 0
    trainer = build_trainer(run)
    module = MegatronLlamaModule(run.cfg)
    try:
        trainer.fit(module, datamodule=MegatronDataModule(run.cfg), ckpt_path=args.ckpt_path)
    except (ValueError, FileNotFoundError) as e:
        # Bad input found at start (dataset files, token ids beyond --vocab-size): one line,
        # as pretrain_llama.py does (megatron_lite/entrypoints.py).
        if os.environ.get("MEGATRON_LITE_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer.global_rank == 0 and module.history:
        last = module.history[-1]
        print(f"[lightning] step {last['step']}: loss {last['loss']:.4f} (first step "
              f"{module.history[0]['loss']:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
