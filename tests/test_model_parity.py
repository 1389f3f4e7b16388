"""LlamaModel == HF LlamaForCausalLM (logits, loss, gradients) at TP = 1, 2, 4; TP-independent init.

One forked gloo group per TP degree runs every check for every case (MHA/GQA, tied/untied, padded
vocab, head_dim != H/heads), so the file stays within its time budget on 2 cores.
"""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaForCausalLM  # imported before forking so the workers share it

from megatron_lite import parallel as ps
from megatron_lite.model.model_config import ModelConfig
from megatron_lite.model.hf_adapter import hf_to_megatron_lite, megatron_lite_to_hf
from megatron_lite.model.llama import LlamaModel

TOL = 1e-5  # the bar: max abs difference of fp32 logits
V = 300     # pads to 384 at TP=1 (divisible by 128) and 512 at TP=2, 4

CASES = {
    "mha_untied_sdpa": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=None,
                            ffn_hidden_size=96, attention_backend="sdpa"),
    "gqa_tied_eager": dict(hidden_size=64, num_layers=2, num_attention_heads=8, num_query_groups=4,
                           ffn_hidden_size=112, tie_word_embeddings=True, attention_backend="eager",
                           no_fused_rope=True),
    "gqa_untied_headdim16": dict(hidden_size=48, num_layers=2, num_attention_heads=8, num_query_groups=4,
                                 kv_channels=16, ffn_hidden_size=64, attention_backend="eager",
                                 rotary_base=500000.0),
    "gqa_yarn": dict(hidden_size=64, num_layers=1, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=96, attention_backend="sdpa", rope_scaling_type="yarn", rope_scaling_factor=4.0,
                     max_position_embeddings=64, rope_original_max_position_embeddings=16),
}


def _config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=V, seq_length=32, norm_epsilon=1e-6, **CASES[name])


def _tp_ok(name: str, tp: int) -> bool:
    return _config(name).validate().num_query_groups % tp == 0


from tests.hf_reference import hf_reference_model  # noqa: E402
from tests.dist_utils import spawn  # noqa: E402


def _hf_model(c: ModelConfig, seed: int):
    return hf_reference_model(c, seed)


def _gather_vocab(x: torch.Tensor) -> torch.Tensor:
    if ps.get_tensor_model_parallel_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (2, 24), generator=g)
    labels = torch.randint(0, V, (2, 24), generator=g)
    labels[0, :3] = -100
    labels[1, 20] = -100
    return tokens, labels


def _check_case(name: str, rank: int, tp: int, ref_tp1: dict):
    c = _config(name)
    # 1. TP-independent init: this rank's shards are slices of the TP=1 model built from the same seed.
    torch.manual_seed(7)
    model = LlamaModel(c)
    v_pad = c.padded_vocab_size(tp)
    for pname, p in model.named_parameters():
        full = ref_tp1[pname]
        dim = p.partition_dim if p.tensor_model_parallel else None
        if pname in ("embedding.weight", "output_layer.weight"):
            full = torch.cat([full[:V], full.new_zeros(v_pad - V, full.shape[1])])  # re-pad for this TP
        if getattr(p, "partition_sizes", None):  # fused [Q; K; V] / [Gate; Up]: each block sliced
            expect = torch.cat([blk.chunk(tp, dim=0)[rank] for blk in full.split(p.partition_sizes, dim=0)])
        else:
            expect = full.chunk(tp, dim=dim)[rank] if dim is not None else full
        assert torch.equal(p.detach(), expect), f"{name}: {pname} is not a slice of the TP=1 init"
        assert p.tensor_model_parallel == (dim is not None)
    assert not model.final_norm.weight.tensor_model_parallel
    d = c.head_dim
    qkv = model.layers[0].self_attn.qkv_proj.weight
    assert qkv.tensor_model_parallel and qkv.partition_sizes == [c.num_attention_heads * d, c.num_query_groups * d,
                                                                  c.num_query_groups * d]
    assert model.layers[0].mlp.gate_up_proj.weight.partition_sizes == [c.ffn_hidden_size] * 2

    # 2. Load HF weights; logits equal HF's; padded columns carry no mass.
    hf = _hf_model(c, seed=100)
    model.load_state_dict(hf_to_megatron_lite(hf.state_dict(), c, rank, tp))
    tokens, labels = _batch(1)
    with torch.no_grad():
        ref_logits = hf(tokens).logits
        logits = model(tokens)
    assert logits.dtype == torch.float32 and logits.shape == (2, 24, v_pad // tp)
    full_logits = _gather_vocab(logits)
    assert ref_logits.abs().max() > 1.0  # the comparison is not vacuous
    err = (full_logits[..., :V] - ref_logits).abs().max().item()
    assert err <= TOL, f"{name} TP={tp}: logits differ from HF by {err:.3g}"
    if os.environ.get("PARITY_VERBOSE"):
        print(f"{name} TP={tp} rank {rank}: max|logit| {ref_logits.abs().max():.2f}, max err {err:.2e}")
    assert torch.all(full_logits[..., V:] == torch.finfo(torch.float32).min)

    # 3. Per-token loss and gradients equal HF's (loss therefore independent of TP and padding).
    loss = model(tokens, labels=labels)
    ref_loss = F.cross_entropy(hf(tokens).logits.reshape(-1, V), labels.reshape(-1), reduction="none",
                               ignore_index=-100).reshape(2, 24)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=TOL)
    assert float(loss[0, 0].detach()) == 0.0
    n = (labels != -100).sum()
    (loss.sum() / n).backward()
    (ref_loss.sum() / n).backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    if c.tie_word_embeddings:
        hf_grads["lm_head.weight"] = hf_grads["model.embed_tokens.weight"]
    expect_grads = hf_to_megatron_lite(hf_grads, c, rank, tp)
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expect_grads[pname], rtol=1e-4, atol=2e-6,
                                   msg=lambda m: f"{name} TP={tp} grad {pname}: {m}")
    # Global grad norm counts TP-replicated norm weights once: equals HF's at every TP degree.
    hf_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in hf.parameters())).item()
    assert ps.tensor_parallel_grad_norm(model.parameters()) == pytest.approx(hf_norm, rel=1e-5)

    # 4. Round trip back to HF (shards gathered from all ranks).
    shards = [None] * tp
    dist.all_gather_object(shards, {k: v.detach() for k, v in model.state_dict().items()},
                           group=ps.get_tensor_model_parallel_group())
    back = megatron_lite_to_hf(shards, c)
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k
    return model, c


def _check_recompute_and_packing(model: LlamaModel, c: ModelConfig, name: str):
    tokens, labels = _batch(2)
    model.zero_grad()
    base = model(tokens, labels=labels)
    base.sum().backward()
    base_grads = [p.grad.clone() for p in model.parameters()]
    for gran, n_layers in (("full", None), ("full", 1), ("selective", None)):
        c.recompute_granularity, c.recompute_num_layers = gran, n_layers
        model.zero_grad()
        loss = model(tokens, labels=labels)
        loss.sum().backward()
        assert torch.equal(loss, base), f"{name}: recompute {gran} changed the loss"
        for p, g in zip(model.parameters(), base_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-8)
    c.recompute_granularity, c.recompute_num_layers = None, None
    # Packed sample: two documents in row 0 (positions reset at the boundary), one in row 1.
    seq = tokens[0]
    pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0).repeat(2, 1)
    pos[1] = torch.arange(24)
    cu = torch.tensor([0, 10, 24, 48], dtype=torch.int32)
    with torch.no_grad():
        packed = model(tokens, position_ids=pos, cu_seqlens=cu, max_seqlen=24)
        alone_a = model(seq[:10].unsqueeze(0))
        alone_b = model(seq[10:].unsqueeze(0))
        row1 = model(tokens[1:])
    torch.testing.assert_close(packed[0, :10], alone_a[0], rtol=0, atol=TOL)
    torch.testing.assert_close(packed[0, 10:], alone_b[0], rtol=0, atol=TOL)
    torch.testing.assert_close(packed[1], row1[0], rtol=0, atol=TOL)


def _dropout_loss(rank: int, tp: int, recompute: str | None = None):
    """(loss, grads) of a hidden-dropout model after the same torch.manual_seed, from HF weights."""
    c = _config("gqa_tied_eager")
    c.hidden_dropout, c.recompute_granularity = 0.3, recompute
    model = LlamaModel(c).train()
    model.load_state_dict(hf_to_megatron_lite(_hf_model(c, seed=100).state_dict(), c, rank, tp))
    tokens, labels = _batch(3)
    torch.manual_seed(99)
    loss = model(tokens, labels=labels)
    loss.sum().backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _worker(rank, world, tp):
    # TP=1 references first: before initialize_model_parallel every getter answers TP=1.
    refs = {}
    for name in CASES:
        torch.manual_seed(7)
        refs[name] = {k: v.detach().clone() for k, v in LlamaModel(_config(name)).state_dict().items()}
    dropout_tp1 = _dropout_loss(0, 1)[0] if tp == 2 else None
    ps.initialize_model_parallel(tp)
    for name in CASES:
        if not _tp_ok(name, tp):  # 2 KV groups over 4 ranks: tests/test_gqa_kv_replication.py
            continue
        model, c = _check_case(name, rank, tp, refs[name])
        if tp == 2 and name in ("mha_untied_sdpa", "gqa_tied_eager"):
            _check_recompute_and_packing(model, c, name)
    if tp == 2:
        # Hidden dropout draws from the default stream, identical on all TP ranks and in the same
        # order at any TP degree: the same seed gives the same masks, hence the TP=1 loss.
        dropped, grads = _dropout_loss(rank, tp)
        torch.testing.assert_close(dropped, dropout_tp1, rtol=0, atol=TOL)
        # Full recompute replays the same dropout masks (checkpoint restores the RNG state).
        dropped_rc, grads_rc = _dropout_loss(rank, tp, recompute="full")
        assert torch.equal(dropped_rc, dropped)
        for g, g_rc in zip(grads, grads_rc):
            torch.testing.assert_close(g_rc, g, rtol=1e-6, atol=1e-8)
        c = _config("gqa_tied_eager")
        no_drop = LlamaModel(c)
        no_drop.load_state_dict(hf_to_megatron_lite(_hf_model(c, seed=100).state_dict(), c, rank, tp))
        tokens, labels = _batch(3)
        with torch.no_grad():
            assert not torch.allclose(no_drop(tokens, labels=labels), dropped, atol=1e-3)  # dropout acted


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parity_with_hf(tp):
    spawn(_worker, tp, tp)


def test_bf16_params_fp32_logits_single_process():
    """bf16 parameters: fp32 logits/loss close to the fp32 model on the same weights; bf16 grads."""
    c32 = _config("mha_untied_sdpa")
    c16 = dataclasses.replace(c32, params_dtype="bfloat16")
    sd = hf_to_megatron_lite(_hf_model(c32, seed=100).state_dict(), c32, 0, 1)
    m32, m16 = LlamaModel(c32), LlamaModel(c16)
    m32.load_state_dict(sd)
    m16.load_state_dict(sd)  # load_state_dict casts into the bf16 parameters
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    tokens, labels = _batch(4)
    logits = m16(tokens)
    assert logits.dtype == torch.float32
    loss16, loss32 = m16(tokens, labels=labels), m32(tokens, labels=labels)
    assert loss16.dtype == torch.float32
    assert (loss16.mean() - loss32.mean()).abs() < 0.05 * loss32.mean()
    loss16.mean().backward()
    assert m16.embedding.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(m16.layers[0].self_attn.qkv_proj.weight.grad.float()).all()


def test_meta_model_filled_by_assign_keeps_tp_attributes():
    c = _config("gqa_tied_eager")
    sd = hf_to_megatron_lite(_hf_model(c, seed=100).state_dict(), c, 0, 1)
    ref = LlamaModel(c)
    ref.load_state_dict(sd)
    meta = LlamaModel(c, device="meta")
    meta.load_state_dict(sd, assign=True)
    assert not any(p.is_meta for p in meta.parameters())
    for (name, p), (_, q) in zip(meta.named_parameters(), ref.named_parameters()):
        assert (p.tensor_model_parallel, p.partition_dim) == (q.tensor_model_parallel, q.partition_dim), name
    tokens, _ = _batch(5)
    with torch.no_grad():
        assert torch.equal(meta(tokens), ref(tokens))
