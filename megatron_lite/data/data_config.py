"""Data settings (``--data-path``, ``--split``, tokenizer, packing flags) as one config dataclass.

Field names are Megatron-LM flag names with underscores. ``seq_length`` belongs to ``ModelConfig``;
the dataset builders take it as a parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_lite.config_field import arg


@dataclass
class DataConfig:
    """Where the token files are and how samples are cut from them."""

    data_path: Optional[List[str]] = arg(
        None, "Megatron syntax: 'PREFIX' or 'W1 PREFIX1 W2 PREFIX2 ...' (weights optional, "
        "normalised); split into train/valid/test by --split", nargs="*")
    train_data_path: Optional[List[str]] = arg(
        None, "Train-only data (same syntax as --data-path); overrides --split for train", nargs="*")
    valid_data_path: Optional[List[str]] = arg(
        None, "Validation-only data (same syntax as --data-path)", nargs="*")
    test_data_path: Optional[List[str]] = arg(None, "Test-only data (same syntax as --data-path)", nargs="*")
    split: str = arg("969,30,1", "Train,valid,test proportions of each --data-path corpus, by "
                     "document ranges (e.g. '969,30,1' or '98,2,0')")
    tokenizer_type: Optional[str] = arg(
        None, "Tokenizer class", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    tokenizer_model: Optional[str] = arg(None, "SentencePiece .model file or tokenizer.json path")
    reset_position_ids: bool = arg(False, "Restart position ids at 0 after every EOD token")
    reset_attention_mask: bool = arg(
        False, "Mask attention across documents: cu_seqlens gets a boundary after every EOD token")
    eod_mask_loss: bool = arg(False, "Zero the loss mask where the input token is EOD")
    data_temperature: float = arg(
        1.0, "Blend temperature T, used when --data-path lists several prefixes without weights: "
        "w_i proportional to n_i^(1/T), n_i = tokens of source i in the split (1 = by size, "
        "large T = uniform); must stay 1.0 when explicit weights are given")
    data_stages: Optional[str] = arg(
        None, "YAML file: list of {until_tokens, weights} stages (train split only); sample i belongs to "
        "the first stage with i*seq_length < until_tokens, the last stage continues; an optional "
        "'bounds: {NAME: [LO, HI]}' per stage sets that stage's share bounds (see --data-share-bounds)")
    no_shuffle: bool = arg(False, "Keep document and sample order as on disk (debugging)")
    data_cache_path: Optional[str] = arg(
        None, "Directory for cached index arrays (default: <prefix dir>/index_cache)")
    num_workers: int = arg(2, "DataLoader worker processes")
    mmap_bin_files: bool = arg(True, "Memory-map .bin files (--no-mmap-bin-files reads them into RAM)")
    data_names: Optional[List[str]] = arg(
        None, "Labels of the validation corpora, one per prefix of the validation blend "
        "(--valid-data-path, else --data-path), in order: per-corpus validation logs val_loss/<label> "
        "(default: each prefix's basename)", nargs="+")
    # Packing (issue 18 item 1); see megatron_lite/data/gpt_dataset.py and helpers.build_packed_idx_numpy.
    packing: str = arg(
        "concat", "How documents become samples of seq_length + 1 tokens: concat = Megatron's "
        "concatenate-and-split (documents cut at sample boundaries); best-fit = documents of at most "
        "seq_length + 1 tokens are never split, longer ones are cut into seq_length + 1 pieces, and "
        "pieces are packed by best-fit decreasing over --packing-window documents (Ding et al. 2024), "
        "the rest of a sample is padding (loss mask 0); none = one document (or piece) per sample, padded",
        choices=["concat", "best-fit", "none"])
    packing_window: int = arg(
        2000, "Documents per best-fit window (--packing best-fit): larger = less padding, more "
        "reordering of documents within the epoch")
    packing_fill: bool = arg(
        False, "With --packing best-fit: fill each window's free sample space with fragments (tail "
        "pieces moved from the least-filled samples to the fullest), leaving at most one padded "
        "sample per window; only documents in the emptied samples are split")
    # Mixing controls (issue 18 item 2); see megatron_lite/data/mixing.py and data/blended.py.
    data_max_epochs: Optional[int] = arg(
        None, "Read no train corpus more than N epochs over the run: when a corpus has given N epochs "
        "of samples its weight is redistributed over the others in proportion to their weights")
    data_share_bounds: Optional[List[str]] = arg(
        None, "Share bounds of train corpora, 'NAME:LO:HI ...' (NAME as in per-corpus validation: "
        "--data-names or the prefix's basename; LO or HI may be empty): every stage's weights, and "
        "every online update, are projected onto {LO <= w <= HI, sum w = 1}; a --data-stages "
        "entry's 'bounds: {NAME: [LO, HI]}' replaces them for that stage", nargs="+")
    mixing_update: str = arg(
        "static", "static = the weights of --data-path/--data-temperature/--data-stages; online = every "
        "--mixing-update-interval steps move them toward the corpora whose per-corpus validation "
        "loss is furthest above the reference (DoReMi's exponentiated-gradient step)",
        choices=["static", "online"])
    mixing_update_interval: Optional[int] = arg(
        None, "Steps between online weight updates (a multiple of --eval-interval; default "
        "--eval-interval); new weights take effect a fixed look-ahead of samples later")
    mixing_eta: float = arg(1.0, "Step size of the online update: w_i <- w_i exp(eta * excess_i)")
    mixing_smoothing: float = arg(
        1e-3, "Online update's smoothing with the uniform mix: w <- (1 - c) w + c / n (DoReMi's c)")
    mixing_reference: Optional[str] = arg(
        None, "Reference per-corpus losses for the online update: JSON {name: loss}, or a reference "
        "run's metrics.jsonl (val_loss/<name> of its latest eval at or before the step); default: "
        "each corpus' own running minimum of earlier validation losses")

    def __post_init__(self):
        split_weights(self.split)
        if self.data_temperature <= 0:
            raise ValueError(f"--data-temperature must be > 0, got {self.data_temperature}")
        if self.packing not in ("concat", "best-fit", "none"):
            raise ValueError(f"--packing must be concat, best-fit or none, got {self.packing!r}")
        if self.packing_window < 1:
            raise ValueError(f"--packing-window must be >= 1 documents, got {self.packing_window}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.data_names is not None:
            corpus_names(parse_data_path(self.valid_data_path or self.data_path)[0], self.data_names)
        if self.data_max_epochs is not None and self.data_max_epochs < 1:
            raise ValueError(f"--data-max-epochs must be >= 1, got {self.data_max_epochs}")
        if self.mixing_update not in ("static", "online"):
            raise ValueError(f"--mixing-update must be static or online, got {self.mixing_update!r}")
        if self.mixing_update_interval is not None and self.mixing_update_interval < 1:
            raise ValueError(f"--mixing-update-interval must be >= 1 steps, got {self.mixing_update_interval}")
        if not self.mixing_eta > 0:
            raise ValueError(f"--mixing-eta must be > 0, got {self.mixing_eta}")
        if not 0 <= self.mixing_smoothing <= 1:
            raise ValueError(f"--mixing-smoothing must be in [0, 1], got {self.mixing_smoothing}")


def corpus_names(prefixes: List[str], labels: Optional[List[str]] = None) -> List[str]:
    """Names of the corpora ``prefixes`` in per-corpus validation records (``val_loss/<name>``).

    ``labels`` (``--data-names``) are used as given; without them each prefix is named by its
    basename, or by as many trailing path parts as make the names distinct
    (``a/text_document``, ``b/text_document``).

    Raises:
        ValueError: ``labels`` not one per prefix, repeated, empty, or holding a '/' or a space.
    """
    if labels is not None:
        if len(labels) != len(prefixes):
            raise ValueError(f"--data-names gives {len(labels)} labels for {len(prefixes)} validation "
                             f"prefixes {list(prefixes)}: give one label per prefix")
        bad = [x for x in labels if not x or "/" in x or any(c.isspace() for c in x)]
        if bad or len(set(labels)) != len(labels):
            raise ValueError(f"--data-names {list(labels)}: labels must be distinct, non-empty, "
                             "without '/' or spaces")
        return list(labels)
    parts = [os.path.normpath(p).split(os.sep) for p in prefixes]
    for k in range(1, max((len(x) for x in parts), default=1) + 1):
        names = ["/".join(x[-k:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{n}" for i, n in enumerate(names)]  # the same prefix twice: numbered


def train_corpus_names(cfg: "DataConfig") -> List[str]:
    """Names of the train blend's corpora for --data-share-bounds, stage bounds, logs and online
    mixing: the --data-names labels when they give one per train prefix (they label the validation
    prefixes, which are the same corpora under --data-path), else :func:`corpus_names`."""
    prefixes = parse_data_path(cfg.train_data_path or cfg.data_path)[0]
    labels = cfg.data_names if cfg.data_names is not None and len(cfg.data_names) == len(prefixes) else None
    return corpus_names(prefixes, labels)


def split_weights(split: str) -> Tuple[float, float, float]:
    """Parse ``--split`` ('969,30,1', '98/2/0', or fewer parts padded with 0) into fractions.

    Raises:
        ValueError: not numbers, negative, more than three parts, or all zero.
    """
    parts = split.replace("/", ",").split(",")
    try:
        vals = [float(p) for p in parts if p.strip() != ""]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected comma-separated numbers like '969,30,1'") from None
    if not 1 <= len(vals) <= 3 or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"--split {split!r}: give 1-3 non-negative numbers with a positive sum")
    vals += [0.0] * (3 - len(vals))
    s = sum(vals)
    return tuple(v / s for v in vals)  # type: ignore[return-value]


def parse_data_path(data_path: Optional[List[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron ``--data-path`` syntax to ``(prefixes, weights or None)``.

    ``['a']`` -> (['a'], None); ``['0.7', 'a', '0.3', 'b']`` -> (['a', 'b'], [0.7, 0.3]);
    ``['a', 'b']`` -> (['a', 'b'], None). A single string is split on whitespace.

    Raises:
        ValueError: weights mixed with unweighted prefixes, or a non-positive weight.
    """
    if data_path is None:
        return [], None
    if isinstance(data_path, str):
        data_path = data_path.split()
    items = list(data_path)

    def is_num(x):
        try:
            float(x)
            return True
        except ValueError:
            return False

    if not items:
        return [], None
    if not is_num(items[0]):
        if any(is_num(x) for x in items):
            raise ValueError(f"--data-path {' '.join(items)}: mix of weights and prefixes; use "
                             "'W1 PREFIX1 W2 PREFIX2 ...' or just prefixes")
        return items, None
    if len(items) % 2:
        raise ValueError(f"--data-path {' '.join(items)}: odd number of entries; expected weight/prefix pairs")
    weights = [float(x) for x in items[0::2]]
    prefixes = items[1::2]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path weights {weights} must be >= 0 with a positive sum")
    return prefixes, weights
