"""Whether a checkpoint fits this run: the model it holds (:func:`check_compatible`) and, for its
optimizer state, the set of frozen parameters (:func:`check_same_frozen_set`)."""

from __future__ import annotations

# Model fields that may change between save and resume without changing the weights' meaning.
MODEL_FIELDS_ALLOWED_TO_CHANGE = frozenset({
    "seq_length", "max_position_embeddings", "attention_backend", "no_fused_rope",
    "recompute_granularity", "recompute_num_layers", "hidden_dropout", "attention_dropout",
    "params_dtype", "model_size", "rope_scaling_type", "rope_scaling_factor",
    "rope_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_attention_factor", "yarn_mscale", "yarn_mscale_all_dim", "yarn_truncate",
    "llama3_low_freq_factor", "llama3_high_freq_factor",
    "cross_entropy_impl", "cross_entropy_chunk_size",  # how the loss is computed, not the weights
    "sequence_parallel",  # changes no shape or value: a checkpoint saved with SP loads without it
})


def _shape(model: dict, padded_vocab) -> str:
    return (f"hidden {model.get('hidden_size')}, layers {model.get('num_layers')}, heads "
            f"{model.get('num_attention_heads')}, groups {model.get('num_query_groups')}, ffn "
            f"{model.get('ffn_hidden_size')}, padded vocab {padded_vocab}")


def check_compatible(saved: dict, cfg, where: str = "checkpoint") -> None:
    """Raise if resuming ``saved`` (a checkpoint's config dict) under ``cfg`` would silently change
    the model.

    Raises:
        ValueError: one line: each differing model flag with both values, the TP degree or the
            padded vocab, both shapes, and where the checkpoint's values are.
    """
    diffs = []
    now = cfg.to_dict()
    for k, v in saved.get("model", {}).items():
        if k not in MODEL_FIELDS_ALLOWED_TO_CHANGE and now["model"].get(k) != v:
            diffs.append(f"--{k.replace('_', '-')}: checkpoint {v!r}, this run "
                         f"{now['model'].get(k)!r}")
    tp_old = saved.get("parallel", {}).get("tensor_model_parallel_size")
    if tp_old != cfg.parallel.tensor_model_parallel_size:
        diffs.append(f"--tensor-model-parallel-size: checkpoint {tp_old}, this run "
                     f"{cfg.parallel.tensor_model_parallel_size} (reshard with "
                     f"tools/convert_checkpoint.py)")
    pv = saved.get("derived", {}).get("padded_vocab_size")
    if pv != cfg.derived.padded_vocab_size:
        diffs.append(f"padded vocab (--vocab-size/--make-vocab-size-divisible-by): checkpoint "
                     f"{pv}, this run {cfg.derived.padded_vocab_size}")
    if diffs:
        raise ValueError(
            f"{where} does not match this run's model: " + "; ".join(diffs)
            + f" (checkpoint shape: {_shape(saved.get('model', {}), pv)}; this run: "
            f"{_shape(now['model'], cfg.derived.padded_vocab_size)}). Resume with the "
            f"checkpoint's values (in {where}/run_config.json) or --load another folder")


def check_same_frozen_set(saved: dict, cfg, path: str) -> None:
    """The optimizer state covers the trainable parameters only: a resume that freezes other
    layers (CPT's --freeze-layers/--freeze-embeddings) cannot load it.

    Args:
        saved: the checkpoint's config dict (its ``cpt`` section may be missing: older or
            pretraining checkpoints). cfg: this run's config (``cfg.cpt`` always exists).
        path: the checkpoint folder (for the message).

    Raises:
        ValueError: one line naming both settings and the ways out.
    """
    old, now = saved.get("cpt") or {}, cfg.cpt
    pairs = [("--freeze-layers", old.get("freeze_layers"), now.freeze_layers),
             ("--freeze-embeddings", bool(old.get("freeze_embeddings")),
              bool(now.freeze_embeddings))]
    diffs = [f"{flag}: checkpoint {a!r}, this run {b!r}" for flag, a, b in pairs if a != b]
    if diffs:
        raise ValueError(f"{path}: the frozen parameters differ from the checkpoint's ("
                         + "; ".join(diffs) + "), so its optimizer state does not fit; resume "
                         "with the checkpoint's settings or pass --no-load-optim")


__all__ = ["MODEL_FIELDS_ALLOWED_TO_CHANGE", "check_compatible", "check_same_frozen_set"]
