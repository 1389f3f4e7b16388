"""Tokenizer wrappers with one interface: SentencePiece ``.model`` files and HuggingFace
``tokenizer.json`` files (loaded locally with the ``tokenizers`` library; the hub is never contacted).

Every wrapper exposes ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``tokenize_batch(texts) -> list[list[int]]``, ``vocab_size`` and the special ids ``bos``, ``eos``,
``eod`` (the end-of-document id appended between packed documents; equal to ``eos``), ``pad`` and
``unk``. Megatron-LM's names ``tokenize`` / ``detokenize`` are aliases.

Special ids come from the model file (SentencePiece's ``bos_id()`` etc., HuggingFace's added special
tokens), never from text: ``encode("</s>")`` returns the ids of the characters ``<``, ``/``, ``s``,
``>``, not the EOS id, so a document that quotes a special token cannot inject one. An id that the
model does not define is ``None`` (SentencePiece reports -1 internally; ``None`` is used instead so
that using a missing pad id as an index fails loudly rather than selecting the last row).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")


def _opt_id(i: int | None) -> int | None:
    return None if i is None or i < 0 else int(i)


class _TokenizerBase:
    """Shared Megatron-style aliases; subclasses implement encode/decode and the ids."""

    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None

    @property
    def eod(self) -> int | None:
        """End-of-document id appended by ``--append-eod`` (= ``eos``); None if the model has none."""
        return self.eos

    def tokenize(self, text: str) -> list[int]:
        """Alias of ``encode`` (Megatron-LM's name)."""
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Alias of ``decode`` (Megatron-LM's name)."""
        return self.decode(ids)

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts; same result as ``[encode(t) for t in texts]``."""
        return [self.encode(t) for t in texts]

    def describe(self) -> dict:
        """Identity of the tokenizer for stats files: type, model path, vocab size, special ids."""
        return {"tokenizer_type": type(self).__name__, "tokenizer_model": self.model_path,
                "vocab_size": self.vocab_size, "bos": self.bos, "eos": self.eos, "eod": self.eod,
                "pad": self.pad, "unk": self.unk}


class SentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece model (``.model`` file), e.g. one written by ``tools/train_tokenizer.py``.

    Args:
        model_path: path to the ``.model`` file.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: the file is not a SentencePiece model.
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"--tokenizer-model {model_path!r}: no such file")
        self.model_path = model_path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"--tokenizer-model {model_path!r}: not a SentencePiece model "
                             f"({e})") from None
        # No bos/eos are added by encode(); documents are delimited by appending eod explicitly.
        self.vocab_size = int(self._sp.vocab_size())
        self.bos = _opt_id(self._sp.bos_id())
        self.eos = _opt_id(self._sp.eos_id())
        self.pad = _opt_id(self._sp.pad_id())
        self.unk = _opt_id(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added; control symbols in the text stay plain text)."""
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode a list of texts in one C++ call (single thread, so worker processes do not
        oversubscribe the cores)."""
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (byte-fallback pieces are reassembled into UTF-8)."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id ``i`` (for inspection tools)."""
        return self._sp.id_to_piece(int(i))


# Names tried, in order, when no tokenizer_config.json says which token is which.
_HF_FALLBACK_NAMES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]"),
}


class HuggingFaceTokenizer(_TokenizerBase):
    """A HuggingFace fast tokenizer loaded from a local ``tokenizer.json`` (no hub access).

    Special ids: if a ``tokenizer_config.json`` (or ``special_tokens_map.json``) sits next to the
    tokenizer file, its ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` are used;
    otherwise the tokenizer's added *special* tokens are searched for the usual names
    (``<s>``/``</s>``, ``<|begin_of_text|>``/``<|end_of_text|>``, ``<|endoftext|>``, ``<pad>``,
    ``<unk>``). Added special tokens written inside a text are encoded as plain text
    (``encode_special_tokens``), like SentencePiece control symbols.

    Args:
        model_path: a ``tokenizer.json`` file or a directory containing one.

    Raises:
        FileNotFoundError: no ``tokenizer.json`` at ``model_path``.
        ValueError: the file cannot be parsed by ``tokenizers``.
    """

    def __init__(self, model_path: str):
        from tokenizers import Tokenizer

        path = os.path.join(model_path, "tokenizer.json") if os.path.isdir(model_path) \
            else model_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tokenizer-model {model_path!r}: no tokenizer.json there")
        self.model_path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(f"--tokenizer-model {path!r}: not a tokenizers JSON file ({e})") \
                from None
        self._tok.encode_special_tokens = True
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        special = self._special_tokens_from_config(os.path.dirname(os.path.abspath(path)))
        added = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for role, names in _HF_FALLBACK_NAMES.items():
            name = special.get(role)
            if name is None:
                name = next((n for n in names if n in added), None)
            setattr(self, role, _opt_id(self._tok.token_to_id(name)) if name else None)

    @staticmethod
    def _special_tokens_from_config(directory: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
            fpath = os.path.join(directory, fname)
            if not os.path.isfile(fpath):
                continue
            with open(fpath, encoding="utf-8") as f:
                cfg = json.load(f)
            for role in ("bos", "eos", "pad", "unk"):
                value = cfg.get(f"{role}_token")
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    found[role] = value
        return found

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no template (bos/eos) tokens are added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts in one call (the library may use its own thread pool)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included as their text."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> _TokenizerBase:
    """Construct the tokenizer named by ``--tokenizer-type`` from ``--tokenizer-model``.

    Args:
        tokenizer_type: one of :data:`TOKENIZER_TYPES`.
        tokenizer_model: SentencePiece ``.model`` file, or ``tokenizer.json`` (or its directory).

    Returns:
        A :class:`SentencePieceTokenizer` or :class:`HuggingFaceTokenizer`.

    Raises:
        ValueError: unknown ``tokenizer_type`` or an unreadable model.
        FileNotFoundError: the model file does not exist.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                     f"{', '.join(TOKENIZER_TYPES)}")
