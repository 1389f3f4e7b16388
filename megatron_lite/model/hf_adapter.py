"""In-memory conversion between HF ``transformers`` ``LlamaForCausalLM`` and ``LlamaModel`` TP shards.

Name map (HF -> ours; ``i`` = layer): ``model.embed_tokens.weight`` -> ``embedding.weight``;
``model.layers.i.{input_layernorm,post_attention_layernorm}.weight`` -> ``layers.i.<same>.weight``;
``model.layers.i.self_attn.{q,k,v}_proj.weight`` -> ``layers.i.self_attn.qkv_proj.weight`` (fused);
``model.layers.i.self_attn.o_proj.weight`` -> ``layers.i.self_attn.o_proj.weight``;
``model.layers.i.mlp.{gate,up}_proj.weight`` -> ``layers.i.mlp.gate_up_proj.weight`` (fused);
``model.layers.i.mlp.down_proj.weight`` -> ``layers.i.mlp.down_proj.weight``;
``model.norm.weight`` -> ``final_norm.weight``; ``lm_head.weight`` -> ``output_layer.weight``
(absent when tied). Sharding: embedding/lm_head/q/k/v/gate/up split by rows (dim 0; a fused shard
stacks its blocks' row slices, ``[Q_r; K_r; V_r]``), o/down by columns (dim 1), norms replicated.
With fewer KV groups g than TP ranks t, q alone -> ``qkv_proj.weight`` and k, v ->
``layers.i.self_attn.qkv_proj.kv_weight`` = ``[K_j; V_j]`` of the group j = r // (t/g) rank r's
query heads read (replicated on the t/g ranks sharing it).
Vocab rows are zero-padded to ``V_pad`` before splitting and stripped on the way back. The command-line converter (``tools/convert_checkpoint.py``) builds on this.
"""

from __future__ import annotations

import torch

from megatron_lite.model.model_config import ModelConfig



def _hf_get(cfg, name, default=None):
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def config_from_hf(hf_config) -> ModelConfig:
    """``ModelConfig`` equivalent to a ``transformers.LlamaConfig`` (or its ``to_dict()``).

    ``seq_length`` is set to ``max_position_embeddings``; ``vocab_size`` to HF's. RoPE: HF
    ``rope_parameters`` (transformers >= 5) or ``rope_theta``/``rope_scaling`` (4.x) of type
    default/linear/dynamic/yarn/llama3 map to ``--rope-scaling-type`` none/linear/dynamic/yarn/llama3,
    with every key HF's RoPE initialisation (transformers 5) reads for them: ``rope_theta``,
    ``factor``; yarn ``beta_fast``, ``beta_slow``, ``truncate``, ``attention_factor``, ``mscale``,
    ``mscale_all_dim`` (attention factor get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)
    when both are set), a missing ``factor`` = max_position_embeddings / original; llama3
    ``low_freq_factor``, ``high_freq_factor``; for yarn and llama3 the original length from a
    top-level ``original_max_position_embeddings`` first (HF gives it priority), else the rope
    dict's, else ``max_position_embeddings``. ``partial_rotary_factor`` != 1 and other rope types
    are refused with one line naming the key.

    Raises:
        ValueError: a feature LlamaModel does not have (biases, non-SiLU activation, other RoPE types).
    """
    g = lambda n, d=None: _hf_get(hf_config, n, d)  # noqa: E731
    if g("attention_bias", False) or g("mlp_bias", False):
        raise ValueError("HF config has attention_bias/mlp_bias; LlamaModel has no biases")
    if g("hidden_act", "silu") != "silu":
        raise ValueError(f"HF hidden_act {g('hidden_act')!r} unsupported; LlamaModel uses SwiGLU (silu)")
    h, nh = int(g("hidden_size")), int(g("num_attention_heads"))
    head_dim = g("head_dim") or h // nh
    max_pos = int(g("max_position_embeddings"))
    rope = dict(g("rope_parameters") or g("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    kind = rope.get("rope_type", "default")
    # Fields our RoPE does not implement: refuse them rather than convert to a different model.
    prf = rope.get("partial_rotary_factor", g("partial_rotary_factor", None))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"HF partial_rotary_factor={prf} is unsupported (megatron_lite rotates the "
                         f"whole head dimension)")
    if kind not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ValueError(f"HF rope type {kind!r} has no megatron_lite equivalent "
                         "(supported: default, linear, dynamic, yarn, llama3)")
    # The pre-extension length, as HF's standardize_rope_params resolves it for yarn and llama3: a
    # top-level original_max_position_embeddings has priority over the rope dict's, which falls
    # back to max_position_embeddings. HF's dynamic scaling reads max_position_embeddings only.
    orig = None
    if kind in ("yarn", "llama3"):
        orig = g("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    elif kind == "dynamic":
        orig = max_pos
    factor = rope.get("factor")
    if kind == "yarn" and factor is None and orig:   # HF: s = max_position_embeddings / original
        factor = max_pos / int(orig)
    if kind != "default" and factor is None:
        raise ValueError(f"HF rope type {kind!r} without a 'factor'; set rope 'factor' explicitly")
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if rope.get(key) is None:
                raise ValueError(f"HF rope type 'llama3' without {key!r}; HF needs it too")
    theta = rope.get("rope_theta", g("rope_theta", 10000.0))
    kw = dict(rotary_base=float(theta))
    if kind == "default":
        kw["rope_scaling_type"] = "none"
    else:
        kw.update(rope_scaling_type=kind, rope_scaling_factor=float(factor))
        if orig:
            kw["rope_original_max_position_embeddings"] = int(orig)
        if kind == "yarn":
            opt = lambda k: None if rope.get(k) is None else float(rope[k])  # noqa: E731
            kw.update(yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                      yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                      yarn_attention_factor=opt("attention_factor"),
                      yarn_mscale=opt("mscale"), yarn_mscale_all_dim=opt("mscale_all_dim"),
                      yarn_truncate=bool(rope.get("truncate", True)))
        if kind == "llama3":
            kw.update(llama3_low_freq_factor=float(rope["low_freq_factor"]),
                      llama3_high_freq_factor=float(rope["high_freq_factor"]))
    return ModelConfig(
        hidden_size=h, num_layers=int(g("num_hidden_layers")), num_attention_heads=nh,
        num_query_groups=int(g("num_key_value_heads") or nh), ffn_hidden_size=int(g("intermediate_size")),
        kv_channels=None if head_dim == h // nh else int(head_dim), seq_length=max_pos,
        max_position_embeddings=max_pos, vocab_size=int(g("vocab_size")), norm_epsilon=float(g("rms_norm_eps")),
        init_method_std=float(g("initializer_range", 0.02)),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)), **kw)


def _rope_parameters(c: ModelConfig) -> tuple[dict, int]:
    """HF ``rope_parameters`` and HF ``max_position_embeddings`` for our RoPE settings."""
    kind, s, base = c.rope_scaling_type, c.rope_scaling_factor, c.rotary_base
    orig = c.rope_original_max_position_embeddings or c.max_position_embeddings
    max_pos = c.max_position_embeddings
    if kind == "none":
        return {"rope_type": "default", "rope_theta": base}, max_pos
    if kind == "ntk":  # static NTK-aware scaling is plain RoPE with base * s^(d/(d-2))
        d = c.head_dim
        return {"rope_type": "default", "rope_theta": base * s ** (d / (d - 2))}, max_pos
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": base, "factor": s}, max_pos
    if kind == "dynamic":
        return {"rope_type": "dynamic", "rope_theta": base, "factor": s}, orig
    if kind == "yarn":
        p = {"rope_type": "yarn", "rope_theta": base, "factor": s, "original_max_position_embeddings": orig,
             "beta_fast": c.yarn_beta_fast, "beta_slow": c.yarn_beta_slow, "truncate": c.yarn_truncate}
        for key, v in (("attention_factor", c.yarn_attention_factor), ("mscale", c.yarn_mscale),
                       ("mscale_all_dim", c.yarn_mscale_all_dim)):
            if v is not None:
                p[key] = v
        return p, max_pos
    if kind == "llama3":
        return {"rope_type": "llama3", "rope_theta": base, "factor": s, "original_max_position_embeddings": orig,
                "low_freq_factor": c.llama3_low_freq_factor, "high_freq_factor": c.llama3_high_freq_factor}, max_pos
    raise ValueError(f"--rope-scaling-type {kind!r} unknown")


def rope_for_transformers4(rope_parameters: dict) -> dict:
    """The transformers 4.x form of HF ``rope_parameters``: top-level ``rope_theta`` and
    ``rope_scaling`` (None for plain RoPE), which 4.x readers take from config.json (5.x reads
    ``rope_parameters`` first; both agree). Written beside ``rope_parameters`` on export.

    Note: some 4.x releases recompute the YaRN factor as ``max_position_embeddings /
    original_max_position_embeddings``; they agree with ours when max_position_embeddings =
    factor x original (--max-position-embeddings, or --seq-length, = s x
    --rope-original-max-position-embeddings).
    """
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    else:
        scaling["type"] = scaling["rope_type"]   # the oldest 4.x readers look for "type"
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": scaling}


def config_to_hf(config: ModelConfig):
    """``transformers.LlamaConfig`` for ``config`` (rope settings in HF ``rope_parameters`` form; static
    ``ntk`` becomes ``default`` with the NTK-scaled theta; for ``dynamic``, HF's
    ``max_position_embeddings`` is the original length, as HF's dynamic scaling reads it).

    Raises:
        ValueError: ``vocab_size`` unset or an invalid config.
    """
    from transformers import LlamaConfig

    c = config.resolve()
    if c.vocab_size is None:
        raise ValueError("config_to_hf needs --vocab-size")
    rope, max_pos = _rope_parameters(c)
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_query_groups, head_dim=c.head_dim, hidden_act="silu",
                       max_position_embeddings=max_pos, rms_norm_eps=c.norm_epsilon,
                       initializer_range=c.init_method_std, tie_word_embeddings=c.tie_word_embeddings,
                       attention_bias=False, mlp_bias=False, rope_parameters=rope)


# Partition marker of a K/V weight replicated per KV group (g < TP): rank r holds group r // (TP/g)
# of each block (``layers/qkv_linear.py``).
KV_GROUP = "kv_group"


def _spec(c: ModelConfig, tp: int = 1) -> list[tuple[str, list[tuple[str, tuple[int, ...]]], int | str | None]]:
    """(our name, [(HF name, HF full shape), ...], TP partition dim, ``KV_GROUP`` or None) for every
    parameter at TP degree ``tp``. Several HF tensors for one of ours = a fused weight whose blocks
    are split over TP separately. With fewer KV groups than ``tp``, q goes alone into
    ``qkv_proj.weight`` and k, v into ``qkv_proj.kv_weight`` (one group's rows per rank)."""
    h, d, f, v = c.hidden_size, c.head_dim, c.ffn_hidden_size, c.vocab_size
    q = (c.num_attention_heads * d, h)
    kv = [(f"model.layers.{{i}}.self_attn.{n}_proj.weight", (c.num_query_groups * d, h)) for n in "kv"]
    spec = [("embedding.weight", [("model.embed_tokens.weight", (v, h))], 0)]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        kv_i = [(name.format(i=i), shape) for name, shape in kv]
        if c.num_query_groups >= tp:
            attn = [(ours + "self_attn.qkv_proj.weight", [(hf + "self_attn.q_proj.weight", q)] + kv_i, 0)]
        else:
            attn = [(ours + "self_attn.qkv_proj.weight", [(hf + "self_attn.q_proj.weight", q)], 0),
                    (ours + "self_attn.qkv_proj.kv_weight", kv_i, KV_GROUP)]
        spec += [
            (ours + "input_layernorm.weight", [(hf + "input_layernorm.weight", (h,))], None),
            *attn,
            (ours + "self_attn.o_proj.weight", [(hf + "self_attn.o_proj.weight", (h, c.num_attention_heads * d))], 1),
            (ours + "post_attention_layernorm.weight", [(hf + "post_attention_layernorm.weight", (h,))], None),
            (ours + "mlp.gate_up_proj.weight", [(hf + "mlp.gate_proj.weight", (f, h)),
                                                (hf + "mlp.up_proj.weight", (f, h))], 0),
            (ours + "mlp.down_proj.weight", [(hf + "mlp.down_proj.weight", (h, f))], 1),
        ]
    spec.append(("final_norm.weight", [("model.norm.weight", (h,))], None))
    if not c.tie_word_embeddings:
        spec.append(("output_layer.weight", [("lm_head.weight", (v, h))], 0))
    return spec


_VOCAB = ("embedding.weight", "output_layer.weight")


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> full shape of every ``LlamaForCausalLM`` weight for ``config`` (no ``lm_head``
    when tied), in HF's order (embedding, layers, final norm, head)."""
    return {key: shape for _, parts, _ in _spec(config.resolve()) for key, shape in parts}


def check_hf_state_dict(hf_state_dict: dict, config: ModelConfig, where: str = "HF state dict") -> dict:
    """Validate a full HF state dict against ``config`` and return it in canonical form.

    Canonical: exactly the keys of :func:`hf_tensor_shapes` plus, when tied, ``lm_head.weight`` as
    the very tensor of ``model.embed_tokens.weight``; ``rotary_emb.inv_freq`` buffers dropped.
    A tied checkpoint that also stores ``lm_head.weight`` must store the same values.

    Raises:
        ValueError: naming ``where`` and the key, for a missing key, a wrong shape, an unknown key,
            or a stored ``lm_head.weight`` that differs from the embedding of a tied model.
    """
    shapes = hf_tensor_shapes(config)
    tied = bool(config.tie_word_embeddings)
    extra = [k for k in hf_state_dict if k not in shapes and k != "lm_head.weight"
             and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"{where}: keys a LLaMA model does not have: {extra[:5]} (biases or a "
                         "different architecture?)")
    out = {}
    for key, shape in shapes.items():
        if key not in hf_state_dict:
            hint = " (the config says tie_word_embeddings=false)" if key == "lm_head.weight" else ""
            raise ValueError(f"{where}: missing {key}{hint}")
        t = hf_state_dict[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, the config implies {shape}: "
                             "config and weights do not belong together")
        out[key] = t
    if tied:
        emb = out["model.embed_tokens.weight"]
        head = hf_state_dict.get("lm_head.weight")
        if head is not None and head is not emb and not torch.equal(head.to(emb.dtype), emb):
            raise ValueError(f"{where}: tie_word_embeddings=true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
        out["lm_head.weight"] = emb
    return out


def hf_to_megatron_lite(hf_state_dict: dict, config: ModelConfig, tp_rank: int, tp_size: int) -> dict:
    """This TP rank's ``LlamaModel`` state dict from an HF ``LlamaForCausalLM`` state dict.

    Args:
        hf_state_dict: HF names -> full tensors (``lm_head.weight`` may be missing when tied).
        config: the matching ``ModelConfig`` (e.g. from :func:`config_from_hf`).
        tp_rank, tp_size: target shard.

    Returns:
        Our names -> shard tensors: vocab rows zero-padded to ``V_pad(tp_size)`` before splitting;
        q/k/v (gate/up) each split over TP and stacked as ``[Q_r; K_r; V_r]`` (``[G_r; U_r]``); with
        fewer KV groups g than ``tp_size``, ``qkv_proj.weight`` = ``Q_r`` and ``qkv_proj.kv_weight``
        = ``[K_j; V_j]`` of group ``j = tp_rank // (tp_size/g)``.

    Raises:
        ValueError: missing key, wrong shape, unexpected key, or ``config`` invalid for ``tp_size``.
    """
    c = config.validate(tp_size)
    if c.vocab_size is None:
        raise ValueError("hf_to_megatron_lite needs config.vocab_size")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    v_pad = c.padded_vocab_size(tp_size)
    spec = _spec(c, tp_size)
    g = c.num_query_groups
    kv_group = tp_rank // (tp_size // g) if g < tp_size else None
    known = {k for _, parts, _ in spec for k, _ in parts} | {"lm_head.weight"}
    extra = [k for k in hf_state_dict if k not in known and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ValueError(f"HF state dict has keys LlamaModel does not know: {extra[:5]} "
                         "(biases or a different architecture?)")
    out = {}
    for name, parts, dim in spec:
        blocks = []
        for key, shape in parts:
            if key not in hf_state_dict:
                hint = " (HF checkpoint is tied: pass a config with tie_word_embeddings=True)" \
                    if key == "lm_head.weight" else ""
                raise ValueError(f"HF state dict lacks {key}{hint}")
            t = hf_state_dict[key]
            if tuple(t.shape) != shape:
                raise ValueError(f"HF {key} has shape {tuple(t.shape)}, config expects {shape}; the config "
                                 "does not match the checkpoint")
            if name in _VOCAB and v_pad > shape[0]:
                t = torch.cat([t, t.new_zeros(v_pad - shape[0], shape[1])], dim=0)
            if dim == KV_GROUP:
                blocks.append(t.chunk(g, dim=0)[kv_group])
            else:
                blocks.append(t.chunk(tp_size, dim=dim)[tp_rank] if dim is not None else t)
        out[name] = torch.cat(blocks, dim=0).clone() if len(blocks) > 1 else blocks[0].clone()
    return out


def _assemble_kv_groups(name: str, parts: list, shards: list, groups: int, out: dict) -> None:
    """HF k/v weights from the ``kv_weight`` shards of all TP ranks (g < TP): group j is the copy
    of the first rank sharing it; the other copies must be equal to it."""
    replicas = len(shards) // groups
    rows = [shape[0] // groups for _, shape in parts]
    for r, t in enumerate(shards):
        if t.shape[0] != sum(rows):
            raise ValueError(f"{name} shard {r} has {t.shape[0]} rows, expected {sum(rows)} (one KV group)")
        first = (r // replicas) * replicas
        if not torch.equal(t, shards[first]):
            raise ValueError(f"{name}: TP ranks {first} and {r} hold different copies of KV group "
                             f"{r // replicas}: the shards are not from one consistent checkpoint (or the "
                             "replicas diverged during training)")
    per_group = [shards[j * replicas].split(rows, dim=0) for j in range(groups)]  # [group][block]
    for b, (key, shape) in enumerate(parts):
        t = torch.cat([per_group[j][b] for j in range(groups)], dim=0)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} -> {key}: assembled shape {tuple(t.shape)} != expected {shape}")
        out[key] = t.clone()


def megatron_lite_to_hf(shard_state_dicts: list, config: ModelConfig) -> dict:
    """Full HF ``LlamaForCausalLM`` state dict from the TP shards (rank order) of ``LlamaModel``.

    Vocab padding is stripped; fused q/k/v and gate/up shards are split back into HF's weights; with
    fewer KV groups than shards, k/v come from the ``kv_weight`` copies (one per group, all copies
    of a group checked equal).
    When tied, ``lm_head.weight`` is the very tensor of ``model.embed_tokens.weight`` (HF ties them
    the same way; deduplicate before writing safetensors).

    Raises:
        ValueError: missing keys, shapes inconsistent with ``config``, or replicated parameters
            (norm weights) that differ between shards.
    """
    tp = len(shard_state_dicts)
    if tp < 1:
        raise ValueError("megatron_lite_to_hf needs at least one shard")
    c = config.validate(tp)
    out = {}
    for name, parts, dim in _spec(c, tp):
        missing = [r for r, sd in enumerate(shard_state_dicts) if name not in sd]
        if missing:
            raise ValueError(f"shard(s) {missing} lack {name}")
        shards = [sd[name] for sd in shard_state_dicts]
        if dim == KV_GROUP:
            _assemble_kv_groups(name, parts, shards, c.num_query_groups, out)
            continue
        if dim is None:
            if not all(torch.equal(shards[0], q) for q in shards[1:]):
                raise ValueError(f"replicated parameter {name} differs between TP shards: the shards are not "
                                 "from one consistent checkpoint (or TP ranks diverged during training)")
            pieces = [[shards[0]]]
        elif len(parts) > 1:
            local = [shape[0] // tp for _, shape in parts]
            for r, t in enumerate(shards):
                if t.shape[0] != sum(local):
                    raise ValueError(f"{name} shard {r} has {t.shape[0]} rows, expected {sum(local)}")
            split = [t.split(local, dim=0) for t in shards]  # [rank][block]
            pieces = [[split[r][j] for r in range(tp)] for j in range(len(parts))]
        else:
            pieces = [shards]
        for (key, shape), blocks in zip(parts, pieces):
            t = torch.cat(blocks, dim=dim) if dim is not None else blocks[0]
            if name in _VOCAB:
                t = t[:shape[0]]
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} -> {key}: assembled shape {tuple(t.shape)} != expected {shape}")
            out[key] = t.clone()
    if c.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
