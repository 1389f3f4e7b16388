"""Continued pretraining of a LLaMA-style model from a base checkpoint (ours or HuggingFace).

    torchrun --nproc_per_node 8 cpt_llama.py --pretrained-checkpoint /ckpt/llama-7b-hf \\
        --tokenizer-model tok/spm.model --data-path 0.3 data/base_text_document \\
        0.7 data/domain_text_document --seq-length 4096 --train-tokens 100000000000 \\
        --lr 1e-4 --save runs/cpt --load runs/cpt ...
    python cpt_llama.py --help          # every flag (the CPT ones are in the "cpt" group)
    python cpt_llama.py ... --dry-run   # validate against the base checkpoint and print the plan

The architecture comes from the base checkpoint (flags that contradict it are errors); weights are
loaded only on a fresh start; optimizer and LR schedule start fresh (peak --lr default 1e-4).
Semantics: megatron_lite/cpt/resolve.py and README "Continued pretraining (CPT)".
"""

import sys

from megatron_lite.utils import use_project_venv
use_project_venv()  # no torch in this Python: rerun under the checkout's .venv, or say how

from megatron_lite.cpt.resolve import resolve_config  # noqa: E402
from megatron_lite.cpt.run import run  # noqa: E402
from megatron_lite.entrypoints import run_entrypoint  # noqa: E402


def _dry_run_note(cfg) -> str:
    c = cfg.cpt
    return (f"cpt: base {c.pretrained_checkpoint} ({c.base_format}, vocab {c.base_vocab_size} -> "
            f"{cfg.model.vocab_size}), freeze embeddings {c.freeze_embeddings}, freeze layers "
            f"{c.freeze_layers or 'none'}")


def main(argv=None) -> int:
    """Resolve against the base checkpoint, then dry-run or train; the exit status is documented
    in :mod:`megatron_lite.entrypoints` (``run(cfg, callbacks=...)`` receives the test fault
    hooks from there)."""
    return run_entrypoint("cpt_llama.py", lambda: resolve_config(argv), run, _dry_run_note)


if __name__ == "__main__":
    sys.exit(main())
