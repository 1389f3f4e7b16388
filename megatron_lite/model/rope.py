"""Rotary position embeddings (RoPE) and their long-context scaling variants.

One function per scaling type computes the inverse frequencies ``inv_freq [d/2]`` (fp32) and the
attention factor (a multiplier on cos/sin, only YaRN uses it). Each is checked in
``tests/test_rope.py`` to equal HuggingFace ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``
for the same parameters.

Config fields read (duck-typed, see ``megatron_lite.model.model_config.ModelConfig``): ``hidden_size``,
``num_attention_heads``, ``kv_channels``, ``max_position_embeddings``, ``rotary_base``,
``rope_scaling_type``, ``rope_scaling_factor``, ``rope_original_max_position_embeddings``,
``yarn_beta_fast``, ``yarn_beta_slow``, ``yarn_attention_factor``, ``yarn_mscale``,
``yarn_mscale_all_dim``, ``yarn_truncate``,
``llama3_low_freq_factor``, ``llama3_high_freq_factor``, ``no_fused_rope``.
"""

from __future__ import annotations

import math

import torch

from megatron_lite.ops.rope import fused_rope, rope_reference

ROPE_SCALING_TYPES = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


def _head_dim(config) -> int:
    kv = getattr(config, "kv_channels", None)
    if kv:
        return int(kv)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"--hidden-size {config.hidden_size} is not divisible by --num-attention-heads "
                         f"{config.num_attention_heads}; set --kv-channels or fix the head count")
    return config.hidden_size // config.num_attention_heads


def _original_max_positions(config) -> int:
    orig = getattr(config, "rope_original_max_position_embeddings", None)
    return int(orig) if orig else int(config.max_position_embeddings)


def _factor(config) -> float:
    factor = float(getattr(config, "rope_scaling_factor", 1.0) or 1.0)
    if factor < 1.0:
        raise ValueError(f"--rope-scaling-factor must be >= 1 (got {factor}); it is the context extension ratio")
    return factor


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    """Plain RoPE frequencies theta_i = base^(-2i/d), i = 0..d/2-1 (Su et al. 2021, RoFormer eq. 15)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dim (--kv-channels), got {dim}")
    # int64 arange then fp32 division matches HF bit for bit (exponent computed in fp32).
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _check_ntk_dim(dim: int, kind: str) -> None:
    """NTK base change needs d > 2: the exponent d / (d - 2) is undefined at d = 2, where the only
    frequency theta_0 = base^0 = 1 is both the lowest (to interpolate by s) and the highest (to
    keep), so the method has no meaning there (HF raises ZeroDivisionError)."""
    if dim <= 2:
        raise ValueError(f"--rope-scaling-type {kind} needs a head dim of at least 4 (got {dim}: "
                         f"base * s^(d/(d-2)) is undefined at d = 2); raise --kv-channels or use "
                         f"--rope-scaling-type linear/yarn/llama3")


def inv_freq_none(base: float, dim: int) -> tuple[torch.Tensor, float]:
    """Unscaled RoPE (Su et al. 2021, RoFormer). Returns (inv_freq [dim/2] fp32, 1.0)."""
    return _base_inv_freq(base, dim), 1.0


def inv_freq_linear(base: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    """Position Interpolation (Chen et al. 2023, "Extending Context Window of LLMs via Positional
    Interpolation", eq. 4): positions m -> m / s, equivalently theta_i -> theta_i / s."""
    return _base_inv_freq(base, dim) / factor, 1.0


def inv_freq_ntk(base: float, dim: int, factor: float) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling (bloc97, reddit r/LocalLLaMA 2023; the base change Code Llama made
    by hand, Roziere et al. 2023 sec. 2.2): base' = base * s^(d / (d - 2)), so the lowest frequency
    is interpolated by s while the highest is unchanged.

    Raises:
        ValueError: head dim < 4 (see :func:`_check_ntk_dim`).
    """
    _check_ntk_dim(dim, "ntk")
    return _base_inv_freq(base * factor ** (dim / (dim - 2)), dim), 1.0


def inv_freq_dynamic(base: float, dim: int, factor: float, original_max: int,
                     seq_len: int | None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK scaling (emozilla / bloc97 2023; formula as in HF ``_compute_dynamic_ntk_parameters``):
    base' = base * (s * L / L_orig - (s - 1))^(d / (d - 2)) with L = max(seq_len, L_orig) in tokens,
    so sequences within the original length get the unscaled frequencies.

    Raises:
        ValueError: head dim < 4 (see :func:`_check_ntk_dim`).
    """
    _check_ntk_dim(dim, "dynamic")
    seq_len = original_max if seq_len is None else max(int(seq_len), original_max)
    new_base = base * ((factor * seq_len / original_max) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(new_base, dim), 1.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22), with the
    DeepSeek-V2 multiplier ``mscale`` on the log term: 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None = None,
                          mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """The factor on cos/sin, as HF ``_compute_yarn_parameters`` resolves it: an explicit
    ``attention_factor``; else, when ``mscale`` and ``mscale_all_dim`` are both set and non-zero,
    ``yarn_get_mscale(s, mscale) / yarn_get_mscale(s, mscale_all_dim)`` (DeepSeek-V2/V3 configs,
    e.g. 1.0 when they are equal); else eq. 22, ``0.1 ln s + 1``."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return yarn_get_mscale(factor)


def inv_freq_yarn(base: float, dim: int, factor: float, original_max: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, attention_factor: float | None = None,
                  truncate: bool = True, mscale: float | None = None,
                  mscale_all_dim: float | None = None) -> tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts" frequencies (Peng et al. 2023, "YaRN: Efficient Context Window Extension
    of LLMs", eqs. 17-20) and attention factor (eq. 22, or :func:`yarn_attention_factor` with
    ``mscale``/``mscale_all_dim``).

    Dimension i has r(i) = L_orig / lambda_i full rotations over the original context (eq. 17). Dims
    with r > beta_fast keep theta_i (extrapolate), r < beta_slow are interpolated theta_i / s, and a
    linear ramp gamma blends in between (eqs. 18-20). The ramp bounds are the (fractional) dims where
    r = beta_fast / beta_slow, floored / ceiled when ``truncate`` (HF's default and the paper's code).
    """
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        # Solve L_orig / (2 pi base^(2i/d)) = num_rotations for the dim index 2i (eq. 17 inverted).
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp, as the reference code does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq, yarn_attention_factor(factor, attention_factor, mscale, mscale_all_dim)


def inv_freq_llama3(base: float, dim: int, factor: float, original_max: int, low_freq_factor: float,
                    high_freq_factor: float) -> tuple[torch.Tensor, float]:
    """Llama 3.1 frequency scaling (Meta, ``apply_scaling`` in llama-models ``reference_impl``;
    Dubey et al. 2024 sec. 3.3): wavelengths above L_orig / low_freq_factor are divided by s, below
    L_orig / high_freq_factor kept, and smoothly interpolated in between."""
    if high_freq_factor <= low_freq_factor:
        raise ValueError(f"--llama3-high-freq-factor ({high_freq_factor}) must exceed --llama3-low-freq-factor "
                         f"({low_freq_factor})")
    inv_freq = _base_inv_freq(base, dim)
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def rope_inv_freq(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor for ``config.rope_scaling_type``.

    Args:
        config: a ModelConfig-like object (fields listed in the module docstring).
        seq_len: current sequence length in tokens; only ``dynamic`` uses it (None -> original length).

    Returns:
        ``(inv_freq [head_dim/2] fp32 on CPU, attention_factor)``; cos/sin are multiplied by the factor.

    Raises:
        ValueError: unknown ``--rope-scaling-type`` or invalid factor / head dim.
    """
    kind = getattr(config, "rope_scaling_type", "none") or "none"
    base = float(config.rotary_base)
    dim = _head_dim(config)
    if kind == "none":
        return inv_freq_none(base, dim)
    factor = _factor(config)
    if kind == "linear":
        return inv_freq_linear(base, dim, factor)
    if kind == "ntk":
        return inv_freq_ntk(base, dim, factor)
    original_max = _original_max_positions(config)
    if kind == "dynamic":
        return inv_freq_dynamic(base, dim, factor, original_max, seq_len)
    if kind == "yarn":
        return inv_freq_yarn(base, dim, factor, original_max,
                             beta_fast=float(getattr(config, "yarn_beta_fast", 32.0) or 32.0),
                             beta_slow=float(getattr(config, "yarn_beta_slow", 1.0) or 1.0),
                             attention_factor=getattr(config, "yarn_attention_factor", None),
                             truncate=bool(getattr(config, "yarn_truncate", True)),
                             mscale=getattr(config, "yarn_mscale", None),
                             mscale_all_dim=getattr(config, "yarn_mscale_all_dim", None))
    if kind == "llama3":
        return inv_freq_llama3(base, dim, factor, original_max,
                               float(getattr(config, "llama3_low_freq_factor", 1.0)),
                               float(getattr(config, "llama3_high_freq_factor", 4.0)))
    raise ValueError(f"unknown --rope-scaling-type {kind!r}; choose one of {', '.join(ROPE_SCALING_TYPES)}")


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for the batch's ``position_ids`` (reset at EOD in packed samples).

    ``forward(position_ids [b, s] int64) -> (cos, sin)``, each ``[b, s, head_dim]`` fp32 whatever the
    model dtype (bf16 has 8 mantissa bits, so bf16 angles could not tell position 256 from 257), with
    the attention factor applied. Layout is rotate-half: the d/2 frequencies repeated twice (HF Llama).

    ``dynamic`` scaling follows HF ``dynamic_rope_update``: when ``max(position_ids) + 1`` exceeds the
    longest length seen so far, inv_freq is recomputed for that length; when it drops back below the
    original length, the original frequencies are restored.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.scaling_type = getattr(config, "rope_scaling_type", "none") or "none"
        inv_freq, self.attention_factor = rope_inv_freq(config)
        # Plain fp32 attributes, deliberately not buffers: ``model.to(torch.bfloat16)`` casts floating
        # buffers and would round the frequencies (HF's inv_freq buffer suffers exactly that).
        # They are derived from the config, so they need no checkpointing either.
        self._inv_freq = inv_freq
        self._original_inv_freq = inv_freq.clone()
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.original_max_seq_len = _original_max_positions(config)
        self.max_seq_len_cached = self.original_max_seq_len

    @property
    def inv_freq(self) -> torch.Tensor:
        """Current inverse frequencies [head_dim/2], fp32 on CPU."""
        return self._inv_freq

    def _set_inv_freq(self, inv_freq: torch.Tensor) -> None:
        self._inv_freq = inv_freq
        self._on_device = {}

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        t = self._on_device.get(device)
        if t is None:  # copied once per device, not per step
            t = self._on_device[device] = self._inv_freq.to(device)
        return t

    def _dynamic_update(self, position_ids: torch.Tensor) -> None:
        seq_len = int(position_ids.max()) + 1
        if seq_len > self.max_seq_len_cached:  # grew past anything seen: rescale for this length
            inv_freq, self.attention_factor = rope_inv_freq(self.config, seq_len=seq_len)
            self._set_inv_freq(inv_freq)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len < self.max_seq_len_cached:  # back within original: reset
            self._set_inv_freq(self._original_inv_freq.clone())
            self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: position_ids [b, s] integer. Returns (cos, sin), each [b, s, head_dim] fp32."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
        if self.scaling_type == "dynamic":
            self._dynamic_update(position_ids)
        freqs = position_ids[..., None].float() * self._inv_freq_on(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         fused: bool = False, impl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions (rotate-half convention, same as HF Llama).

    Args:
        q: [b, s, hq, d]; k: [b, s, hk, d] (any float dtype).
        cos, sin: [b, s, d] fp32 from :class:`RotaryEmbedding`.
        fused: use the C++/CUDA custom op ``megatron_lite.ops.fused_rope`` (falls back to the
            reference with one warning if the extension is not built); False (``--no-fused-rope``)
            runs the PyTorch reference ``megatron_lite.ops.rope.rope_reference``.
        impl: a library's ``(q, k, cos, sin) -> (q, k)`` (``--fused-kernels``,
            ``megatron_lite.ops.kernels.FusedKernels.rope``), used instead of both when given.

    Returns:
        (q, k) rotated, in their input dtypes; the rotation itself is computed in fp32.
    """
    if q.shape[-1] != cos.shape[-1] or cos.shape[:2] != q.shape[:2]:
        raise ValueError(f"RoPE shape mismatch: q {tuple(q.shape)} vs cos {tuple(cos.shape)} "
                         "(expected q [b, s, h, d], cos [b, s, d])")
    if impl is not None:
        return impl(q, k, cos, sin)
    rope = fused_rope if fused else rope_reference  # the reference lives beside the op, in ops/rope.py
    return rope(q, cos, sin), rope(k, cos, sin)
