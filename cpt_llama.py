"""Continued pretraining of a LLaMA-style model from a base checkpoint (ours or HuggingFace).

    torchrun --nproc_per_node 8 cpt_llama.py --pretrained-checkpoint /ckpt/llama-7b-hf \\
        --tokenizer-model tok/spm.model --data-path 0.3 data/base_text_document \\
        0.7 data/domain_text_document --seq-length 4096 --train-tokens 100000000000 \\
        --lr 1e-4 --save runs/cpt --load runs/cpt ...
    python cpt_llama.py --help          # every flag (the CPT ones are in the "cpt" group)
    python cpt_llama.py ... --dry-run   # validate against the base checkpoint and print the plan

The architecture comes from the base checkpoint (flags that contradict it are errors); weights are
loaded only on a fresh start; optimizer and LR schedule start fresh (peak --lr default 1e-4).
Semantics: megatron_lite/training/cpt.py and README "Continued pretraining (CPT)".
"""

import os
import sys


def main(argv=None) -> int:
    from megatron_lite.config import ConfigError, format_plan
    from megatron_lite.training.cpt import resolve_config

    try:
        cfg = resolve_config(argv)
    except ConfigError as e:
        print(f"cpt_llama.py: error: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(cfg))
            c = cfg.cpt
            print(f"cpt: base {c.pretrained_checkpoint} ({c.base_format}, vocab "
                  f"{c.base_vocab_size} -> {cfg.model.vocab_size}), freeze embeddings "
                  f"{c.freeze_embeddings}, freeze layers {c.freeze_layers or 'none'}")
        return 0
    from megatron_lite.training.cpt import run
    from megatron_lite.training.checkpoint_files import CheckpointSaveError
    from megatron_lite.training.trainer import TooManySkippedSteps

    try:
        run(cfg)
    except ConfigError as e:
        print(f"cpt_llama.py: error: {e}", file=sys.stderr)
        return 2
    except TooManySkippedSteps as e:
        print(f"cpt_llama.py: training aborted: {e}", file=sys.stderr)
        return 1
    except CheckpointSaveError as e:
        # The previous checkpoint is intact and still `latest`; restarting resumes from it.
        print(f"cpt_llama.py: checkpoint save failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
