"""ZeRO-3 + TP=2 checkpoints hold every TP shard's weights: a torchrun launch (2 processes, gloo,
TP=2, D=1, ZeRO-3) saves mid-run and at the end; each checkpoint's weights, loaded for inference at
TP=2 (inside the launch) and at TP=1 (here), give the loss of the trained in-memory model.

Regression: the stage-3 weights file was written from DeepSpeed's consolidated state dict, which
exists on global rank 0 only, so TP rank 1 saved ``None``.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.dist_utils import run_torchrun
from tests.test_training import COMMON, make_dataset, probe_loss

ITERS = ["--train-iters", "4", "--save-interval", "2"]


def _argv(root: str) -> list[str]:
    return COMMON + ITERS + ["--data-path", os.path.join(root, "data"), "--tp", "2",
                             "--zero-stage", "3", "--save", os.path.join(root, "ck"),
                             "--metrics-file", os.path.join(root, "m.jsonl")]


def _gathered_probe(engine, cfg) -> float:
    """probe_loss of a plain copy of the in-memory ZeRO-3 model (this TP shard, gathered over DP)."""
    import copy

    import deepspeed

    from megatron_lite.model.llama import LlamaModel

    opt = engine.optimizer
    opt.checkpoint_event_prologue()
    m = engine.module
    with deepspeed.zero.GatheredParameters(list(m.parameters()), modifier_rank=None):
        sd = {k: v.detach().clone().float() for k, v in m.state_dict().items()}
    opt.checkpoint_event_epilogue()
    ref = LlamaModel(copy.deepcopy(cfg.model))
    ref.load_state_dict(sd)
    ref.eval()
    return probe_loss(ref)


def _driver(root: str) -> None:
    """Body of the torchrun launch."""
    from megatron_lite.config import parse_args
    from megatron_lite.parallel import get_tensor_model_parallel_rank
    from megatron_lite.checkpoint import engine_state as checkpointing
    from megatron_lite.checkpoint import weights as ckpt_weights
    from megatron_lite.training.loop import pretrain

    results: dict = {"mem": {}, "tp2": {}}
    save = checkpointing.save_checkpoint

    def save_and_probe(engine, cfg, state, scheduler, save_dir, **kw):
        final = save(engine, cfg, state, scheduler, save_dir, **kw)
        results["mem"][os.path.basename(final)] = _gathered_probe(engine, cfg)
        return final

    checkpointing.save_checkpoint = save_and_probe
    st = pretrain(parse_args(_argv(root)))
    results["iteration"] = st.iteration
    tp_rank = get_tensor_model_parallel_rank()
    for tag in results["mem"]:
        model, cfg = ckpt_weights.load_model_for_inference(os.path.join(root, "ck", tag), tp_rank, 2)
        assert cfg.parallel.tensor_model_parallel_size == 2
        results["tp2"][tag] = probe_loss(model)
    with open(os.path.join(root, f"results_{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_zero3_tp2_checkpoint_loads_at_tp2_and_tp1(tmp_path):
    from megatron_lite.checkpoint.weights import load_model_for_inference

    root = str(tmp_path)
    make_dataset(os.path.join(root, "data"))
    run_torchrun(__file__, root)
    res = []
    for r in (0, 1):
        with open(os.path.join(root, f"results_{r}.json")) as f:
            res.append(json.load(f))
    tags = ["iter_0000002", "iter_0000004"]
    for r in (0, 1):
        assert res[r]["iteration"] == 4
        assert sorted(res[r]["mem"]) == tags and sorted(res[r]["tp2"]) == tags
    for tag in tags:
        ck = os.path.join(root, "ck", tag)
        for tp in (0, 1):   # both TP shards exist and hold tensors (not None)
            sd = torch.load(os.path.join(ck, f"model_tp_{tp:02d}.pt"), weights_only=False)
            assert isinstance(sd, dict) and sd and all(torch.is_tensor(v) for v in sd.values())
        mem = res[0]["mem"][tag]
        assert res[1]["mem"][tag] == pytest.approx(mem, abs=1e-6)   # TP ranks agree
        for r in (0, 1):
            assert res[r]["tp2"][tag] == pytest.approx(mem, abs=1e-5), (tag, r, res[r]["tp2"][tag], mem)
        model, cfg = load_model_for_inference(ck, 0, 1)     # resharded TP=2 -> TP=1
        assert cfg.parallel.tensor_model_parallel_size == 1
        assert probe_loss(model) == pytest.approx(mem, abs=1e-5), tag
    # The two checkpoints differ (training went on after the mid-run gather).
    assert abs(res[0]["mem"][tags[0]] - res[0]["mem"][tags[1]]) > 1e-4


if __name__ == "__main__":
    _driver(sys.argv[1])
