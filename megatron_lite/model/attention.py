"""Causal self-attention kernels with document boundaries (packed samples) and GQA.

All backends share one contract, :func:`attention_forward`, and agree with the ``eager`` reference
(``tests/test_attention.py``). Document boundaries come as ``cu_seqlens`` in the flash-attn varlen
format: offsets into the flattened ``b*s`` token stream, every row starting a new segment; no
token attends to a token of another segment.

Backends (``--attention-backend``):
  flash  flash-attn ``flash_attn_varlen_func`` (CUDA, fp16/bf16, only when importable).
  sdpa   ``torch.nn.functional.scaled_dot_product_attention``: one causal call per document, or a
         dense block-diagonal causal mask when documents are short (a Python loop over hundreds of
         tiny documents costs more than the masked dense kernel). Measured on torch 2.13 CPU
         (b=4, s=1024, 8x64 heads, 4 docs/row, fwd+bwd): per-document loop 0.18 s = unmasked causal
         SDPA, dense mask 0.26 s; the two agree to 3e-6.
  flex   ``torch.nn.attention.flex_attention`` with a document-causal block mask. torch 2.13 has
         no FlexAttention backward on CPU, so on CPU it serves inference only (raises if grads needed).
  eager  plain softmax(QK^T * scale + mask) V in fp32: the reference.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.nn.functional as F

from megatron_lite.layers.ring_attention import ring_attention
from megatron_lite.parallel.state import get_context_parallel_group, get_context_parallel_world_size

ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "flex", "eager")

# A per-document SDPA loop is used while documents average at least this many tokens; below it the
# Python loop overhead dominates and one dense block-diagonal masked call is faster. Measured with
# bench/bench_model.py (torch 2.13 CPU, b=2, s=1024, 8x64 heads, fwd+bwd, loop/dense speed):
# 0.29 at 32-token docs, 0.65 at 64, 1.56 at 128, 1.71 at 256.
_MIN_AVG_DOC_TOKENS_FOR_LOOP = 128

_announced: set[tuple[str, str]] = set()
_last_bounds: list = []   # [cu_seqlens tensor, (version, b, s), host boundaries]: per-step cache
_block_masks: dict = {}   # FlexAttention block masks for the cached boundaries, keyed by (device, b, s)


def flash_attn_available() -> bool:
    """True when ``flash_attn.flash_attn_varlen_func`` imports and CUDA is available."""
    if not torch.cuda.is_available():
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # ImportError, or a broken build raising OSError / RuntimeError
        return False
    return True


def flex_attention_available() -> bool:
    """True when ``torch.nn.attention.flex_attention`` exists in this torch."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str, device, dtype: torch.dtype | None = None) -> str:
    """Map ``--attention-backend`` to a concrete backend for ``device``.

    ``auto`` picks the fastest available: flash on CUDA when flash-attn imports (and ``dtype`` is
    fp16/bf16 or unknown), else sdpa (on CPU sdpa's per-document loop matched unmasked causal SDPA,
    and flex has no CPU backward). The choice for ``auto`` is printed once per (device type, result).

    Args:
        name: one of ``auto|flash|sdpa|flex|eager``.
        device: torch.device or str the model runs on.
        dtype: optional model dtype; flash-attn has no fp32 kernel.

    Returns:
        the concrete backend name.

    Raises:
        ValueError: unknown name, or ``flash`` requested where flash-attn cannot run.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {name!r} unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
    dev_type = torch.device(device).type
    if name == "flash":
        if dev_type != "cuda" or not flash_attn_available():
            raise ValueError("--attention-backend flash needs CUDA and an importable flash_attn "
                             "(pip install flash-attn); use --attention-backend sdpa instead")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"--attention-backend flash supports fp16/bf16 only, model dtype is {dtype}; "
                             "use --bf16 or --attention-backend sdpa")
        return name
    if name == "flex" and not flex_attention_available():
        raise ValueError("--attention-backend flex needs torch>=2.5 (torch.nn.attention.flex_attention)")
    if name != "auto":
        return name
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    chosen = "flash" if dev_type == "cuda" and half and flash_attn_available() else "sdpa"
    if (dev_type, chosen) not in _announced:
        _announced.add((dev_type, chosen))
        if not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
            # stderr: tools print machine-readable results (--json) on stdout
            print(f"[megatron_lite] --attention-backend auto -> {chosen} on {dev_type}",
                  file=sys.stderr, flush=True)
    return chosen


def _check_inputs(q, k, v, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [b, s, hq, d], k/v [b, s, hk, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, s, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on b, s or head dim")
    if hq % k.shape[2]:
        raise ValueError(f"GQA needs query heads ({hq}) divisible by key/value heads ({k.shape[2]})")
    if cu_seqlens is None:
        return None
    # Every layer gets the same cu_seqlens tensor in a step: read it to the host (a device sync on
    # CUDA) and validate it once, not once per layer.
    if _last_bounds and _last_bounds[0] is cu_seqlens and _last_bounds[1] == (cu_seqlens._version, b, s):
        return _last_bounds[2]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != b * s or any(e <= st for st, e in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to b*s={b * s}; got {bounds[:8]}...")
    missing = set(range(0, b * s, s)) - set(bounds)
    if missing:
        raise ValueError(f"cu_seqlens must start a segment at every row start (multiples of s={s}); "
                         f"missing {sorted(missing)[:4]}")
    _last_bounds[:] = [cu_seqlens, (cu_seqlens._version, b, s), bounds]
    _block_masks.clear()
    return bounds


def _document_ids(bounds: list[int], b: int, s: int, device) -> torch.Tensor:
    """Segment index of every token, [b, s] int32 (segments numbered over the flattened stream)."""
    lengths = torch.tensor([e - st for st, e in zip(bounds, bounds[1:])], device=device)
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), lengths)
    return ids.view(b, s)


def _doc_causal_mask(bounds: list[int] | None, b: int, s: int, device) -> torch.Tensor:
    """Boolean [b, 1, s, s] mask, True where query i may attend key j (same document, j <= i)."""
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    if bounds is None:
        return causal.expand(b, 1, s, s)
    doc = _document_ids(bounds, b, s, device)
    return (doc[:, :, None] == doc[:, None, :]).unsqueeze(1) & causal


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, s, hk, d] -> [b, s, hk * n_rep, d]; query head j reads kv head j // n_rep (HF repeat_kv)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def _eager(q, k, v, bounds, scale):
    b, s, hq, _ = q.shape
    n_rep = hq // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)))
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [b, hq, s, s]
    scores = scores.masked_fill(~_doc_causal_mask(bounds, b, s, q.device), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vf)
    return out.transpose(1, 2).to(q.dtype)


def _sdpa_call(q, k, v, scale, **kw):
    """SDPA on [b, s, h, d] tensors (transposed to [b, h, s, d] for the kernel and back)."""
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=scale, enable_gqa=gqa, **kw)
    return out.transpose(1, 2)


def _sdpa(q, k, v, bounds, scale):
    b, s, hq, d = q.shape
    if bounds is None or len(bounds) - 1 == b:  # one segment per row: plain causal
        return _sdpa_call(q, k, v, scale, is_causal=True)
    n_docs = len(bounds) - 1
    if b * s / n_docs < _MIN_AVG_DOC_TOKENS_FOR_LOOP:
        return _sdpa_call(q, k, v, scale, attn_mask=_doc_causal_mask(bounds, b, s, q.device))
    # Per-document loop over the flattened stream; segments never cross rows (checked above).
    qf, kf, vf = (t.reshape(b * s, t.shape[2], d) for t in (q, k, v))
    pieces = [_sdpa_call(qf[st:e][None], kf[st:e][None], vf[st:e][None], scale, is_causal=True)[0]
              for st, e in zip(bounds, bounds[1:])]
    return torch.cat(pieces, dim=0).view(b, s, hq, d)


def _flex_block_mask(bounds, b, s, device):
    """Document-causal FlexAttention BlockMask: q_idx >= kv_idx and both in the same document."""
    from torch.nn.attention.flex_attention import create_block_mask

    if bounds is None:
        def mask_mod(b_idx, h_idx, q_idx, kv_idx):
            return q_idx >= kv_idx
        return create_block_mask(mask_mod, None, None, s, s, device=device)
    doc = _document_ids(bounds, b, s, device)

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b_idx, q_idx] == doc[b_idx, kv_idx])
    return create_block_mask(mask_mod, b, None, s, s, device=device)


def _flex(q, k, v, bounds, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("--attention-backend flex has no backward on CPU in this torch (FlexAttention "
                           "CPU backward is not implemented); use --attention-backend sdpa for CPU "
                           "training, or run under torch.no_grad() for inference")
    if not torch.is_grad_enabled():
        # flex refuses CPU inputs that require grad even under no_grad; no graph is built here anyway.
        q, k, v = q.detach(), k.detach(), v.detach()
    b, s, hq, _ = q.shape
    key = (q.device, b, s, bounds is None)
    block_mask = _block_masks.get(key)
    if block_mask is None:  # built once per step's boundaries, shared by all layers
        block_mask = _block_masks[key] = _flex_block_mask(bounds, b, s, q.device)
    # Eager flex materialises the full score matrix; on CUDA compile it into the fused kernel.
    flex = _compiled_flex(flex_attention) if q.device.type == "cuda" else flex_attention
    with warnings.catch_warnings():
        # CPU flex is inference-only here; its "called without torch.compile" notice is expected.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                   scale=scale, enable_gqa=hq != k.shape[2])
    return out.transpose(1, 2)


_COMPILED_FLEX = []


def _compiled_flex(fn):
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(fn, dynamic=False))
    return _COMPILED_FLEX[0]


def _flash(q, k, v, bounds, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash-attn supports fp16/bf16 only, got {q.dtype}; use --bf16 or --attention-backend sdpa")
    b, s, hq, d = q.shape
    if bounds is None:
        bounds, max_seqlen = list(range(0, b * s + 1, s)), s
        cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=q.device)
    else:  # the batch's own tensor: no host-to-device copy per layer
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = max(e - st for st, e in zip(bounds, bounds[1:]))
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, max_seqlen, max_seqlen, dropout_p=0.0,
                                 softmax_scale=scale, causal=True)
    return out.view(b, s, hq, d)


# Backends whose whole call dynamo can put into a compiled block's graph (no cu_seqlens: one
# causal segment per row, nothing read from the host). Packed documents need the boundaries on the
# host (the per-document loop, the mask, flash's varlen lengths): traced, every new document layout
# would be a new graph (a recompile per batch), so that call runs eagerly between two graphs.
_IN_GRAPH_BACKENDS = ("sdpa", "eager")


@torch.compiler.disable
def _attention_outside_graph(q, k, v, cu_seqlens, max_seqlen, backend, softmax_scale):
    """:func:`attention_forward` run eagerly from inside a compiled block (one graph break)."""
    return attention_forward(q, k, v, cu_seqlens, max_seqlen, backend, softmax_scale)


@torch.compiler.disable
def _context_parallel_attention(q, k, v, cu_seqlens, softmax_scale):
    """Ring attention over the CP group (``layers/ring_attention.py``), always eager: its
    point-to-point transfers cannot sit inside a compiled graph."""
    return ring_attention(q, k, v, cu_seqlens, softmax_scale, group=get_context_parallel_group())


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                      max_seqlen: int | None, backend: str, softmax_scale: float | None = None) -> torch.Tensor:
    """Causal, document-masked attention with GQA.

    Args:
        q: [b, s, hq, d] queries (this rank's heads).
        k, v: [b, s, hk, d] keys / values, hq % hk == 0 (query head j uses kv head j // (hq/hk)).
        cu_seqlens: [n+1] int32 document boundaries in the flattened b*s stream (0, ..., b*s; every
            multiple of s present), or None for one causal segment per row.
        max_seqlen: longest segment in tokens (flash only; computed if None).
        backend: a concrete backend (``flash|sdpa|flex|eager``) or ``auto`` (resolved for q's device).
        softmax_scale: multiplier on QK^T, default 1/sqrt(d).

    Returns:
        [b, s, hq, d] in q's dtype.

    Raises:
        ValueError: bad shapes, malformed cu_seqlens, unknown backend.
        RuntimeError: flex with gradients on CPU.

    With context parallelism (``--context-parallel-size`` > 1) q/k/v are this CP rank's chunks
    (load-balanced layout), ``cu_seqlens`` the WHOLE sequence's boundaries, and the call is ring
    attention whatever ``backend`` says (``config/checks.py`` admits auto, sdpa, eager).
    """
    if get_context_parallel_world_size() > 1:
        return _context_parallel_attention(q, k, v, cu_seqlens, softmax_scale)
    if torch.compiler.is_compiling() and (cu_seqlens is not None or backend not in _IN_GRAPH_BACKENDS):
        return _attention_outside_graph(q, k, v, cu_seqlens, max_seqlen, backend, softmax_scale)
    bounds = _check_inputs(q, k, v, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        backend = resolve_attention_backend("auto", q.device, q.dtype)
    if backend == "eager":
        return _eager(q, k, v, bounds, scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, bounds, scale)
    if backend == "flex":
        return _flex(q, k, v, bounds, scale)
    if backend == "flash":
        return _flash(q, k, v, bounds, cu_seqlens, max_seqlen, scale)
    raise ValueError(f"--attention-backend {backend!r} unknown; choose one of {', '.join(ATTENTION_BACKENDS)}")
