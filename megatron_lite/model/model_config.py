"""``ModelConfig``: the LLaMA architecture section of the run config (flags use Megatron-LM names).

Presets and explicit values: architecture fields default to ``None`` meaning "not given".
:meth:`ModelConfig.resolve` (run by :meth:`validate`, so it also works when a parser sets fields
one by one after construction) fills every field that is still ``None`` from the ``--model-size``
preset, then from the generic defaults below (``__post_init__`` applies the preset only). A value given on
the command line or in YAML is never ``None``, so it always wins over the preset:
``--model-size 7b --num-layers 4`` is the 7B width with 4 layers. To get MHA on a GQA preset pass
``--num-query-groups`` equal to ``--num-attention-heads``.

Generic defaults when no preset names a field: ``num_query_groups`` = heads (MHA),
``ffn_hidden_size`` = LLaMA's SwiGLU size 256 * ceil((8h/3) / 256) (Touvron et al. 2023, sec. 2.2 and
Meta's reference ``multiple_of=256``), ``seq_length`` = 4096, ``max_position_embeddings`` =
``seq_length``; ``kv_channels`` (head dim) = hidden / heads. ``hidden_size``, ``num_layers`` and
``num_attention_heads`` have no default: give ``--model-size`` or all three.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from megatron_lite.config_field import arg
from megatron_lite.layers.lm_head_loss import CROSS_ENTROPY_IMPLS, DEFAULT_CHUNK_TOKENS
from megatron_lite.model.presets import MODEL_PRESETS, model_preset

__all__ = ["ModelConfig", "model_preset", "padded_vocab_size", "MODEL_PRESETS"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Smallest multiple of ``divisible_by * tp`` that is >= ``vocab_size`` (Megatron-LM
    ``_vocab_size_with_padding``): every TP rank gets an equal, ``divisible_by``-aligned vocab slice.

    Raises:
        ValueError: a non-positive argument.
    """
    if vocab_size < 1 or divisible_by < 1 or tp < 1:
        raise ValueError(f"padded_vocab_size needs positive vocab ({vocab_size}), "
                         f"--make-vocab-size-divisible-by ({divisible_by}) and TP ({tp})")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _llama_ffn(hidden: int) -> int:
    return 256 * math.ceil(int(8 * hidden / 3) / 256)


@dataclass
class ModelConfig:
    """LLaMA-style decoder architecture. See the module docstring for preset resolution."""

    model_size: str | None = arg(None, "architecture preset; explicit flags override its fields",
                                 choices=list(MODEL_PRESETS))
    hidden_size: int | None = arg(None, "model width H")
    num_layers: int | None = arg(None, "number of transformer blocks L")
    num_attention_heads: int | None = arg(None, "query heads")
    num_query_groups: int | None = arg(None, "key/value heads for GQA (None = MHA: one per query head)")
    ffn_hidden_size: int | None = arg(None, "SwiGLU inner width H' (None: preset or 256*ceil(8H/3/256))")
    kv_channels: int | None = arg(None, "head dim (None: hidden_size / num_attention_heads)")
    seq_length: int | None = arg(None, "training sequence length in tokens (None: preset or 4096)")
    max_position_embeddings: int | None = arg(None, "longest position the model supports in tokens "
                                              "(None: seq_length)")
    vocab_size: int | None = arg(None, "true vocabulary size; None until the tokenizer is known")
    make_vocab_size_divisible_by: int = arg(128, "pad the vocab to a multiple of this times TP")
    norm_epsilon: float = arg(1e-5, "RMSNorm epsilon")
    init_method_std: float = arg(0.02, "std of the normal weight init; output projections use "
                                 "std/sqrt(2*num_layers)")
    tie_word_embeddings: bool = arg(False, "share the input embedding with the LM head",
                                    flags=["--tie-word-embeddings"])
    params_dtype: str = arg("float32", "parameter dtype at construction (DeepSpeed may cast later)",
                            choices=list(_DTYPES))
    recompute_granularity: str | None = arg(None, "activation checkpointing: full (whole blocks) or "
                                            "selective (core attention only)", choices=["full", "selective"])
    recompute_num_layers: int | None = arg(None, "with full recompute: checkpoint the first N blocks "
                                           "(None: all)")
    rotary_base: float = arg(10000.0, "RoPE base theta")
    rope_scaling_type: str = arg("none", "RoPE context-extension method",
                                 choices=["none", "linear", "ntk", "dynamic", "yarn", "llama3"])
    rope_scaling_factor: float = arg(1.0, "context extension factor s")
    rope_original_max_position_embeddings: int | None = arg(None, "pre-extension context in tokens "
                                                            "(None: max_position_embeddings)")
    yarn_beta_fast: float = arg(32.0, "YaRN beta_fast (rotations)")
    yarn_beta_slow: float = arg(1.0, "YaRN beta_slow (rotations)")
    yarn_attention_factor: float | None = arg(None, "YaRN attention factor (None: from --yarn-mscale/"
                                              "--yarn-mscale-all-dim, else 0.1 ln s + 1)")
    yarn_mscale: float | None = arg(None, "YaRN mscale (HF 'mscale'; used with --yarn-mscale-all-dim: "
                                    "attention factor (0.1 m ln s + 1) / (0.1 m_all ln s + 1))")
    yarn_mscale_all_dim: float | None = arg(None, "YaRN mscale_all_dim (HF 'mscale_all_dim')")
    yarn_truncate: bool = arg(True, "YaRN: floor/ceil the correction range (HF 'truncate')")
    llama3_low_freq_factor: float = arg(1.0, "Llama-3 RoPE low_freq_factor")
    llama3_high_freq_factor: float = arg(4.0, "Llama-3 RoPE high_freq_factor")
    attention_backend: str = arg("auto", "attention kernel", choices=["auto", "flash", "sdpa", "flex", "eager"])
    no_fused_rope: bool = arg(False, "use the pure-PyTorch RoPE instead of the C++ op",
                              flags=["--no-fused-rope"])
    attention_dropout: float = arg(0.0, "dropout on attention probabilities (must be 0: the attention "
                                   "kernels take no dropout)")
    hidden_dropout: float = arg(0.0, "dropout on attention/MLP outputs before the residual add")
    # Not a model flag: copied from the parallel section's --sequence-parallel by config/derive.py
    # (the layers read it from here, like every other model setting). No effect at TP = 1.
    sequence_parallel: bool = arg(False, "split norms/residual/dropout activations along the sequence "
                                  "over TP (from --sequence-parallel)", cli=False)
    cross_entropy_impl: str = arg("fused", "LM head + loss: fused (one head GEMM, fp32 logits [b*s, V/TP] "
                                  "then the vocab-parallel cross entropy) or chunked (--cross-entropy-"
                                  "chunk-size tokens at a time; no full-size logits)",
                                  choices=list(CROSS_ENTROPY_IMPLS))
    cross_entropy_chunk_size: int = arg(DEFAULT_CHUNK_TOKENS, "tokens per chunk of --cross-entropy-impl "
                                        "chunked (largest logits buffer: this x V/TP fp32)")

    def __post_init__(self):
        self._tp = 1
        # Only the preset here: generic defaults wait for validate(), because a parser may still
        # set model_size (or YAML keys) after construction and must not find them pre-filled.
        self._apply_preset()

    def _apply_preset(self) -> None:
        if self.model_size is not None:
            for key, value in model_preset(self.model_size).items():
                if getattr(self, key) is None and value is not None:
                    setattr(self, key, value)

    # ------------------------------------------------------------------ derived values
    def resolve(self) -> "ModelConfig":
        """Fill ``None`` fields from the preset, then from generic defaults (idempotent).

        Raises:
            ValueError: unknown ``--model-size``.
        """
        self._apply_preset()
        if self.num_query_groups is None and self.num_attention_heads is not None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None and self.hidden_size is not None:
            self.ffn_hidden_size = _llama_ffn(self.hidden_size)
        if self.seq_length is None:
            self.seq_length = 4096
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        return self

    @property
    def head_dim(self) -> int | None:
        """Per-head channels d: ``kv_channels`` or hidden_size / num_attention_heads."""
        if self.kv_channels:
            return self.kv_channels
        if self.hidden_size and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return None

    @property
    def torch_dtype(self) -> torch.dtype:
        """``params_dtype`` as a torch dtype."""
        return _DTYPES[self.params_dtype]

    def padded_vocab_size(self, tp: int | None = None) -> int | None:
        """Padded vocabulary ``V_pad`` for TP degree ``tp`` (default: the TP given to :meth:`validate`,
        else 1); None while ``vocab_size`` is unknown."""
        if self.vocab_size is None:
            return None
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp or self._tp)

    # ------------------------------------------------------------------ checks
    def validate(self, tp: int = 1) -> "ModelConfig":
        """Resolve presets and check the architecture against TP degree ``tp``. Needs no process group.

        Raises:
            ValueError: naming the offending flag(s) and the fix, for: missing width/depth/heads,
                hidden % heads (without --kv-channels), heads % TP, heads % groups, neither of
                groups and TP dividing the other (g < TP is allowed when TP % g == 0: each KV group
                is replicated on TP/g ranks), ffn % TP, odd head dim,
                seq_length > max_position_embeddings without RoPE scaling, ntk/dynamic RoPE
                scaling with head dim 2, bad recompute settings,
                attention dropout, non-positive sizes, --cross-entropy-chunk-size < 1.
        """
        self.resolve()
        errors = []
        missing = [f"--{n.replace('_', '-')}" for n in ("hidden_size", "num_layers", "num_attention_heads")
                   if getattr(self, n) is None]
        if missing:
            raise ValueError(f"model architecture incomplete: set --model-size ({', '.join(MODEL_PRESETS)}) "
                             f"or {', '.join(missing)}")
        if tp < 1:
            raise ValueError(f"--tensor-model-parallel-size must be >= 1 (got {tp})")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "seq_length", "max_position_embeddings", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if errors:
            raise ValueError("; ".join(errors))
        h, nh, g, ffn = self.hidden_size, self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size
        if self.kv_channels is None and h % nh:
            errors.append(f"--hidden-size {h} is not divisible by --num-attention-heads {nh}; pick a head "
                          f"count dividing {h} or set --kv-channels")
        if self.head_dim % 2:
            errors.append(f"head dim {self.head_dim} is odd; RoPE needs an even --kv-channels "
                          "(or hidden_size / num_attention_heads)")
        if nh % tp:
            errors.append(f"--num-attention-heads {nh} is not divisible by --tensor-model-parallel-size {tp}; "
                          f"use TP in {[t for t in range(1, nh + 1) if nh % t == 0]}")
        if nh % g:
            errors.append(f"--num-attention-heads {nh} is not divisible by --num-query-groups {g}; "
                          f"use a group count dividing {nh}")
        if g % tp and tp % g:
            # g >= TP: each rank owns g/TP whole groups; g < TP: each group is replicated on TP/g
            # ranks (Megatron-core's layout). Anything else would split a group's query heads
            # unevenly between ranks holding different KV heads.
            ok = [t for t in range(1, nh + 1) if nh % t == 0 and (g % t == 0 or t % g == 0)]
            errors.append(f"--num-query-groups {g} and --tensor-model-parallel-size (--tp) {tp}: one must "
                          f"divide the other (TP ranks own whole KV groups, or TP/g ranks share one); "
                          f"use TP in {ok}")
        if ffn % tp:
            errors.append(f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp}; "
                          f"round it to a multiple of {tp}")
        if self.seq_length > self.max_position_embeddings and self.rope_scaling_type == "none":
            errors.append(f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                          f"{self.max_position_embeddings}; raise --max-position-embeddings or choose a "
                          "--rope-scaling-type (linear, ntk, dynamic, yarn, llama3)")
        if self.rope_scaling_type in ("ntk", "dynamic") and self.head_dim <= 2:
            errors.append(f"--rope-scaling-type {self.rope_scaling_type} needs a head dim of at least 4 "
                          f"(got {self.head_dim}: the NTK base change base * s^(d/(d-2)) is undefined "
                          "at d = 2); raise --kv-channels or use linear, yarn or llama3 scaling")
        if self.rope_scaling_factor < 1.0:
            errors.append(f"--rope-scaling-factor must be >= 1 (got {self.rope_scaling_factor})")
        if self.rope_scaling_type == "llama3" and \
                not self.llama3_high_freq_factor > self.llama3_low_freq_factor:
            errors.append(f"--llama3-high-freq-factor ({self.llama3_high_freq_factor}) must exceed "
                          f"--llama3-low-freq-factor ({self.llama3_low_freq_factor})")
        if self.attention_dropout != 0.0:
            errors.append(f"--attention-dropout {self.attention_dropout} is not supported (the attention "
                          "kernels take no dropout); set it to 0")
        if not 0.0 <= self.hidden_dropout < 1.0:
            errors.append(f"--hidden-dropout must be in [0, 1) (got {self.hidden_dropout})")
        if self.recompute_num_layers is not None:
            if self.recompute_granularity != "full":
                errors.append("--recompute-num-layers needs --recompute-granularity full")
            elif not 1 <= self.recompute_num_layers <= self.num_layers:
                errors.append(f"--recompute-num-layers {self.recompute_num_layers} must be in "
                              f"[1, --num-layers {self.num_layers}]")
        if self.cross_entropy_chunk_size < 1:
            errors.append(f"--cross-entropy-chunk-size must be >= 1 (got {self.cross_entropy_chunk_size})")
        if self.norm_epsilon <= 0 or self.init_method_std <= 0:
            errors.append("--norm-epsilon and --init-method-std must be > 0")
        if self.vocab_size is not None and self.vocab_size < 1:
            errors.append(f"--vocab-size must be >= 1 (got {self.vocab_size})")
        if errors:
            raise ValueError("; ".join(errors))
        self._tp = tp
        return self

    def to_dict(self) -> dict:
        """Plain dict of the fields (for checkpoints and the HF adapter)."""
        return dataclasses.asdict(self)
