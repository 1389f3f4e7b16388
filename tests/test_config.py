"""RunConfig: flags, YAML, precedence, derived batch arithmetic, clear errors, round trips."""

import json
import subprocess
import sys

import pytest
import torch

from megatron_lite.config import ConfigError, RunConfig, build_parser, load_config, parse_args
from megatron_lite.training.deepspeed_engine import build_ds_config

BASE = ["--model-size", "tiny", "--vocab-size", "1000", "--seq-length", "128", "--train-iters", "10"]


def test_batch_arithmetic_from_tokens():
    # world 8, TP 2 -> D 4; mu_tok = 2 * 128 = 256; GB_tok 8192 -> GB 64 samples, A = 8192 / (256*4) = 8
    cfg = parse_args(BASE + ["--tp", "2", "--micro-batch-size", "2", "--global-batch-tokens", "8192"],
                     world_size=8)
    d = cfg.derived
    assert (d.data_parallel_size, d.micro_batch_tokens, d.global_batch_size, d.num_micro_batches) == \
        (4, 256, 64, 8)
    assert d.global_batch_tokens == 8192 and d.train_tokens == 81920
    assert d.padded_vocab_size == 1024 and d.head_dim == 32   # 1000 -> multiple of 128 * TP 2


def test_train_tokens_and_warmup_tokens():
    argv = [a for a in BASE if a not in ("--train-iters", "10")]
    cfg = parse_args(argv + ["--global-batch-size", "4", "--train-tokens", "5000",
                             "--lr-warmup-tokens", "1000"], world_size=2)
    # GB_tok = 512; ceil(5000/512) = 10 steps; warmup ceil(1000/512) = 2
    assert cfg.derived.train_iters == 10 and cfg.derived.lr_warmup_iters == 2
    assert cfg.derived.num_micro_batches == 2
    cfg = parse_args(BASE + ["--lr-warmup-fraction", "0.25", "--lr-decay-iters", "9"])
    assert cfg.derived.lr_warmup_iters == 2 and cfg.derived.lr_decay_iters == 9


def test_recipe_defaults():
    cfg = parse_args(BASE[:-1] + ["1000", "--lr", "2e-4"])
    o = cfg.optimizer
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == \
        (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert o.min_lr == pytest.approx(2e-5)                      # cosine to 10% of peak
    assert cfg.schedule.lr_decay_style == "cosine"
    assert cfg.derived.lr_warmup_iters == 10                     # 1% of 1000 steps
    assert cfg.derived.precision == ("bf16" if torch.cuda.is_available() else "fp32")
    assert parse_args(BASE + ["--fp32"]).derived.precision == "fp32"
    assert parse_args(BASE + ["--bf16"]).derived.precision == "bf16"


@pytest.mark.parametrize("extra,world,match", [
    (["--global-batch-tokens", "1000"], 1, "multiple of --seq-length 128"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "A = GB_tok"),
    (["--global-batch-size", "3"], 2, "use a global batch of 4 samples"),
    (["--tp", "3"], 4, "must divide the world size"),
    (["--pp", "2"], 2, "pipeline"),
    (["--bf16", "--fp16"], 1, "exclusive"),
    (["--bf16", "--fp32"], 1, "exclusive"),
    (["--train-tokens", "100"], 1, "exactly one of --train-iters"),
    (["--lr-warmup-iters", "20"], 1, "warmup"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], 1, "at most one"),
    (["--offload-params"], 1, "--zero-stage 3"),
    (["--lr-decay-style", "wsd"], 1, "--lr-wsd-decay-iters"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "min-lr"),
    (["--save-interval", "5"], 1, "--save DIR"),
    (["--tp", "8"], 8, "num-attention-heads 4 is not divisible"),
])
def test_bad_configs(extra, world, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(BASE + extra, world_size=world)


def test_unknown_flag_did_you_mean():
    with pytest.raises(ConfigError, match=r"did you mean '--micro-batch-size'"):
        parse_args(BASE + ["--micro-batch-sise", "2"])
    with pytest.raises(ConfigError, match="invalid choice"):
        parse_args(BASE + ["--lr-decay-style", "step"])


def test_yaml_precedence_and_errors(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  model_size: tiny\n  vocab_size: 1000\n  seq_length: 64\n"
                 "optimizer:\n  lr: 1.0e-3\n  min_lr: 1e-4\nschedule:\n  train_iters: 5\n"
                 "parallel:\n  tensor_model_parallel_size: 1\n")
    cfg = parse_args(["--config", str(y), "--lr", "2e-3"])
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.min_lr == 1e-4   # flag beats YAML
    assert cfg.model.seq_length == 64 and cfg.derived.train_iters == 5
    cfg2 = load_config(str(y), {"lr": 5e-4, "training.micro_batch_size": 2})
    assert cfg2.optimizer.lr == 5e-4 and cfg2.training.micro_batch_size == 2
    assert load_config(str(y), ["--zero-stage", "2"]).parallel.zero_stage == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model_size: tiny\n  vocab_size: 1000\noptimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: unknown key optimizer.lrr \(did you mean 'lr'"):
        parse_args(["--config", str(bad)])
    bad.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:1: unknown section 'optimiser' \(did you mean 'optimizer'"):
        parse_args(["--config", str(bad)])
    bad.write_text("training:\n  micro_batch_size: two\n")
    with pytest.raises(ConfigError, match="expected int"):
        parse_args(["--config", str(bad)])


def test_round_trip_dict():
    cfg = parse_args(BASE + ["--tp", "2", "--zero-stage", "3", "--lr", "1e-3"], world_size=4)
    d = json.loads(json.dumps(cfg.to_dict()))
    back = RunConfig.from_dict(d)
    assert back.to_dict() == cfg.to_dict()
    assert back.derived.data_parallel_size == 2


def test_boolean_flags_including_no_prefixed_ones():
    cfg = parse_args(BASE + ["--no-load-optim", "--no-shuffle", "--offload-optimizer",
                             "--no-exit-signal-handler"])
    assert cfg.checkpoint.no_load_optim is True and cfg.data.no_shuffle is True
    assert cfg.parallel.offload_optimizer is True and cfg.training.exit_signal_handler is False
    cfg = parse_args(BASE + ["--no-mmap-bin-files", "--bf16", "--no-bf16"])
    assert cfg.data.mmap_bin_files is False and cfg.training.bf16 is False
    assert parse_args(BASE).checkpoint.no_load_optim is False
    # Megatron-LM's spelling and the CPT-style alias set the same field
    for flag in ("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                 "--override-scheduler"):
        assert parse_args(BASE + [flag]).schedule.override_opt_param_scheduler is True
    assert parse_args(BASE).schedule.override_opt_param_scheduler is False


def test_saved_config_yaml_relaunches_the_same_run(tmp_path):
    import yaml

    cfg = parse_args(BASE + ["--tp", "2", "--lr", "1e-3", "--global-batch-tokens", "1024"],
                     world_size=4)
    y = tmp_path / "config.yaml"
    y.write_text(yaml.safe_dump(cfg.to_dict()))
    assert parse_args(["--config", str(y)], world_size=4).to_dict() == cfg.to_dict()


def test_every_flag_has_help_and_is_unique():
    p = build_parser()
    seen = set()
    for a in p._actions:
        for o in a.option_strings:
            assert o not in seen
            seen.add(o)
        if a.option_strings and a.dest not in ("help",):
            assert a.help and len(a.help) > 10, a.option_strings
    assert {"--tp", "--tensor-model-parallel-size", "--global-batch-tokens", "--zero-stage",
            "--lr-decay-style", "--save", "--load", "--exit-interval", "--keep-last"} <= seen


def test_deepspeed_json_template_with_autos(tmp_path):
    j = tmp_path / "ds.json"
    j.write_text("""{
  "train_micro_batch_size_per_gpu": "auto",
  "train_batch_size": "auto", // global batch (samples)
  "gradient_accumulation_steps": "auto",
  "zero_optimization": {"stage": 3, "overlap_comm": true,
     "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"},
  "optimizer": {"type": "PagedAdamW", "params": {"lr": "auto"}},
  "bf16": {"enabled": "auto"},
  "gradient_clipping": 1.0
}""")
    cfg = parse_args(BASE + ["--deepspeed-config", str(j), "--global-batch-size", "8",
                             "--micro-batch-size", "2"], world_size=2)
    assert cfg.parallel.zero_stage == 3          # adopted from the JSON
    with pytest.warns(UserWarning, match="optimizer"):
        ds = build_ds_config(cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (2, 2, 8)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 128 * 128)
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds
    j.write_text('{"train_batch_size": 16}')
    cfg = parse_args(BASE + ["--deepspeed-config", str(j), "--global-batch-size", "8"])
    with pytest.raises(ValueError, match="train_batch_size=16 contradicts"):
        build_ds_config(cfg)


def test_machine_dependent_checks_run_at_start_not_in_finalize():
    from megatron_lite.config.checks import check_runtime

    cfg = parse_args(BASE + ["--fp16", "--device", "cpu"])      # plannable anywhere
    with pytest.raises(ConfigError, match="--fp16 is not supported on CPU"):
        check_runtime(cfg)


def test_cli_dry_run_and_error_exit():
    out = subprocess.run([sys.executable, "pretrain_llama.py", *BASE, "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "grad accumulation A     : 1" in out.stdout and "N_params" in out.stdout
    out = subprocess.run([sys.executable, "pretrain_llama.py", *BASE, "--zero-stage", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--zero-stage" in out.stderr


def test_dry_run_without_world_size_plans_tp_times_pp(monkeypatch):
    """A plan typed outside a launcher: no WORLD_SIZE -> the smallest world TP x PP (D = 1);
    WORLD_SIZE=N plans for N. Without --dry-run an unset WORLD_SIZE still means 1 process."""
    from megatron_lite.config import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = parse_args(BASE + ["--tp", "2", "--dry-run"]).derived
    assert (d.world_size, d.data_parallel_size) == (2, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    d = parse_args(BASE + ["--tp", "2", "--dry-run", "--global-batch-size", "2"]).derived
    assert (d.world_size, d.data_parallel_size) == (4, 2)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="must divide the world size 1"):
        parse_args(BASE + ["--tp", "2"])


def test_pretrain_entrypoint_refuses_cpt_settings(capsys):
    """CPT flags share the config tree, but pretrain_llama.py would ignore them: an error."""
    import pretrain_llama

    assert pretrain_llama.main([*BASE, "--dry-run", "--freeze-layers", "0-1",
                                "--freeze-embeddings"]) == 2
    err = capsys.readouterr().err
    assert "--freeze-layers" in err and "--freeze-embeddings" in err and "cpt_llama.py" in err
    assert pretrain_llama.main([*BASE, "--dry-run"]) == 0


def test_deepspeed_json_vs_zero_flags(tmp_path, capsys):
    """A JSON stage replaces the flag default with a note; an explicit contradicting flag is an error."""
    import json as _json

    from megatron_lite.config import ConfigError, parse_args
    from megatron_lite.training.deepspeed_engine import build_ds_config

    js = tmp_path / "ds.json"
    js.write_text(_json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "auto"}}}))
    base = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2",
            "--deepspeed-config", str(js)]
    cfg = parse_args(base, world_size=1)
    assert cfg.parallel.zero_stage == 3 and not cfg.parallel.offload_optimizer
    assert "sets ZeRO stage 3" in capsys.readouterr().out
    ds = build_ds_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    cfg = parse_args(base + ["--offload-optimizer"], world_size=1)
    assert build_ds_config(cfg)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises((ConfigError, ValueError), match="--zero-stage 2 contradicts"):
        parse_args(base + ["--zero-stage", "2"], world_size=1)


def test_entrypoint_prints_bad_input_as_one_line(capsys, monkeypatch):
    """Errors raised on purpose at start (missing data file, checkpoint mismatch) -> exit 2 and
    one line; a failed save -> exit 1; MEGATRON_LITE_TRACEBACK=1 keeps the traceback."""
    from megatron_lite.checkpoint.layout import CheckpointSaveError
    from megatron_lite.entrypoints import run_entrypoint

    cfg = parse_args(BASE)

    def fail(exc):
        def train(_, **hooks):  # run_entrypoint also passes the fault-hook callbacks
            raise exc
        return train

    assert run_entrypoint("x.py", lambda: cfg, fail(FileNotFoundError("data/a.idx does not "
                                                                      "exist"))) == 2
    assert capsys.readouterr().err == "x.py: error: data/a.idx does not exist\n"
    assert run_entrypoint("x.py", lambda: cfg, fail(CheckpointSaveError("disk full"))) == 1
    assert capsys.readouterr().err == "x.py: checkpoint save failed: disk full\n"
    assert run_entrypoint("x.py", lambda: cfg, lambda c, **hooks: None) == 0
    monkeypatch.setenv("MEGATRON_LITE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="shape"):
        run_entrypoint("x.py", lambda: cfg, fail(ValueError("shape")))
    with pytest.raises(RuntimeError):  # anything else is a bug: traceback as usual
        monkeypatch.delenv("MEGATRON_LITE_TRACEBACK")
        run_entrypoint("x.py", lambda: cfg, fail(RuntimeError("bug")))
