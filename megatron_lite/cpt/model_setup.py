"""CPT model setup: base weights into this rank's (ZeRO-3: partitioned) model, vocabulary growth,
freezing. Called by :func:`megatron_lite.cpt.run.run` through ``pretrain(model_setup=...)``.

Loading goes through the HuggingFace layout (``model.hf_adapter``), whatever the base format and
TP degree: an HF folder is read tensor by tensor (safetensors, lazily: a rank keeps only its own TP
shard), one of our checkpoints is assembled from its TP shards with ``megatron_lite_to_hf``.
Both are then re-split for this run's TP degree with ``hf_to_megatron_lite`` (vocab re-padded).

Vocabulary growth (``V > V_base``; ``--extended-vocab-init``):

* ``piece-mean`` (default): row ``i`` of the embedding (and of an untied output layer) is the mean
  of the base rows of ``base_tokenizer.encode(text_i)``, where ``text_i`` is new piece ``i``'s
  surface text (SentencePiece's U+2581 read as a space). The new piece then starts as the average
  of the pieces the base model saw for the same text, the initialisation used for vocabulary
  extension in Chinese-LLaMA (Cui et al. 2023) and analysed by Hewitt (2021), "Initializing New
  Word Embeddings for Pretrained Language Models". A piece whose text encodes to nothing, and
  rows beyond the tokenizer's size (``--vocab-size`` above it), fall back to ``mean``.
* ``mean``: every new row is the mean of all ``V_base`` base rows (Hewitt 2021).

Means are taken in float64 and rounded once to the weights' dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from megatron_lite import parallel
from megatron_lite.checkpoint.base_checkpoint import detect_base
from megatron_lite.checkpoint.hf_files import LazyHFStateDict, has_safetensors, read_hf_weights
from megatron_lite.checkpoint.weights import load_into, module_state
from megatron_lite.config.sections import parse_layer_ranges
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.model import hf_adapter
from megatron_lite.utils import is_rank_0

SPIECE_SPACE = "\u2581"  # SentencePiece's whitespace meta symbol


def _tokenizer(path: str, kind: str | None):
    return build_tokenizer(kind or "SentencePieceTokenizer", path)


def base_tokenizer_path(cfg, base) -> str | None:
    """``--pretrained-tokenizer-model``, else the one recorded with the base checkpoint."""
    return cfg.cpt.pretrained_tokenizer_model or base.tokenizer_model


def check_extended_tokenizer(cfg, base) -> None:
    """Check that ``--tokenizer-model`` extends the base tokenizer (same piece for every old id)
    and that ``piece-mean`` has a base tokenizer to encode new pieces with.

    Raises:
        ValueError: naming the missing flag or the first id whose piece differs.
    """
    new_path, old_path = cfg.data.tokenizer_model, base_tokenizer_path(cfg, base)
    if cfg.cpt.extended_vocab_init == "piece-mean" and (not new_path or not old_path):
        raise ValueError(
            f"vocabulary grows from {base.model.vocab_size} to {cfg.model.vocab_size} rows and "
            "--extended-vocab-init piece-mean needs the extended --tokenizer-model and the base "
            "tokenizer (--pretrained-tokenizer-model; the base checkpoint records none); "
            "or use --extended-vocab-init mean")
    if not (new_path and old_path):
        return
    new, old = _tokenizer(new_path, cfg.data.tokenizer_type), _tokenizer(old_path,
                                                                         cfg.data.tokenizer_type)
    if not (hasattr(new, "id_to_piece") and hasattr(old, "id_to_piece")):
        return
    for i in range(min(old.vocab_size, new.vocab_size)):
        if new.id_to_piece(i) != old.id_to_piece(i):
            raise ValueError(f"--tokenizer-model {new_path} does not extend the base tokenizer "
                             f"{old_path}: id {i} is {new.id_to_piece(i)!r} vs "
                             f"{old.id_to_piece(i)!r} (make it with tools/extend_tokenizer.py)")


def new_piece_base_ids(new_tok, base_tok, v_base: int, v_new: int) -> list[list[int]]:
    """For every id in ``[v_base, v_new)``: the base tokenizer's ids of that piece's text.

    Returns:
        ``v_new - v_base`` lists (empty for ids the new tokenizer does not define, or whose text
        the base tokenizer encodes to nothing: those rows use the plain mean).
    """
    out = []
    for i in range(v_base, v_new):
        if i >= new_tok.vocab_size:
            out.append([])
            continue
        if hasattr(new_tok, "id_to_piece"):
            text = new_tok.id_to_piece(i).replace(SPIECE_SPACE, " ")
        else:
            text = new_tok.decode([i])
        out.append([t for t in base_tok.encode(text) if t < v_base])
    return out


def grow_rows(weight: torch.Tensor, v_new: int, piece_ids: list[list[int]] | None) -> torch.Tensor:
    """Append ``v_new - V_base`` rows to ``weight [V_base, h]`` (module docstring).

    Args:
        weight: base embedding or output-layer matrix ``[V_base, h]`` (unpadded).
        v_new: rows wanted.
        piece_ids: per new row, base ids to average (``piece-mean``); None: ``mean`` for all.

    Returns:
        ``[v_new, h]`` in ``weight``'s dtype; the first ``V_base`` rows are ``weight`` unchanged.
    """
    v0 = weight.shape[0]
    if v_new <= v0:
        return weight
    w64 = weight.double()
    overall = w64.mean(dim=0)
    rows = []
    for k in range(v_new - v0):
        ids = piece_ids[k] if piece_ids is not None else []
        rows.append(w64[ids].mean(dim=0) if ids else overall)
    return torch.cat([weight, torch.stack(rows).to(weight.dtype)], dim=0)


class _Grown(Mapping):
    """A state dict with the vocabulary matrices replaced by their grown versions."""

    def __init__(self, inner: Mapping, replaced: dict):
        self._inner, self._replaced = inner, replaced

    def __getitem__(self, key):
        return self._replaced[key] if key in self._replaced else self._inner[key]

    def __iter__(self):
        return iter(self._inner)

    def __len__(self):
        return len(self._inner)


def base_hf_state_dict(base) -> Mapping:
    """The base model's full weights under HF ``LlamaForCausalLM`` names (vocab unpadded).

    Memory: an HF safetensors base is read lazily (each rank materialises one tensor at a time
    and keeps only its TP shard); one of our checkpoints is read whole (all its TP shards) on
    every rank - for a 7B base about 4 bytes x 7e9 = 28 GB of CPU memory per process at fp32
    (less in bf16); convert it to HF first when that is too much.
    """
    if base.format == "hf":
        if has_safetensors(base.path):
            return LazyHFStateDict(base.path)
        return read_hf_weights(base.path)
    model = copy.deepcopy(base.model)
    model.validate(base.tp)
    return hf_adapter.megatron_lite_to_hf([module_state(base.path, r) for r in range(base.tp)],
                                          model)


def shard_for_this_run(cfg, tp_rank: int, tp_size: int) -> tuple[dict, str]:
    """This TP rank's state dict (our names) for ``cfg``'s model, from the base checkpoint.

    Returns:
        ``(state_dict, note)``: ``note`` describes the vocabulary growth for the log.

    Raises:
        ValueError: base weights that do not match the config (shape, missing key).
    """
    base = detect_base(cfg.cpt.pretrained_checkpoint, cfg.cpt.pretrained_checkpoint_format)
    sd = base_hf_state_dict(base)
    v0, v1 = int(base.model.vocab_size), int(cfg.model.vocab_size)
    note = f"vocab {v0}"
    if v1 > v0:
        piece_ids = None
        if cfg.cpt.extended_vocab_init == "piece-mean":
            new_tok = _tokenizer(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
            old_tok = _tokenizer(base_tokenizer_path(cfg, base), cfg.data.tokenizer_type)
            piece_ids = new_piece_base_ids(new_tok, old_tok, v0, v1)
        keys = ["model.embed_tokens.weight"] + ([] if cfg.model.tie_word_embeddings
                                                else ["lm_head.weight"])
        grown = {k: grow_rows(sd[k], v1, piece_ids) for k in keys}
        if cfg.model.tie_word_embeddings and "lm_head.weight" in sd:
            grown["lm_head.weight"] = grown["model.embed_tokens.weight"]
        sd = _Grown(sd, grown)
        fallback = sum(1 for ids in piece_ids if not ids) if piece_ids is not None else v1 - v0
        note = (f"vocab {v0} -> {v1}: {v1 - v0} new rows ({cfg.cpt.extended_vocab_init}; "
                f"{fallback} by the plain mean)")
    target = copy.deepcopy(cfg.model)
    return hf_adapter.hf_to_megatron_lite(sd, target, tp_rank, tp_size), note


def freeze(model: torch.nn.Module, cfg) -> list[str]:
    """``requires_grad=False`` on ``--freeze-embeddings`` / ``--freeze-layers`` parameters.

    Returns:
        Names of the frozen parameters.
    """
    layers = set(parse_layer_ranges(cfg.cpt.freeze_layers, cfg.model.num_layers))
    frozen = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if (cfg.cpt.freeze_embeddings and name == "embedding.weight") or (
                parts[0] == "layers" and int(parts[1]) in layers):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def setup_model(model: torch.nn.Module, cfg, load_weights: bool = True) -> None:
    """The ``model_setup`` of CPT: base weights (fresh start only), then freezing.

    Args:
        model: this rank's freshly built ``LlamaModel`` (ZeRO-3: partitioned).
        cfg: finalized CPT RunConfig.
        load_weights: False when resuming this CPT run's own checkpoint (it overwrites the
            weights anyway; the base is not read).
    """
    if load_weights:
        shard, note = shard_for_this_run(cfg, parallel.get_tensor_model_parallel_rank(),
                                         parallel.get_tensor_model_parallel_world_size())
        load_into(model, shard)
        del shard
        msg = f"[cpt] base weights from {cfg.cpt.pretrained_checkpoint} ({note})"
    else:
        msg = "[cpt] resuming this run's checkpoint: base weights not read"
    frozen = freeze(model, cfg)
    if is_rank_0():
        n_frozen = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()
                       if not p.requires_grad)
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(f"{msg}; frozen: {len(frozen)} tensors, {n_frozen} of {n_all} parameters "
              f"(this TP shard)", flush=True)


__all__ = ["base_hf_state_dict", "base_tokenizer_path", "check_extended_tokenizer", "freeze",
           "grow_rows", "new_piece_base_ids", "setup_model", "shard_for_this_run"]
