"""--fused-kernels torch|liger|apex (issue 17 #3): selection, refusals and wiring on CPU; parity of
Liger's kernels with the torch path on GPU.

On CPU the libraries cannot run, so the wiring is checked with stand-ins that follow each
library's documented call contract (argument order, tensor layout) and compute the reference
math: a model pointed at them must give the torch path's loss and gradients, and the stand-ins
must have been called with HF Llama's casting mode and our q/k transposed to ``[b, heads, s, d]``.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import ConfigError, parse_args
from megatron_lite.model.compile import use_fused_kernels
from megatron_lite.model.llama import LlamaModel
from megatron_lite.model.model_config import ModelConfig
from megatron_lite.ops import kernels
from megatron_lite.ops.rope import rope_reference
from megatron_lite.ops.swiglu_rmsnorm import rms_norm_reference

BASE = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
        "--micro-batch-size", "1", "--train-iters", "10", "--device", "cpu"]


def test_torch_is_the_default_and_runs_our_ops():
    cfg = parse_args(BASE, world_size=1)
    assert cfg.training.fused_kernels == "torch"
    ks = kernels.resolve_fused_kernels("torch", "cpu")
    assert ks is kernels.TORCH_KERNELS and ks.rope is None   # the model's own RoPE (C++ op / reference)


@pytest.mark.parametrize("name,kind", [("liger", "Triton"), ("apex", "CUDA C++")])
def test_library_kernels_on_cpu_refused_in_one_line(name, kind):
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--fused-kernels", name], world_size=1)
    assert str(e.value) == (f"--fused-kernels {name} needs CUDA ({name}'s kernels are {kind} GPU kernels); "
                            "this run is on cpu: use --fused-kernels torch")


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    assert kernels.fused_kernels_unavailable("liger", "cuda") == (
        "--fused-kernels liger: liger_kernel is not installed (pip install liger-kernel)")
    with pytest.raises(ValueError, match=r"^--fused-kernels apex: apex is not installed \(build NVIDIA apex"):
        kernels.resolve_fused_kernels("apex", "cuda")
    assert kernels.fused_kernels_unavailable("fast", "cuda").startswith("--fused-kernels 'fast' unknown")


def _module(monkeypatch, name: str, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def _fake_liger(monkeypatch, calls: list):
    """liger_kernel stand-ins with Liger's signatures computing the reference math."""
    class RMSNormFn:
        @staticmethod
        def apply(x, w, eps, offset, casting_mode, in_place):
            calls.append(("rms_norm", offset, casting_mode, in_place))
            return rms_norm_reference(x, w, eps)

    class SiLUMulFn:
        @staticmethod
        def apply(a, b):
            calls.append(("swiglu", tuple(a.shape), tuple(b.shape)))
            return F.silu(a) * b

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        # HF layout: q [b, hq, s, d], cos [b, s, d] unsqueezed at dim 1 (liger_kernel/transformers/rope.py)
        calls.append(("rope", tuple(q.shape), tuple(cos.shape)))
        assert q.shape[2] == cos.shape[1] and unsqueeze_dim == 1
        rot = (lambda x: rope_reference(x.transpose(1, 2), cos.float(), sin.float()).transpose(1, 2))
        return rot(q), rot(k)

    for name in ("liger_kernel", "liger_kernel.ops", "liger_kernel.transformers"):
        _module(monkeypatch, name)
    _module(monkeypatch, "liger_kernel.ops.rms_norm", LigerRMSNormFunction=RMSNormFn)
    _module(monkeypatch, "liger_kernel.ops.swiglu", LigerSiLUMulFunction=SiLUMulFn)
    _module(monkeypatch, "liger_kernel.transformers.rope", liger_rotary_pos_emb=liger_rotary_pos_emb)


def _fake_apex(monkeypatch, calls: list):
    class MixedFn:
        @staticmethod
        def apply(x, w, normalized_shape, eps, memory_efficient):
            calls.append(("apex_rms_norm", tuple(normalized_shape), memory_efficient))
            return rms_norm_reference(x, w, eps)

    for name in ("apex", "apex.normalization"):
        _module(monkeypatch, name)
    _module(monkeypatch, "apex.normalization.fused_layer_norm", FusedRMSNormAffineMixedDtypesFunction=MixedFn)


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 16), generator=g)
    loss = model(tokens, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["liger", "apex"])
def test_selected_library_is_wired_into_every_call_site(monkeypatch, name):
    calls: list = []
    (_fake_liger if name == "liger" else _fake_apex)(monkeypatch, calls)
    c = ModelConfig(vocab_size=96, seq_length=16, hidden_size=32, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=48, no_fused_rope=True)
    c.resolve()
    torch.manual_seed(0)
    ref = LlamaModel(c)
    model = LlamaModel(c)
    model.load_state_dict(ref.state_dict())
    use_fused_kernels(model, name, "cuda")   # the stand-ins make the library "importable"
    want_loss, want_grads = _loss_and_grads(ref)
    got_loss, got_grads = _loss_and_grads(model)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    norms = 2 * 2 + 1                        # two per block and the final norm
    if name == "liger":
        assert calls.count(("rms_norm", 0.0, "llama", False)) == norms
        assert calls.count(("swiglu", (2, 16, 48), (2, 16, 48))) == 2
        assert calls.count(("rope", (2, 4, 16, 8), (2, 16, 8))) == 2     # q [b, hq, s, d], cos [b, s, d]
    else:
        assert calls == [("apex_rms_norm", (32,), False)] * norms   # SwiGLU and RoPE stay torch


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
liger = pytest.mark.skipif(kernels.fused_kernels_unavailable("liger", "cuda") is not None,
                           reason="liger-kernel not importable on CUDA")


@pytest.mark.gpu
@gpu
@liger
def test_liger_ops_match_torch_path_bf16():
    torch.manual_seed(0)
    dev = "cuda"
    lg, tk = kernels.resolve_fused_kernels("liger", "cuda"), kernels.TORCH_KERNELS
    x = torch.randn(4, 256, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(512, device=dev)).to(torch.bfloat16).requires_grad_()
    gu = torch.randn(4, 256, 2 * 384, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(4, 256, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 256, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ang = torch.arange(256, device=dev)[None, :, None] * torch.rand(1, 1, 32, device=dev)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).expand(4, -1, -1), torch.cat([ang.sin(), ang.sin()], -1).expand(4, -1, -1)

    def run(ks):
        grads = []
        for out, inputs in ((ks.rms_norm(x, w, 1e-5), (x, w)), (ks.swiglu(gu), (gu,))):
            grads += list(torch.autograd.grad(out.float().square().sum(), inputs))
            grads.append(out.detach())
        rope = ks.rope or (lambda q_, k_, c, s: (rope_reference(q_, c, s), rope_reference(k_, c, s)))
        q2, k2 = rope(q, k, cos, sin)
        grads += list(torch.autograd.grad((q2.float().square().sum() + k2.float().pow(3).sum()), (q, k)))
        return grads + [q2.detach(), k2.detach()]

    for a, b in zip(run(lg), run(tk)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@gpu
@liger
def test_liger_model_loss_matches_torch_path_bf16():
    c = ModelConfig(vocab_size=512, seq_length=128, hidden_size=256, num_layers=2, num_attention_heads=8,
                    num_query_groups=4, params_dtype="bfloat16")
    c.resolve()
    torch.manual_seed(0)
    ref = LlamaModel(c, device="cuda")
    model = LlamaModel(c, device="cuda")
    model.load_state_dict(ref.state_dict())
    use_fused_kernels(model, "liger", "cuda")
    tokens = torch.randint(0, 512, (2, 128), device="cuda")
    losses = [m(tokens, labels=torch.roll(tokens, -1, 1)).mean() for m in (ref, model)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)


def test_plan_names_compile_and_kernels_only_when_asked():
    from megatron_lite.config.plan_text import format_plan

    assert "kernels   " not in format_plan(parse_args(BASE, world_size=1))   # default plan unchanged
    plan = format_plan(parse_args(BASE + ["--compile", "--compile-backend", "aot_eager"], world_size=1))
    assert ("kernels                 : torch.compile per block (aot_eager; packed-document attention "
            "and TP collectives eager between graphs); --fused-kernels torch (ours)") in plan.splitlines()


def test_compile_with_inductor_refused_without_a_cxx_compiler(monkeypatch):
    from megatron_lite.config import checks

    monkeypatch.setattr(checks.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--compile"], world_size=1)
    assert str(e.value) == ("--compile (inductor backend) needs a C++ compiler on CPU and none is on PATH "
                            "(install g++), or use --compile-backend aot_eager")
    parse_args(BASE + ["--compile", "--compile-backend", "aot_eager"], world_size=1)   # no compiler needed
