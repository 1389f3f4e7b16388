"""Lightning shim (megatron_lite.integrations.lightning): recipe YAML mapping, LR scheduler, and a
2-process ``strategy="ddp"`` (gloo, CPU) run whose per-step losses equal pretrain_llama.py's.

One torchrun launch (this file as the script) runs, in the same 2-process group:
  1. ``python -m megatron_lite.integrations.lightning --config configs/lightning/tiny_cpu.yaml``
     (its ``main``) for 6 steps, saving a Lightning checkpoint at step 3;
  2. our own trainer, ``pretrain(cfg)`` with the config resolved from the same YAML (ZeRO-0);
  3. Lightning resumed from the step-3 checkpoint to step 6.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "lightning", "tiny_cpu.yaml")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("lightning")

from dist_utils import read_metrics  # noqa: E402 - after the skip




# ----------------------------------------------------------------------------- the launch body
def _driver(root: str) -> None:
    import torch.distributed as dist

    from megatron_lite.integrations.lightning import load_lightning_config
    from megatron_lite.integrations.lightning.__main__ import main
    from megatron_lite.training.loop import pretrain

    data = ["--data-path", os.path.join(root, "data")]
    ck = os.path.join(root, "ck")
    rc = main(["--config", CONFIG, *data, "--metrics-file", os.path.join(root, "pl.jsonl"),
               "--save", ck, "--save-interval", "3"])
    assert rc == 0
    cfg = load_lightning_config(CONFIG, [*data, "--metrics-file", os.path.join(root, "ours.jsonl"),
                                         "--zero-stage", "0"]).cfg
    st = pretrain(cfg)
    rc = main(["--config", CONFIG, *data, "--metrics-file", os.path.join(root, "resumed.jsonl"),
               "--ckpt-path", os.path.join(ck, "step=3.ckpt")])
    if dist.get_rank() == 0:
        with open(os.path.join(root, "done.json"), "w") as f:
            json.dump({"ours_iteration": st.iteration, "resume_rc": rc,
                       "ckpts": sorted(os.listdir(ck))}, f)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from test_training import make_dataset

    root = str(tmp_path_factory.mktemp("lightning"))
    make_dataset(os.path.join(root, "data"))
    from dist_utils import run_torchrun

    stdout = run_torchrun(__file__, root)
    with open(os.path.join(root, "done.json")) as f:
        return root, json.load(f), stdout


def test_ddp_losses_equal_our_trainer_and_fall(launch):
    root, done, _ = launch
    pl, ours = read_metrics(os.path.join(root, "pl.jsonl")), read_metrics(os.path.join(root, "ours.jsonl"))
    assert sorted(pl) == sorted(ours) == list(range(1, 7)) and done["ours_iteration"] == 6
    for s in range(1, 7):
        # same init seed, data, sampler, AdamW groups, LR schedule and clipping: the same run
        assert pl[s]["loss"] == pytest.approx(ours[s]["loss"], rel=1e-5, abs=1e-6), s
        assert pl[s]["lr"] == pytest.approx(ours[s]["lr"], rel=1e-12), s
        assert pl[s]["grad_norm"] == pytest.approx(ours[s]["grad_norm"], rel=1e-4), s
        assert pl[s]["loss_tokens"] == 4 * 64
    assert pl[1]["loss"] == pytest.approx(math.log(256), abs=0.15)  # untrained: ~ln V
    assert pl[6]["loss"] < pl[1]["loss"] - 0.3


def test_ddp_resume_from_lightning_checkpoint_matches_uninterrupted(launch):
    root, done, _ = launch
    assert done["resume_rc"] == 0 and "step=3.ckpt" in done["ckpts"]
    full, res = read_metrics(os.path.join(root, "pl.jsonl")), read_metrics(os.path.join(root, "resumed.jsonl"))
    assert sorted(res) == [4, 5, 6]  # the data loader restarts at consumed_samples = 3 x GB
    for s in (4, 5, 6):
        assert res[s]["loss"] == pytest.approx(full[s]["loss"], rel=1e-5), s
        assert res[s]["consumed_samples"] == s * 4


# ----------------------------------------------------------------------------- unit
def test_recipe_yaml_maps_onto_our_config(tmp_path):
    from megatron_lite.integrations.lightning import load_lightning_config, trainer_kwargs

    y = tmp_path / "r.yaml"
    y.write_text("""
model:
  name: "llama_style_7b"
  architecture: {hidden_size: 4096, num_hidden_layers: 32, num_attention_heads: 32,
                 num_key_value_heads: 8, intermediate_size: 11008, vocab_size: 32000,
                 context_length: 8192,
                 rope_scaling: {type: yarn, factor: 2.0, original_max_position_embeddings: 4096}}
data:
  dynamic_mixing:
    - {name: wiki, weight: 0.3, path: /d/wiki}
    - {name: books, weight: 0.7, path: /d/books}
  num_workers: 8
  micro_batch_size: 2
  global_batch_tokens: 4194304
optimizer: {name: AdamW, lr: 3.0e-4, betas: [0.9, 0.95], weight_decay: 0.1, eps: 1.0e-8}
scheduler: {name: cosine, warmup_steps: 2000, min_lr_ratio: 0.1}
trainer:
  devices: 8
  num_nodes: 8
  accelerator: gpu
  strategy: deepspeed_stage_3
  precision: bf16-mixed
  max_steps: 250000
  val_check_interval: 1000
  log_every_n_steps: 10
""")
    run = load_lightning_config(str(y))
    c, d = run.cfg, run.cfg.derived
    m = c.model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups,
            m.ffn_hidden_size, m.vocab_size, m.seq_length, m.max_position_embeddings) == \
        (4096, 32, 32, 8, 11008, 32000, 8192, 8192)
    assert (m.rope_scaling_type, m.rope_scaling_factor,
            m.rope_original_max_position_embeddings) == ("yarn", 2.0, 4096)
    assert c.data.data_path == ["0.3", "/d/wiki", "0.7", "/d/books"] and c.data.num_workers == 8
    assert (c.optimizer.lr, c.optimizer.adam_beta1, c.optimizer.adam_beta2, c.optimizer.adam_eps,
            c.optimizer.weight_decay) == (3e-4, 0.9, 0.95, 1e-8, 0.1)
    assert c.optimizer.min_lr == pytest.approx(3e-5)
    assert (c.schedule.lr_decay_style, d.lr_warmup_iters, d.train_iters) == ("cosine", 2000,
                                                                            250000)
    assert (c.parallel.zero_stage, d.precision, c.eval.eval_interval) == (3, "bf16", 1000)
    # 64 processes, TP 1: D = 64, A = 4,194,304 / (2 * 8192 * 64) = 4
    assert (d.world_size, d.data_parallel_size, d.num_micro_batches) == (64, 64, 4)
    assert run.name == "llama_style_7b"
    kw = trainer_kwargs(run)
    assert (kw["max_steps"], kw["accumulate_grad_batches"], kw["precision"],
            kw["use_distributed_sampler"], kw["val_check_interval"]) == \
        (250000, 4, "bf16-mixed", False, 4000)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert isinstance(kw["strategy"], DeepSpeedStrategy)
    ds = kw["strategy"].config
    assert ds["zero_optimization"]["stage"] == 3 and "gradient_accumulation_steps" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and "optimizer" not in ds


@pytest.mark.parametrize("section,body,msg", [
    ("optimizer", "{name: SGD, lr: 0.1}", "use AdamW"),
    ("data", "{path: /x, format: webdataset}", "tools/preprocess_data.py"),
    ("trainer", "{accumulate_grad_batches: 4}", "set by the shim"),
    ("model", "{architecture: {context_length: 128}, seq_length: 64}", "contradicts"),
    ("parallel", "{tensor_model_parallel_size: 2}", "must be 1 under Lightning"),
    ("trainr", "{devices: 1}", "unknown section"),
    ("parallel", "{zero_stage: 2}", "needs trainer.strategy deepspeed_stage_2"),
])
def test_recipe_yaml_errors_name_file_line_and_fix(tmp_path, section, body, msg):
    from megatron_lite.config import ConfigError
    from megatron_lite.integrations.lightning import load_lightning_config

    y = tmp_path / "bad.yaml"
    y.write_text(f"# comment\n{section}: {body}\n")
    with pytest.raises(ConfigError, match=msg) as e:
        load_lightning_config(str(y), world_size=2)
    assert str(y) + ":2" in str(e.value) or section == "parallel"  # file:line of the key


def test_runner_dry_run_and_config_error_exit_code(tmp_path, capsys):
    from megatron_lite.integrations.lightning.__main__ import main

    assert main(["--config", CONFIG, "--dry-run", "--train-iters", "8"]) == 0
    out = capsys.readouterr().out
    assert "total steps             : 8" in out and "accumulate_grad_batches=2" in out
    assert "use_distributed_sampler=False" in out and "strategy='ddp'" in out
    assert "ZeRO stage              : 0" in out   # ddp replicates the optimizer state
    y = tmp_path / "bad.yaml"
    y.write_text("trainer:\n  accumulate_grad_batches: 4\n")
    assert main(["--config", str(y), "--dry-run"]) == 2
    assert f"{y}:2: trainer.accumulate_grad_batches" in capsys.readouterr().err
    # flags of features only our trainer has are refused, not ignored
    assert main(["--config", CONFIG, "--dry-run", "--optimizer", "lion",
                 "--spike-detection"]) == 2
    err = capsys.readouterr().err
    assert "--optimizer lion, --spike-detection: not supported by the Lightning shim" in err


def test_lr_scheduler_is_lr_at_per_update_and_skips_with_the_optimizer():
    from megatron_lite.integrations.lightning import LightningGuardedAdamW, MegatronLRScheduler
    from megatron_lite.training.schedules import lr_at

    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LightningGuardedAdamW([{"params": [w]}, {"params": [], "lr_mult": 0.5}], lr=1.0)
    kw = dict(max_lr=1e-3, min_lr=1e-4, warmup_iters=3, decay_iters=10, decay_style="cosine")
    sched = MegatronLRScheduler(opt, **kw)
    seen = []
    for u in range(12):
        seen.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * seen[-1])

        def closure():
            opt.zero_grad()
            loss = (w * (float("nan") if u == 5 else 1.0)).sum()
            loss.backward()
            return loss

        opt.step(closure)
        assert opt.skipped == (u == 5)
        sched.step()
    # update index advances only on applied steps: u=5 skipped, so lr_at(5) is used twice
    want = [lr_at(u, **kw) for u in [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]]
    assert seen == pytest.approx(want, rel=1e-12)
    assert torch.isfinite(w).all()
    state = sched.state_dict()
    again = MegatronLRScheduler(opt, **kw)
    again.load_state_dict(state)
    assert again.last_epoch == 11


def test_single_process_fit_with_validation_every_n_steps(tmp_path):
    """One process (no DDP): validation runs every --eval-interval optimizer steps (Lightning's
    val_check_interval counts micro-batches: interval x A) on --eval-iters micro-batches."""
    from test_training import make_dataset

    from megatron_lite.integrations.lightning import (MegatronDataModule, MegatronLlamaModule,
                                                      build_trainer, load_lightning_config)

    make_dataset(str(tmp_path / "data"))
    run = load_lightning_config(CONFIG, ["--data-path", str(tmp_path / "data"), "--split", "90,10,0",
                                         "--train-iters", "4", "--eval-interval", "2",
                                         "--eval-iters", "1", "--global-batch-size", "2"],
                                world_size=1)
    assert run.cfg.derived.num_micro_batches == 2
    run.trainer.update(devices=1, strategy="auto")
    trainer = build_trainer(run)
    assert trainer.val_check_interval == 4 and trainer.limit_val_batches == 1
    module = MegatronLlamaModule(run.cfg)
    trainer.fit(module, datamodule=MegatronDataModule(run.cfg))
    assert [h["step"] for h in module.history] == [1, 2, 3, 4]
    assert [h["consumed_samples"] for h in module.history] == [2, 4, 6, 8]
    val = float(trainer.callback_metrics["val_loss"])
    assert 0 < val < math.log(256) + 0.5
    assert float(trainer.callback_metrics["val_ppl"]) == pytest.approx(math.exp(val), rel=1e-5)


@pytest.mark.gpu
def test_deepspeed_stage3_strategy_on_gpu(tmp_path):
    """Lightning's DeepSpeedStrategy (ZeRO-3, bf16) runs our module on one GPU; the loss falls."""
    from test_training import make_dataset

    from megatron_lite.integrations.lightning import (MegatronDataModule, MegatronLlamaModule,
                                                      build_trainer, load_lightning_config)

    make_dataset(str(tmp_path / "data"))
    y = tmp_path / "gpu.yaml"
    with open(CONFIG) as f:
        text = f.read()
    for a, b in (('accelerator: "cpu"', 'accelerator: "gpu"'), ("devices: 2", "devices: 1"),
                 ('strategy: "ddp"', 'strategy: "deepspeed_stage_3"'),
                 ('precision: "32-true"', 'precision: "bf16-mixed"'), ("device: cpu", "device: cuda")):
        text = text.replace(a, b)
    y.write_text(text)
    run = load_lightning_config(str(y), ["--data-path", str(tmp_path / "data"),
                                         "--global-batch-size", "2"], world_size=1)
    module = MegatronLlamaModule(run.cfg)
    build_trainer(run).fit(module, datamodule=MegatronDataModule(run.cfg))
    losses = [h["loss"] for h in module.history]
    assert len(losses) == 6 and losses[-1] < losses[0]


if __name__ == "__main__":
    _driver(sys.argv[1])


def test_datamodule_refuses_token_ids_beyond_vocab_size(tmp_path):
    """The shim's loaders check ids like pretrain_llama.py's: a clear ValueError naming
    --vocab-size, not an IndexError inside the embedding."""
    from test_training import make_dataset

    from megatron_lite.integrations.lightning import MegatronDataModule, load_lightning_config

    make_dataset(str(tmp_path / "data"))            # ids up to 252
    run = load_lightning_config(CONFIG, ["--data-path", str(tmp_path / "data"), "--train-iters",
                                         "2", "--global-batch-size", "1", "--vocab-size", "128"],
                                world_size=1)
    dm = MegatronDataModule(run.cfg)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"outside \[0, --vocab-size 128\)"):
        next(iter(dm.train_dataloader()))
