"""GQA with fewer KV groups than TP ranks (issue 16 item 2): TP = 4 with g = 2 (two ranks share each
KV group) and g = 1 (MQA, all four share one).

One forked 4-process gloo launch checks, for both cases: TP-independent init (the shards and the
replicated K/V rows are the TP = 1 model's), logits / per-token loss / every gradient equal HF
``LlamaForCausalLM`` (fp32, 1e-5), the replicated K/V gradient arrives complete on every replica,
the global grad norm (ours, and DeepSpeed's counting rule with our ``mpu``) equals HF's, the
HF round trip of the gathered shards, and a few SGD steps with gradient accumulation give the
TP = 1 losses and weights (replicas stay bitwise equal). The planner's exact per-rank counts run in-process
(conversion: tests/test_convert_checkpoint.py).

Training through DeepSpeed (slow; one torchrun launch of this file, 4 gloo processes, fp32): the
tiny preset (2 KV groups) at TP = 4 with ZeRO-3, sequence parallelism and full recompute (D = 1,
accumulation A = 4) gives the TP = 1 run's (ZeRO-1, D = 4) per-step losses and global grad norms (DeepSpeed's
own norm, which counts each replicated KV group once).
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # torchrun launch: make `tests` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.runtime.utils import is_model_parallel_parameter  # noqa: E402 - before forking (slow import)
from transformers import LlamaForCausalLM  # noqa: E402 - imported before forking so the workers share it

from megatron_lite import parallel as ps  # noqa: E402
from megatron_lite.model.hf_adapter import hf_to_megatron_lite, megatron_lite_to_hf  # noqa: E402
from megatron_lite.model.counting import num_parameters  # noqa: E402
from megatron_lite.model.llama import LlamaModel  # noqa: E402
from megatron_lite.model.model_config import ModelConfig  # noqa: E402
from megatron_lite.parallel import mpu  # noqa: E402
from megatron_lite.planning.plan import params_per_tp_rank  # noqa: E402
from tests.hf_reference import hf_reference_model  # noqa: E402
from tests.dist_utils import read_metrics, run_torchrun, spawn  # noqa: E402

TOL = 1e-5
V = 300
TP = 4
GROUPS = (2, 1)


def _config(g: int) -> ModelConfig:
    return ModelConfig(vocab_size=V, seq_length=32, norm_epsilon=1e-6, hidden_size=64, num_layers=2,
                       num_attention_heads=8, num_query_groups=g, ffn_hidden_size=96, attention_backend="eager")


def _hf_model(c: ModelConfig, seed: int):
    return hf_reference_model(c, seed)


def _batch(seed: int, b: int = 2, s: int = 24):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, s), generator=g)
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[0, :3] = -100
    return tokens, labels


def _gather_vocab(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(TP)]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def _train(model: LlamaModel, steps: int = 3, accumulation: int = 2) -> list[float]:
    """SGD steps (momentum, weight decay) on a token-mean loss over ``accumulation`` micro-batches;
    per-step losses. SGD, not AdamW: its update is linear in the gradient, so the weights after
    training can be compared tightly (AdamW's 1/sqrt(v) inflates rounding of tiny gradients)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5, weight_decay=0.01)
    losses = []
    for step in range(steps):
        batches = [_batch(100 + j) for j in range(accumulation)]   # the same data: the loss must fall
        n = sum(int((lab != -100).sum()) for _, lab in batches)
        total = 0.0
        for tokens, labels in batches:
            loss = model(tokens, labels=labels).sum() / n
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def _check_init(model: LlamaModel, c: ModelConfig, ref: dict, rank: int) -> None:
    """Every parameter is the slice of the TP = 1 init this rank should hold."""
    g, d, share = c.num_query_groups, c.head_dim, TP // c.num_query_groups
    v_pad = c.padded_vocab_size(TP)
    for name, p in model.named_parameters():
        full = ref[name.replace(".kv_weight", ".weight")]
        if name in ("embedding.weight", "output_layer.weight"):
            full = torch.cat([full[:V], full.new_zeros(v_pad - V, full.shape[1])])
        if name.endswith("qkv_proj.weight"):
            expect = full[:c.num_attention_heads * d].chunk(TP)[rank]
        elif name.endswith("kv_weight"):
            k, v = full[c.num_attention_heads * d:].split(g * d)
            expect = torch.cat([k.chunk(g)[rank // share], v.chunk(g)[rank // share]])
            assert p.tensor_model_parallel == (rank % share == 0) and p.partition_dim is None
        elif getattr(p, "partition_sizes", None):   # fused [Gate; Up]: each block sliced
            expect = torch.cat([blk.chunk(TP)[rank] for blk in full.split(p.partition_sizes)])
        elif p.tensor_model_parallel:
            expect = full.chunk(TP, dim=p.partition_dim)[rank]
        else:
            expect = full
        assert torch.equal(p.detach(), expect), f"g={g}: {name} is not the TP=1 init's slice"


def _check_parity(model: LlamaModel, c: ModelConfig, rank: int) -> None:
    g = c.num_query_groups
    hf = _hf_model(c, seed=100)
    model.load_state_dict(hf_to_megatron_lite(hf.state_dict(), c, rank, TP))
    tokens, labels = _batch(1)
    with torch.no_grad():
        ref_logits = hf(tokens).logits
        logits = _gather_vocab(model(tokens))[..., :V]
    err = (logits - ref_logits).abs().max().item()
    assert ref_logits.abs().max() > 1.0 and err <= TOL, f"g={g}: logits differ from HF by {err:.3g}"
    loss = model(tokens, labels=labels)
    ref_loss = F.cross_entropy(hf(tokens).logits.reshape(-1, V), labels.reshape(-1), reduction="none",
                               ignore_index=-100).reshape(loss.shape)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=TOL)
    n = (labels != -100).sum()
    (loss.sum() / n).backward()
    (ref_loss.sum() / n).backward()
    # Every gradient, the replicated kv_weight's included, equals HF's (the kv all-reduce made it whole).
    expect = hf_to_megatron_lite({k: p.grad for k, p in hf.named_parameters()}, c, rank, TP)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expect[name], rtol=1e-4, atol=2e-6,
                                   msg=lambda m: f"g={g} grad {name}: {m}")
    hf_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in hf.parameters())).item()
    assert ps.tensor_parallel_grad_norm(model.parameters()) == pytest.approx(hf_norm, rel=1e-5)
    # DeepSpeed's rule (runtime/utils.clip_grad_norm_, ZeRO 1-3 get_grad_norm_direct): a parameter
    # counts where is_model_parallel_parameter(p) or model-parallel rank 0, summed over mpu's group.
    sq = sum(p.grad.double().pow(2).sum() for p in model.parameters()
             if is_model_parallel_parameter(p) or mpu.get_model_parallel_rank() == 0).reshape(1)
    dist.all_reduce(sq, group=mpu.get_model_parallel_group())
    assert sq.sqrt().item() == pytest.approx(hf_norm, rel=1e-5), f"g={g}: DeepSpeed's rule miscounts KV copies"
    # Round trip of the gathered shards; a diverged replica is refused.
    shards = [None] * TP
    dist.all_gather_object(shards, {k: v.detach() for k, v in model.state_dict().items()},
                           group=ps.get_tensor_model_parallel_group())
    back = megatron_lite_to_hf(shards, c)
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    shards[TP - 1] = dict(shards[TP - 1], **{"layers.0.self_attn.qkv_proj.kv_weight":
                                             shards[TP - 1]["layers.0.self_attn.qkv_proj.kv_weight"] + 1})
    with pytest.raises(ValueError, match="different copies of KV group"):
        megatron_lite_to_hf(shards, c)


def _worker(rank, world):
    refs = {}
    for g in GROUPS:   # TP = 1 references before the TP groups exist
        torch.manual_seed(7)
        ref_model = LlamaModel(_config(g))
        refs[g] = ({k: v.detach().clone() for k, v in ref_model.state_dict().items()}, _train(ref_model),
                   {k: v.detach().clone() for k, v in ref_model.state_dict().items()})
    ps.initialize_model_parallel(TP)
    for g in GROUPS:
        c = _config(g)
        init, ref_losses, ref_trained = refs[g]
        torch.manual_seed(7)
        model = LlamaModel(c)
        _check_init(model, c, init, rank)
        losses = _train(model)
        assert losses == pytest.approx(ref_losses, rel=1e-6), (g, losses, ref_losses)
        assert losses[-1] < losses[0] - 0.3, (g, losses)   # it trained
        _check_trained(model, c, ref_trained)
        kv = model.layers[1].self_attn.qkv_proj.kv_weight.detach()
        copies = [torch.empty_like(kv) for _ in range(TP)]
        dist.all_gather(copies, kv, group=ps.get_tensor_model_parallel_group())
        share = TP // g
        assert all(torch.equal(copies[r], copies[r // share * share]) for r in range(TP)), "replicas diverged"
        # The planner's per-rank count is this model's (vocab 300 pads to 512 at TP = 4).
        n_padded = num_parameters(c)[1] + (c.padded_vocab_size(TP) - V) * c.hidden_size * 2
        assert sum(p.numel() for p in model.parameters()) == params_per_tp_rank(
            n_padded, c.hidden_size, c.num_layers, TP, g, c.head_dim)
        _check_parity(model, c, rank)


def _check_trained(model: LlamaModel, c: ModelConfig, ref: dict) -> None:
    """Trained weights equal the TP = 1 run's, compared in HF layout."""
    shards = [None] * TP
    dist.all_gather_object(shards, {k: v.detach() for k, v in model.state_dict().items()},
                           group=ps.get_tensor_model_parallel_group())
    ours = megatron_lite_to_hf(shards, c)
    full = megatron_lite_to_hf([ref], _config(c.num_query_groups))
    for k, v in full.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"g={c.num_query_groups} trained {k}: {m}")


def test_tp4_with_two_and_one_kv_groups():
    spawn(_worker, TP)


def _hand_params_per_rank(h, L, a, g, d, f, v_pad, t, tied=False):
    """One TP rank's parameters counted layer by layer (g < t: one whole KV group per rank)."""
    q, o = a * d * h // t, h * a * d // t
    kv = 2 * d * h * (g // t if g >= t else 1)
    layer = q + kv + o + 2 * f * h // t + h * f // t + 2 * h      # + gate/up, down, 2 norms
    return v_pad * h // t * (1 if tied else 2) + L * layer + h     # embedding (+ LM head), final norm


@pytest.mark.parametrize("preset,tp,dims", [
    ("1b", 8, dict(h=2048, L=22, a=32, g=4, d=64, f=5632)),     # 2 ranks share each of 4 groups
    ("7b", 16, dict(h=4096, L=32, a=32, g=8, d=128, f=11008)),  # 2 ranks share each of 8 groups
])
def test_planner_counts_one_kv_group_per_rank(preset, tp, dims):
    """The planner's per-rank parameters (and so its ZeRO state bytes) hold one whole KV group per
    rank when g < TP: by hand, V = 32000 padded to a multiple of 128 * TP = 32768."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import plan_run

    p = plan_run.plan_from_argv(["--model-size", preset, "--vocab-size", "32000", "--gpus", str(2 * tp),
                                 "--tp", str(tp), "--micro-batch-size", "1", "--global-batch-tokens",
                                 "4194304", "--train-tokens", "1000000000", "--bf16", "--gpu", "h100",
                                 "--zero-stage", "1"])
    psi = _hand_params_per_rank(**dims, v_pad=32768, t=tp)
    assert p["params_per_gpu"] == psi
    if preset == "1b":
        assert psi == 140_863_488   # 8388608 * 2 + 22 * 5640192 + 2048
    assert p["memory_weights_bytes"] == 2 * psi and p["memory_optimizer_bytes"] == 12 * -(-psi // 2)


def test_plan_line_and_dry_run_layout_checks():
    """The printed plan names the replication (1b preset: 4 groups at TP 8, the extra K/V rows
    L·2dH·(1 - g/t) = 22·2·64·2048/2 by hand); none at TP 4; TP 64 is refused for the 32 heads."""
    from megatron_lite.config import ConfigError, parse_args
    from megatron_lite.config.plan_text import format_plan

    def cfg(tp):
        return parse_args(["--model-size", "1b", "--vocab-size", "32000", "--tp", str(tp), "--micro-batch-size",
                           "1", "--train-iters", "10", "--device", "cpu"], world_size=tp)

    assert ("KV groups               : 4 < TP 8: each group's K/V weights replicated on 2 TP ranks, "
            "gradients summed over them (+2,883,584 params per rank)") in format_plan(cfg(8)).splitlines()
    assert "KV groups" not in format_plan(cfg(4))
    with pytest.raises(ConfigError,
                       match="--num-attention-heads 32 is not divisible by --tensor-model-parallel-size 64"):
        cfg(64)


# ----------------------------------------------------------------------------- DeepSpeed training
TRAIN = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64", "--micro-batch-size", "1",
         "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "1", "--split", "100,0,0", "--num-workers", "0", "--log-interval", "1",
         "--eval-interval", "0", "--seed", "7", "--device", "cpu", "--fp32"]
RUNS = {"tp1": ["--tp", "1", "--zero-stage", "1"],                                # D = 4, A = 1
        "tp4_z3_sp": ["--tp", "4", "--zero-stage", "3", "--sequence-parallel",   # D = 1, A = 4
                      "--recompute-granularity", "full"]}


def _driver(root: str) -> None:
    """Body of the torchrun launch: every run of ``RUNS`` in one process group."""
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    for name, extra in RUNS.items():
        pretrain(parse_args(TRAIN + extra + ["--data-path", os.path.join(root, "data"),
                                             "--metrics-file", os.path.join(root, name + ".jsonl")]))


@pytest.mark.slow
def test_deepspeed_training_at_tp4_with_two_kv_groups_equals_tp1(tmp_path):
    from tests.test_training import make_dataset

    make_dataset(str(tmp_path / "data"))
    run_torchrun(__file__, str(tmp_path), nproc=4)
    ref = read_metrics(str(tmp_path / "tp1.jsonl"))
    assert sorted(ref) == [1, 2, 3] and ref[3]["loss"] < ref[1]["loss"]
    m = read_metrics(str(tmp_path / "tp4_z3_sp.jsonl"))
    for step in ref:
        for key in ("loss", "grad_norm"):
            assert m[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)


if __name__ == "__main__":
    _driver(sys.argv[1])
