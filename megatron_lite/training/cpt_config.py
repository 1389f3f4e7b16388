"""``CPTConfig``: the continued-pretraining section of the run config (flags of ``cpt_llama.py``).

``pretrain_llama.py`` parses these flags too (the section is part of the one config tree) but only
``cpt_llama.py`` acts on them (:mod:`megatron_lite.training.cpt`). Semantics, in short:

* ``--pretrained-checkpoint DIR`` - weights only, on a fresh start (no checkpoint in ``--load``);
  the architecture comes from DIR's config. Optimizer moments, LR schedule, iteration counter,
  data position and RNG start fresh from this run's flags. A restart with ``--load`` of this CPT
  run's own ``--save`` folder resumes it exactly and never touches DIR's weights again.
* ``--load-optimizer-state`` - also the base's AdamW moments (our checkpoints only; same layout).
* ``--freeze-embeddings`` / ``--freeze-layers a-b[,c-d]`` - ``requires_grad=False`` before the
  optimizer exists, so those parameters get no optimizer state and stay bitwise unchanged.
* a ``--tokenizer-model`` with more pieces than the base vocabulary grows the embedding (and an
  untied output layer) by the extra rows, initialised as ``--extended-vocab-init`` says.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_lite.config_field import arg

VOCAB_INIT_CHOICES = ("piece-mean", "mean")


@dataclasses.dataclass
class CPTConfig:
    """Continued pretraining: base checkpoint, freezing and vocabulary extension (cpt_llama.py)."""

    pretrained_checkpoint: Optional[str] = arg(
        None, "Base model to continue from: a megatron_lite --save folder / checkpoint folder or "
              "a HuggingFace LlamaForCausalLM folder (config.json + safetensors), detected. "
              "Loads weights only and only on a fresh start; model flags not given are taken "
              "from its config, a contradicting one is an error.")
    pretrained_checkpoint_format: str = arg(
        "auto", "Format of --pretrained-checkpoint (auto: HF when DIR has config.json, else ours).",
        choices=["auto", "megatron_lite", "hf"])
    pretrained_tokenizer_model: Optional[str] = arg(
        None, "Tokenizer the base model was trained with (needed to initialise new rows of an "
              "extended --tokenizer-model with --extended-vocab-init piece-mean; default: the "
              "base checkpoint's --tokenizer-model, or tokenizer.model in the HF folder).")
    extended_vocab_init: str = arg(
        "piece-mean", "Rows for ids >= the base vocab size: piece-mean = mean of the base "
                      "rows of the base tokenizer's encoding of the new piece's text (embedding "
                      "and output layer alike); mean = mean of all base rows.",
        choices=list(VOCAB_INIT_CHOICES))
    freeze_embeddings: bool = arg(
        False, "Do not train the input embedding (with --tie-word-embeddings also the LM head).")
    freeze_layers: Optional[str] = arg(
        None, "Do not train these transformer blocks: 0-based inclusive ranges, e.g. '0-3' or "
              "'0-3,10-11'.")
    load_optimizer_state: bool = arg(
        False, "On a fresh start also load the base checkpoint's AdamW moments (megatron_lite "
               "base only, with the same TP, ZeRO stage, data-parallel size and vocabulary, no "
               "freezing; needs --load). Iteration, LR schedule, data position and RNG still "
               "start fresh.")
    # Filled by cpt.resolve_config (saved with checkpoints, never a flag).
    base_vocab_size: Optional[int] = arg(None, "vocabulary size of the base checkpoint", cli=False)
    base_format: Optional[str] = arg(None, "detected format of the base checkpoint", cli=False)


def parse_layer_ranges(spec: str | None, num_layers: int) -> list[int]:
    """Block indices named by ``--freeze-layers`` (sorted, unique).

    Args:
        spec: ``"a-b"``, ``"a"`` or a comma-separated list of those (0-based, inclusive).
        num_layers: L; every index must be in ``[0, L)``.

    Raises:
        ValueError: malformed spec, a reversed range or an index outside ``[0, L)``.
    """
    if not spec:
        return []
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"--freeze-layers {spec!r}: {part!r} is not 'a-b' or 'a' "
                             "(0-based block indices)") from None
        if a > b or a < 0 or b >= num_layers:
            raise ValueError(f"--freeze-layers {spec!r}: range {part!r} must satisfy "
                             f"0 <= a <= b < num_layers = {num_layers}")
        out.update(range(a, b + 1))
    return sorted(out)
