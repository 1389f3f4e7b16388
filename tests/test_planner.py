"""Planner formulas against hand-computed values: ZeRO memory, activations, time/cost, Chinchilla."""

import json
import math
import os
import subprocess
import sys

import pytest

from megatron_lite.planning import chinchilla, memory, time_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- ZeRO model states (ZeRO paper)
def test_zero_stages_match_paper_example():
    # ZeRO paper figure 1: Ψ = 7.5B, N_d = 64, K = 12 -> 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    psi, nd = 7.5e9, 64
    got = [memory.model_state_memory(int(psi), nd, st).total / 1e9 for st in range(4)]
    assert got[0] == pytest.approx(120.0)
    assert got[1] == pytest.approx(2 * 7.5 + 2 * 7.5 + 12 * 7.5 / 64, rel=1e-6)  # 31.40625
    assert round(got[1], 1) == 31.4
    assert got[2] == pytest.approx(2 * 7.5 + 14 * 7.5 / 64, rel=1e-6)
    assert round(got[2], 1) == 16.6
    assert got[3] == pytest.approx(16 * 7.5 / 64, rel=1e-6)
    assert round(got[3], 1) == 1.9


def test_zero_stage_terms_exact_and_offload():
    m = memory.model_state_memory(1000, 8, 2, "bf16")
    assert (m.weights, m.gradients, m.optimizer) == (2000, 2 * 125, 12 * 125)
    m = memory.model_state_memory(1001, 8, 3, "bf16")  # ceil partition: 126
    assert (m.weights, m.gradients, m.optimizer) == (252, 252, 12 * 126)
    m = memory.model_state_memory(1000, 4, 3, "bf16", offload_optimizer=True, offload_params=True)
    assert (m.weights, m.gradients, m.optimizer) == (0, 500, 0)
    assert (m.weights_host, m.optimizer_host) == (500, 3000)
    m = memory.model_state_memory(1000, 4, 0, "fp32")
    assert (m.weights, m.gradients, m.optimizer) == (4000, 4000, 8000)
    with pytest.raises(ValueError, match="offload-params needs --zero-stage 3"):
        memory.model_state_memory(1000, 4, 2, offload_params=True)
    with pytest.raises(ValueError, match="offload-optimizer"):
        memory.model_state_memory(1000, 4, 0, offload_optimizer=True)
    with pytest.raises(ValueError, match="zero-stage"):
        memory.model_state_memory(1000, 4, 4)


# ---------------------------------------------------------------- activations (Korthikanti et al.)
def test_activation_per_layer_by_hand():
    s, b, h, a, g, f = 8, 2, 16, 4, 2, 40
    # no flash, no recompute, TP=1, 2-byte: 4·2·sbh + 2·sbh(2 + 2g/a) + 4·2·sbf + 2·a·s²·b
    sbh, sbf = s * b * h, s * b * f
    want = 8 * sbh + 2 * sbh * 3 + 8 * sbf + 2 * a * s * s * b
    got = memory.activation_bytes_per_layer(s, b, h, a, g, f, flash_attention=False, fused_norm=True)
    assert got == want == 2048 + 1536 + 5120 + 1024
    # flash: the s² term becomes the fp32 log-sum-exp 4·a·s·b
    assert memory.activation_bytes_per_layer(s, b, h, a, g, f, fused_norm=True) == 2048 + 1536 + 5120 + 4 * a * s * b
    # selective drops the score term; full keeps the layer input only
    assert memory.activation_bytes_per_layer(s, b, h, a, g, f, flash_attention=False,
                                             recompute="selective", fused_norm=True) == 2048 + 1536 + 5120
    assert memory.activation_bytes_per_layer(s, b, h, a, g, f, recompute="full") == 2 * sbh
    # TP=2 without SP: replicated 4·p·sbh stays, the rest halves; with SP everything halves
    t2 = memory.activation_bytes_per_layer(s, b, h, a, g, f, tensor_parallel_size=2,
                                           flash_attention=False, fused_norm=True)
    assert t2 == 2048 + (1536 + 5120 + 1024) // 2
    t2sp = memory.activation_bytes_per_layer(s, b, h, a, g, f, tensor_parallel_size=2,
                                             sequence_parallel=True, flash_attention=False, fused_norm=True)
    assert t2sp == want // 2
    # eager (HF-style) RMSNorm also saves its fp32 normalized input: + 2 norms · 4 bytes · sbh,
    # replicated over TP like the norm inputs
    assert memory.activation_bytes_per_layer(s, b, h, a, g, f, flash_attention=False) == \
        want + 8 * sbh
    assert memory.activation_bytes_per_layer(s, b, h, a, g, f, tensor_parallel_size=2,
                                             flash_attention=False) == t2 + 8 * sbh


def test_activation_gpt_limit_matches_korthikanti_attention_term():
    # For MHA (g = a) our attention part is Korthikanti's 11sbh + 5as²b minus the dropout terms
    # (sbh mask, 2as²b dropout output, as²b mask): 10sbh + 2as²b for 16-bit activations.
    s, b, h, a = 128, 1, 64, 4
    f_zero_like = 1  # isolate attention: MLP part 4·2·s·b·1
    got = memory.activation_bytes_per_layer(s, b, h, a, a, f_zero_like, flash_attention=False, fused_norm=True)
    mlp = 2 * s * b * h + 8 * s * b * f_zero_like  # MLP input + SwiGLU tensors
    norms = 2 * 2 * s * b * h
    attn = got - mlp - norms
    sbh, as2b = s * b * h, a * s * s * b
    # ours: QKV input + Q + K + V + attention output = 10·sbh, softmax output 2·as²b
    assert attn == 10 * sbh + 2 * as2b
    assert attn == (11 * sbh + 5 * as2b) - (sbh + 3 * as2b)


def test_activation_memory_totals_and_recompute_working():
    kw = dict(seq_length=16, micro_batch_size=1, hidden_size=8, num_attention_heads=2,
              num_query_groups=2, ffn_hidden_size=24, num_layers=3, padded_vocab_size=128)
    none = memory.activation_memory(**kw, flash_attention=False)
    assert none.layers == 3 * none.per_layer and none.recompute_working == 0
    # final norm input + LM-head input (2 bytes each) + eager norm's fp32 copy; logits at their
    # peak: the head's bf16 output beside its fp32 upcast (the loss works in place on the latter)
    assert none.output_layer == (2 * 2 + 4) * 16 * 8 + (2 + 4) * 16 * 128
    assert none.loss_logits == (2 + 4) * 16 * 128
    fp32 = memory.activation_memory(**kw, flash_attention=False, bytes_per_element=4)
    assert fp32.output_layer == (2 * 4 + 4) * 16 * 8 + 4 * 16 * 128  # upcast is a no-op
    full = memory.activation_memory(**kw, flash_attention=False, recompute="full")
    assert full.per_layer == 2 * 16 * 8
    assert full.recompute_working == none.per_layer
    assert full.total == 3 * 256 + none.per_layer + none.output_layer


def test_largest_micro_batch_binary_search():
    assert memory.largest_micro_batch(lambda b: 100 + 7 * b, 100 + 7 * 13) == 13
    assert memory.largest_micro_batch(lambda b: 100 + 7 * b, 100 + 7 * 13 - 1) == 12
    assert memory.largest_micro_batch(lambda b: 100 + 7 * b, 106) == 0
    assert memory.largest_micro_batch(lambda b: b, 10 ** 9, limit=64) == 64


# ---------------------------------------------------------------- time and cost
def test_recipe_llama65b_days():
    # 8 · 6.5e10 · 1.4e12 / (2048 · 2e14) = 7.28e23 / 4.096e17 = 1,777,343.75 s = 20.57 days
    sec = time_cost.recipe_training_seconds(6.5e10, 1.4e12, 2048, 2e14)
    assert sec == pytest.approx(1777343.75)
    assert round(sec / 86400, 1) == 20.6


def test_run_cost_by_hand():
    # 1e12 tokens at 1e6 tokens/s = 1e6 s = 277.78 h; 64 GPUs
    r = time_cost.run_cost(1e12, 1e6, 64, price_gpu_hour=20.0, price_kwh=0.8, pue=1.3,
                           gpu_power_kw=0.7, cost_other=1000.0)
    hours = 1e6 / 3600
    assert r.seconds == pytest.approx(1e6)
    assert r.days == pytest.approx(1e6 / 86400)
    assert r.gpu_hours == pytest.approx(64 * hours)
    assert r.cost_gpu == pytest.approx(64 * hours * 20)
    assert r.energy_kwh == pytest.approx(64 * 0.7 * hours * 1.3)
    assert r.cost_power == pytest.approx(64 * 0.7 * hours * 1.3 * 0.8)
    assert r.cost_total == pytest.approx(r.cost_gpu + r.cost_power + 1000.0)
    with pytest.raises(ValueError, match="pue"):
        time_cost.run_cost(1e12, 1e6, 64, pue=0.9)


def test_tokens_per_second_from_mfu():
    # 0.5 · 1e15 · 8 / 4e10 = 1e5 tokens/s
    assert time_cost.tokens_per_second(4e10, 8, peak_flops=1e15, mfu=0.5) == pytest.approx(1e5)
    assert time_cost.tokens_per_second(4e10, 8, measured=123.0) == 123.0
    with pytest.raises(ValueError, match="--tokens-per-sec"):
        time_cost.tokens_per_second(4e10, 8)
    with pytest.raises(ValueError, match="--mfu"):
        time_cost.tokens_per_second(4e10, 8, peak_flops=1e15, mfu=1.5)
    assert time_cost.flops_train_6nt(7e9, 1e12) == 4.2e22


# ---------------------------------------------------------------- Chinchilla
def test_chinchilla_by_hand():
    e, a, b, al, be = 1.69, 406.4, 410.7, 0.34, 0.28
    n, d = 7e9, 1e12
    assert chinchilla.predicted_loss(n, d) == pytest.approx(e + a / n ** al + b / d ** be)
    # Chinchilla itself: 70B params, 1.4T tokens -> 1.69 + 406.4/70e9^0.34 + 410.7/1.4e12^0.28
    assert chinchilla.predicted_loss(70e9, 1.4e12) == pytest.approx(1.9366, abs=1e-4)
    c = 5.76e23
    opt = chinchilla.compute_optimal(c)
    g = (al * a / (be * b)) ** (1 / (al + be))
    assert opt.n_params == pytest.approx(g * (c / 6) ** (be / (al + be)))
    assert opt.tokens == pytest.approx((c / 6) ** (al / (al + be)) / g)
    assert 6 * opt.n_params * opt.tokens == pytest.approx(c)
    # the optimum beats any other split of the same budget
    for scale in (0.5, 0.8, 1.25, 2.0):
        nn = opt.n_params * scale
        assert chinchilla.predicted_loss(nn, c / (6 * nn)) > opt.loss
    rule = chinchilla.twenty_tokens_rule(c)
    assert rule.n_params == pytest.approx(math.sqrt(c / 120))  # 6.928e10
    assert rule.tokens == pytest.approx(20 * rule.n_params)


def test_chinchilla_cli_json():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "chinchilla.py"),
                          "--params", "7e9", "--tokens", "1e12", "--json"],
                         capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    assert res["plan"]["flops"] == pytest.approx(4.2e22)
    assert res["approach3"]["n_params"] == pytest.approx(
        chinchilla.compute_optimal(4.2e22).n_params)
    assert res["tokens_per_param_rule"]["tokens_per_param"] == pytest.approx(20.0)
    # a budget from a cluster: 64 GPUs × 989.4 TFLOP/s (H100 bf16) × MFU 0.5 × 10 days
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import chinchilla as chinchilla_tool  # tools/chinchilla.py, in-process

    res = chinchilla_tool.run(["--gpus", "64", "--gpu", "h100", "--mfu", "0.5", "--days", "10",
                               "--json"])
    assert res["flops"] == pytest.approx(64 * 989.4e12 * 0.5 * 10 * 86400)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "chinchilla.py"),
                        "--params", "7e9"], capture_output=True, text=True)
    assert r.returncode == 2 and "--params and --tokens go together" in r.stderr


# ---------------------------------------------------------------- plan_run (the tool)
sys.path.insert(0, os.path.join(ROOT, "tools"))

PLAN_KEYS = ("n_params_total", "n_params_non_embedding", "flops_per_token", "tokens_train",
             "flops_train", "dp", "grad_accum_steps", "global_batch_tokens", "steps", "days",
             "gpu_hours", "cost_gpu", "energy_kwh", "cost_power", "cost_total",
             "memory_per_gpu_bytes", "fits")

LLAMA7B_FLAGS = ["--model-size", "7b", "--num-query-groups", "32", "--vocab-size", "32000",
                 "--gpus", "64", "--tp", "8", "--micro-batch-size", "4",
                 "--global-batch-tokens", "4194304", "--train-tokens", "1000000000000", "--bf16"]


def test_plan_run_json_llama7b_by_hand(capsys):
    import plan_run

    assert plan_run.main(LLAMA7B_FLAGS + ["--gpu", "h100", "--mfu", "0.45", "--price-gpu-hour",
                                          "15", "--price-kwh", "0.8", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert set(PLAN_KEYS) <= set(p)
    # LLaMA-7B: 2VH + H + L(4H² + 3HH' + 2H) = 6,738,415,616; non-embedding drops 2VH
    v, h, L, f = 32000, 4096, 32, 11008
    assert p["n_params_total"] == 2 * v * h + h + L * (4 * h * h + 3 * h * f + 2 * h) == 6738415616
    assert p["n_params_non_embedding"] == 6738415616 - 2 * v * h
    # GB_tok and A by the definition: D = 64 / 8 = 8, A = 4,194,304 / (16,384 · 8) = 32
    assert (p["dp"], p["grad_accum_steps"], p["global_batch_tokens"]) == (8, 32, 4194304)
    assert p["recipe_table_grad_accum_steps"] == 4  # the chapter-11 table's value, flagged
    assert any("would give 4" in n for n in p["notes"])
    assert p["steps"] == math.ceil(1e12 / 4194304) == 238419
    T = p["tokens_train"]
    assert T == 238419 * 4194304  # whole steps: the engine's train_iters × GB_tok
    assert p["tokens_per_param"] == pytest.approx(T / 6738415616)
    assert p["chinchilla_predicted_loss"] == pytest.approx(
        1.69 + 406.4 / 6738415616 ** 0.34 + 410.7 / T ** 0.28)
    assert p["flops_train"] == pytest.approx(6 * p["n_params_non_embedding"] * T)
    assert p["flops_train_exact"] == pytest.approx(p["flops_per_token"] * T)
    tps = 0.45 * 989.4e12 * 64 / p["flops_per_token"]
    assert p["tokens_per_sec"] == pytest.approx(tps)
    hours = T / tps / 3600
    assert p["days"] == pytest.approx(hours / 24)
    # the recipe's formula with the same achieved FLOP/s, no recompute: 6·T·P/(GPUs·FLOP/s)
    achieved = 0.45 * 989.4e12
    assert p["days_recipe_formula"] == pytest.approx(6 * T * 6738415616 / (64 * achieved) / 86400)
    assert p["gpu_hours"] == pytest.approx(64 * hours)
    assert p["cost_gpu"] == pytest.approx(64 * hours * 15)
    assert p["energy_kwh"] == pytest.approx(64 * 0.7 * hours * 1.3)
    assert p["cost_power"] == pytest.approx(64 * 0.7 * hours * 1.3 * 0.8)
    assert p["cost_total"] == pytest.approx(p["cost_gpu"] + p["cost_power"])
    # memory by hand: ZeRO-1 default, Ψ per TP rank = (N_padded - (2L+1)H)/8 + (2L+1)H;
    # V pads to 32768 at TP 8 (128 · 8)
    n_pad = 6738415616 + 2 * (32768 - 32000) * h
    rep = (2 * L + 1) * h
    psi = -(-(n_pad - rep) // 8) + rep
    assert p["params_per_gpu"] == psi
    assert p["memory_weights_bytes"] == 2 * psi and p["memory_gradients_bytes"] == 2 * psi
    assert p["memory_optimizer_bytes"] == 12 * -(-psi // 8)
    assert p["memory_per_gpu_bytes"] == (2 * psi + 2 * psi + 12 * -(-psi // 8)
                                         + p["memory_activations_bytes"] + 2 * memory.GiB)
    budget = 80 * memory.GiB
    assert p["fits"] == (p["memory_per_gpu_bytes"] <= budget)
    # activations are linear in the micro-batch: b_max = floor((budget - fixed) / (act / 4))
    fixed = p["memory_per_gpu_bytes"] - p["memory_activations_bytes"]
    b_max = (budget - fixed) // (p["memory_activations_bytes"] / 4)
    assert abs(p["max_micro_batch_size"] - b_max) <= 1 and p["max_micro_batch_size"] >= 4


@pytest.mark.parametrize("cuda_here", [False, True])
def test_plan_precision_is_the_targets_not_this_machines(monkeypatch, cuda_here):
    """Issue 14: --gpu h100 planned on a CPU host used fp32 (TF32 peak, 33.7 days for 7B/1T at
    MFU 0.5) because the precision came from torch.cuda.is_available(). The plan uses the
    target's training default (bf16 on a GPU, fp32 on cpu) unless a precision flag is given, the
    same on any host, and says which it used."""
    import torch

    import plan_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_here)
    flags = [f for f in LLAMA7B_FLAGS if f != "--bf16"]
    p = plan_run.plan_from_argv(flags + ["--gpu", "h100", "--mfu", "0.5"])
    assert p["precision"] == "bf16"
    assert any(n.startswith("precision bf16: the training default on a GPU") for n in p["notes"])
    # days by hand at the H100 dense bf16 peak, 989.4 TFLOP/s: T / (MFU · peak · GPUs / F_tok)
    T = 238419 * 4194304
    assert p["days"] == pytest.approx(T * p["flops_per_token"] / (0.5 * 989.4e12 * 64) / 86400,
                                      rel=1e-12)
    assert p["days"] == pytest.approx(16.85, abs=0.005)        # issue: 16.9 (bf16) vs 33.7
    assert p["memory_weights_bytes"] == 2 * p["params_per_gpu"]          # 16-bit weights
    # an explicit precision wins and is named; fp32 on a GPU plans the TF32 peak
    p32 = plan_run.plan_from_argv(flags + ["--gpu", "h100", "--mfu", "0.5", "--fp32"])
    assert p32["precision"] == "fp32" and round(p32["days"], 1) == 33.7   # TF32 peak 494.7
    assert any(n.startswith("precision fp32: given (--fp32)") and "TF32" in n
               for n in p32["notes"])
    # a CPU target plans fp32 even on a GPU host; its memory is this host's RAM, and it says so
    pc = plan_run.plan_from_argv(["--model-size", "tiny", "--vocab-size", "4096", "--gpu", "cpu",
                                  "--gpus", "1", "--tokens-per-sec", "20000",
                                  "--train-iters", "3"])
    assert pc["precision"] == "fp32"
    assert any(n.startswith("device memory: this machine's RAM") for n in pc["notes"])


def test_plan_run_table_verdict_and_max_micro_batch(capsys):
    import plan_run

    assert plan_run.main(LLAMA7B_FLAGS + ["--zero-stage", "3", "--recompute-granularity",
                                          "full"]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "FITS" in out and "DOES NOT FIT" not in out
    p = plan_run.plan_from_argv(LLAMA7B_FLAGS + ["--zero-stage", "3",
                                                 "--recompute-granularity", "full"])
    b = p["max_micro_batch_size"]
    assert b >= 4
    bigger = plan_run.plan_from_argv([a if a != "4" else str(b + 1) for a in LLAMA7B_FLAGS]
                                     + ["--zero-stage", "3", "--recompute-granularity", "full",
                                        "--global-batch-tokens", str((b + 1) * 4096 * 8)])
    assert not bigger["fits"]


def test_plan_run_flags_disagreement_with_definition(tmp_path, capsys):
    import plan_run

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 4, "train_batch_size": "auto",
                              "zero_optimization": {"stage": 3}}))
    p = plan_run.plan_from_argv(LLAMA7B_FLAGS + ["--deepspeed-config", str(ds)])
    assert p["zero_stage"] == 3
    assert any("gradient_accumulation_steps = 4 disagrees" in n and "32" in n
               for n in p["notes"])
    # a GB_tok that is not a multiple of μ_tok·D is a clear error (exit 2)
    bad = [a if a != "4194304" else "4194305" for a in LLAMA7B_FLAGS]
    assert plan_run.main(bad) == 2
    assert "global-batch-tokens" in capsys.readouterr().err


def test_plan_run_cpu_memory_matches_bench_estimate(capsys):
    """plan_run --gpu cpu plans the bench's measured case with the same formula (ZeRO-1 = ZeRO-0
    on one rank, fp32): the number the 15 % bar checks is the tool's own."""
    import plan_run

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_memory
    from megatron_lite.model.model_config import ModelConfig

    p = plan_run.plan_from_argv(["--model-size", "tiny", "--vocab-size", "4096", "--gpu", "cpu",
                                 "--gpus", "1", "--tokens-per-sec", "20000", "--device", "cpu",
                                 "--micro-batch-size", "8", "--seq-length", "256",
                                 "--train-iters", "300", "--attention-backend", "sdpa",
                                 "--zero-stage", "0"])
    cfg = ModelConfig(model_size="tiny", vocab_size=4096, seq_length=256,
                      max_position_embeddings=256, attention_backend="sdpa")
    cfg.validate(1)
    est = bench_memory.estimate(cfg, 256, 8, "none", True, 4096)
    assert p["memory_per_gpu_bytes"] == est["total_bytes"] and not p["memory_gradients_persist"]
    # by hand: W + O + max(head grads + activations, G); our RMSNorm keeps no normalized copy
    n = est["params"]
    act = memory.activation_memory(256, 8, 128, 4, 2, 352, 2, 4096, bytes_per_element=4,
                                   fused_norm=True)
    assert act.loss_logits == 4 * 2048 * 4096
    head = 4 * (4096 * 128 + 128)
    step = 0  # fused AdamW (CUDA and CPU): no temporaries
    assert est["optimizer_step_bytes"] == step
    assert memory.optimizer_step_working_bytes(10, fused=False) == 2 * 4 * 10  # single-tensor
    assert est["total_bytes"] == 4 * n + 8 * n + max(head + act.total, 4 * n + step)
    assert est["total_bytes_grads_persist"] == 16 * n + act.total
    # a 125m-like shape where the step, not the activations, sets the peak
    states = memory.model_state_memory(1000, 1, 0, "fp32")
    small = memory.ActivationMemory(10, 20, 0, 30, 0)
    assert memory.peak_training_bytes(states, small, False, 7, 500) == 4000 + 8000 + 4000 + 500
    assert memory.peak_training_bytes(states, small, True, 7, 500) == 16000 + 500
    assert memory.optimizer_step_working_bytes(10, fused=True) == 0
    # ZeRO-1 and up keep gradient buffers: the conservative sum
    p1 = plan_run.plan_from_argv(["--model-size", "tiny", "--vocab-size", "4096", "--gpu", "cpu",
                                  "--gpus", "1", "--tokens-per-sec", "20000", "--device", "cpu",
                                  "--micro-batch-size", "8", "--seq-length", "256",
                                  "--train-iters", "300", "--attention-backend", "sdpa",
                                  "--zero-stage", "1"])
    assert p1["memory_per_gpu_bytes"] == est["total_bytes_grads_persist"]
    assert p["precision"] == "fp32" and p["seconds"] == pytest.approx(300 * 2048 / 20000)
    assert plan_run.main(["--model-size", "tiny", "--vocab-size", "4096", "--gpu", "cpu",
                          "--gpus", "1", "--tokens-per-sec", "20000", "--train-iters", "300"]) == 0
    assert "wall clock" in capsys.readouterr().out


@pytest.mark.slow
def test_memory_estimate_within_15_percent_of_measured_cpu_peak():
    """Issue bar: the planner's estimate within 15 % of a measured CPU training peak (RSS growth
    over a warmed-up baseline; fresh processes, 2 AdamW steps, fp32, tiny preset, SDPA and eager
    attention).

    glibc's mmap threshold is fixed (bench_memory.case_env): with its default dynamic threshold,
    freed transient tensors stay resident in the heap and RSS exceeds the live tensor bytes by
    12 % (SDPA) to 48 % (eager) on this case, varying run to run; with the threshold fixed, four
    runs of the SDPA case measured 95.5-96.0 MiB, so one run per case is compared."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_memory

    env = {**bench_memory.case_env("fixed"), "OMP_NUM_THREADS": "1"}
    for case in ("tiny:256:8:none:sdpa", "tiny:256:8:none:eager"):
        ratios, runs = [], []
        for _ in range(1):
            out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_memory.py"),
                                  "--single", "--cases", case, "--vocab-size", "4096"],
                                 capture_output=True, text=True, env=env, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][0]
            r = json.loads(line[len("RESULT "):])
            assert r["measured_bytes"] > r["states_bytes"] and r["malloc_mmap_threshold"] == "131072"
            ratios.append(r["total_bytes"] / r["measured_bytes"])
            runs.append(r)
        assert 0.85 <= ratios[0] <= 1.15, (case, ratios, runs)


@pytest.mark.gpu
def test_bench_memory_records_cuda_max_memory_allocated_next_to_the_estimate():
    """On a GPU the bench measures torch.cuda.max_memory_allocated (reserved beside it) over a
    warmed-up baseline and puts the planner's estimate next to it."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_memory.py"), "--single",
                          "--cases", "tiny:256:8:none:sdpa", "--vocab-size", "4096",
                          "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][0][7:])
    assert r["device"] == "cuda"
    assert r["measured_bytes"] == (r["cuda_max_memory_allocated_bytes"]
                                   - r["cuda_baseline_allocated_bytes"])
    assert r["cuda_max_memory_reserved_bytes"] >= r["cuda_max_memory_allocated_bytes"]
    assert r["measured_bytes"] > r["states_bytes"]
    assert 0.85 <= r["estimate_over_measured"] <= 1.15, r
