"""HuggingFace ``LlamaForCausalLM`` folders: read (config.json + safetensors, single or sharded,
or ``pytorch_model.bin``) and write (config.json, generation_config.json, safetensors sharded
above a size, tokenizer files).

The folder layout written is the one ``transformers``' ``save_pretrained`` produces:
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name:
file}}``) when the weights exceed ``--max-shard-size``; a tied model stores only
``model.embed_tokens.weight`` (HF re-ties ``lm_head`` on load).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from megatron_lite.checkpoint import hf_files
from megatron_lite.checkpoint.hf_files import INDEX, SINGLE
from megatron_lite.convert.common import Checkpoint, ConversionError, state_dtype
from megatron_lite.utils import follow_umask

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)

# Texts on which a converted fast tokenizer must give SentencePiece's ids (no special-token
# strings: HF tokenizers split those out as specials on purpose, SentencePiece does not).
_TOKENIZER_PROBES = ["hello world", " leading space", "two  spaces and\ttab", "line\nbreak\n\n",
                     "digits 0123456789 3.14", "café naïve Straße", "日本語 中文 😀",
                     "def f(x):\n    return x * 2\n", "   ", "a"]


def read_hf_config(folder: str) -> dict:
    """The ``config.json`` of an HF folder as a dict, checked to be a LLaMA causal LM.

    Raises:
        ConversionError: no config.json, unreadable JSON, or another architecture/model_type.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing; an HF checkpoint folder needs its config.json "
                              "(LlamaForCausalLM)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    if (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)) or \
            (mtype is not None and mtype not in SUPPORTED_MODEL_TYPES):
        raise ConversionError(f"{path}: architectures={archs} model_type={mtype!r} is not supported; "
                              f"the converter handles {SUPPORTED_ARCHITECTURES} "
                              f"(model_type {SUPPORTED_MODEL_TYPES})")
    if not archs and mtype is None:
        raise ConversionError(f"{path}: names neither 'architectures' nor 'model_type'; cannot tell "
                              "whether it is a LLaMA model")
    return cfg


def read_hf_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder: :func:`megatron_lite.checkpoint.hf_files.read_hf_state_dict`
    (``model.safetensors``, a sharded safetensors index, or ``pytorch_model.bin`` single or
    sharded), its errors raised as this package's.

    Raises:
        ConversionError: no weights file, an index naming a missing shard (both named), or an
            index entry whose tensor is not in its shard.
    """
    try:
        return hf_files.read_hf_state_dict(folder)
    except hf_files.HFWeightsError as e:
        raise ConversionError(str(e)) from e


def read_hf(folder: str) -> Checkpoint:
    """An HF ``LlamaForCausalLM`` folder as a :class:`Checkpoint` (tensors in their stored dtype).

    Raises:
        ConversionError: see :func:`read_hf_config` / :func:`read_hf_state_dict`; a config feature
            ``LlamaModel`` lacks; weights that do not match the config (key and file named).
    """
    from megatron_lite.model.hf_adapter import check_hf_state_dict, config_from_hf

    if not os.path.isdir(folder):
        raise ConversionError(f"--load {folder}: " + ("is a file; give the HF model folder "
                              "(config.json + weights)" if os.path.isfile(folder) else
                              "no such folder"))
    cfg = read_hf_config(folder)
    try:
        mc = config_from_hf(cfg)
        mc.validate(1)
    except ValueError as e:
        raise ConversionError(f"{os.path.join(folder, 'config.json')}: {e}") from e
    try:
        state = check_hf_state_dict(read_hf_state_dict(folder), mc, where=folder)
    except ValueError as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(str(e)) from e
    tok = os.path.join(folder, "tokenizer.model")
    return Checkpoint(mc, state, tokenizer_model=tok if os.path.isfile(tok) else None,
                      source=f"{folder} (hf)")


def _shards(state: dict, max_bytes: int) -> list[list[str]]:
    """Keys grouped in order into shards of at most ``max_bytes`` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def _tokenizer_ids(model_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return {"vocab": sp.get_piece_size(), "bos": sp.bos_id(), "eos": sp.eos_id(),
            "pad": sp.pad_id(), "sp": sp}


def write_fast_tokenizer(out_dir: str, sp) -> str | None:
    """Write ``tokenizer.json``/``tokenizer_config.json`` converted from ``out_dir/tokenizer.model``
    (transformers' LlamaTokenizer conversion, offline), only when the result encodes the probe
    texts exactly as SentencePiece does. Returns None on success, else why it was skipped."""
    try:
        from transformers import AutoTokenizer, LlamaTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a project dependency
        return f"transformers unavailable ({e})"
    want = [sp.encode(t) for t in _TOKENIZER_PROBES]
    for prefix_space in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok = LlamaTokenizer.from_pretrained(out_dir, legacy=False,
                                                     add_prefix_space=prefix_space,
                                                     local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means: no fast tokenizer
            return f"conversion failed ({type(e).__name__}: {e})"
        if [tok.encode(t, add_special_tokens=False) for t in _TOKENIZER_PROBES] != want:
            continue
        tok.save_pretrained(out_dir)
        again = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        if [again.encode(t, add_special_tokens=False) for t in _TOKENIZER_PROBES] == want:
            return None
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            p = os.path.join(out_dir, f)
            if os.path.exists(p):
                os.remove(p)
        return "the saved fast tokenizer did not reload with the same ids"
    return "the converted fast tokenizer encodes differently from SentencePiece"


def _add_transformers4_rope(path: str) -> None:
    """Add the transformers 4.x RoPE keys (``rope_theta``, ``rope_scaling``) beside the
    ``rope_parameters`` that transformers 5 writes, so 4.x readers (``requirements.txt`` admits
    >= 4.45) build the same RoPE instead of defaulting to theta 10000 without scaling."""
    from megatron_lite.model.hf_adapter import rope_for_transformers4

    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return  # written by transformers 4.x itself: already in its form
    cfg.update(rope_for_transformers4(rope))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def write_hf(ckpt: Checkpoint, out_dir: str, max_shard_bytes: int) -> list[str]:
    """Write ``ckpt`` as an HF ``LlamaForCausalLM`` folder into ``out_dir`` (an empty staging
    folder: see ``common.staged_folder``). Tensors are written in their dtype in ``ckpt.state``.

    Returns:
        Notes for the user (e.g. why no tokenizer.json was written).

    Raises:
        ConversionError: a tokenizer with more pieces than the model's vocabulary.
    """
    from safetensors.torch import save_file

    from megatron_lite.model.hf_adapter import config_to_hf, hf_tensor_shapes

    notes: list[str] = []
    mc = ckpt.model_config
    state = {k: ckpt.state[k].contiguous() for k in hf_tensor_shapes(mc)}  # tied: no lm_head
    hf_cfg = config_to_hf(mc)
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf_cfg.dtype = str(state_dtype(state)).replace("torch.", "")
    tok = None
    if ckpt.tokenizer_model:
        if not os.path.isfile(ckpt.tokenizer_model):
            raise ConversionError(f"tokenizer {ckpt.tokenizer_model} does not exist (--tokenizer-model)")
        tok = _tokenizer_ids(ckpt.tokenizer_model)
        if tok["vocab"] > mc.vocab_size:
            raise ConversionError(f"tokenizer {ckpt.tokenizer_model} has {tok['vocab']} pieces but the "
                                  f"model's vocabulary has {mc.vocab_size} rows: wrong tokenizer")
        hf_cfg.bos_token_id, hf_cfg.eos_token_id = tok["bos"], tok["eos"]
        hf_cfg.pad_token_id = tok["pad"] if tok["pad"] >= 0 else None
    hf_cfg.save_pretrained(out_dir)
    _add_transformers4_rope(os.path.join(out_dir, "config.json"))

    def save_shard(tensors: dict, path: str) -> None:
        # safetensors creates the file 0600 whatever the umask; an exported model is for others
        save_file(tensors, path, metadata={"format": "pt"})
        follow_umask(path)

    groups = _shards(state, max_shard_bytes)
    if len(groups) == 1:
        save_shard(state, os.path.join(out_dir, SINGLE))
    else:
        n = len(groups)
        weight_map = {}
        for i, keys in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_shard({k: state[k] for k in keys}, os.path.join(out_dir, fname))
            weight_map.update({k: fname for k in keys})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    if tok is not None:
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=tok["bos"], eos_token_id=tok["eos"],
                         pad_token_id=hf_cfg.pad_token_id).save_pretrained(out_dir)
        shutil.copyfile(ckpt.tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
        why = write_fast_tokenizer(out_dir, tok["sp"])
        if why:
            notes.append(f"tokenizer.model copied; no tokenizer.json written: {why}. Load it with "
                         "sentencepiece, or LlamaTokenizer.from_pretrained(DIR)")
    else:
        notes.append("no tokenizer: none recorded with the checkpoint and no --tokenizer-model given "
                     "(config.json/generation_config.json carry no bos/eos ids)")
    return notes
