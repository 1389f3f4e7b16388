"""The recipe as files: every YAML loads, validates and plans; models instantiate on the meta device
with the recipe's parameter counts; DeepSpeed JSONs are valid; example scripts are bash -n clean and
validate with --dry-run."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.model.model_config import ModelConfig
from megatron_lite.model.counting import num_parameters
from megatron_lite.model.llama import LlamaModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
import plan_run  # noqa: E402

YAMLS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

# Recipe chapter 11: (GB_tok, μ_batch, peak LR, warmup tokens, recompute) per size and context.
RECIPE = {
    "pretrain_3b_4k": (2097152, 8, 4096, 3.0e-4, 2e9, None),
    "pretrain_7b_4k": (4194304, 4, 4096, 3.0e-4, 3e9, "full"),
    "pretrain_13b_4k": (4194304, 2, 4096, 1.5e-4, 3e9, "full"),
    "pretrain_3b_8k_yarn": (2097152, 4, 8192, 3.0e-4, 2e9, "full"),
    "pretrain_7b_8k_yarn": (4194304, 2, 8192, 3.0e-4, 3e9, "full"),
    "pretrain_13b_8k_yarn": (4194304, 1, 8192, 1.5e-4, 3e9, "full"),
}


def test_every_recipe_config_exists():
    names = {os.path.basename(p)[:-5] for p in YAMLS}
    assert set(RECIPE) | {"cpt_7b"} <= names
    for n in (1, 2, 3):
        assert os.path.exists(os.path.join(ROOT, "configs", f"deepspeed_zero{n}.json"))
    assert os.path.exists(os.path.join(ROOT, "configs", "deepspeed_zero3_offload.json"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: os.path.basename(p))
def test_yaml_loads_validates_and_plans(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # deepspeed_config paths are relative to the repository root
    name = os.path.basename(path)[:-5]
    cfg = load_config(os.path.relpath(path, ROOT), world_size=64)
    d = cfg.derived
    cp = cfg.parallel.context_parallel_size  # D = 64 / (TP x CP): 8, or 2 for the 32k CP example
    assert d.data_parallel_size == 64 // (cfg.parallel.tensor_model_parallel_size * cp) == (8 if cp == 1 else 2)
    assert d.precision == "bf16"
    # the recipe's shared values
    assert cfg.optimizer.min_lr == pytest.approx(0.1 * cfg.optimizer.lr)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (0.1, 1.0)
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2, cfg.optimizer.adam_eps) == \
        (0.9, 0.95, 1e-8)
    assert cfg.schedule.lr_decay_style == "cosine"
    if name in RECIPE:
        gb, mb, seq, lr, warm, rc = RECIPE[name]
        assert (d.global_batch_tokens, cfg.training.micro_batch_size, cfg.model.seq_length) == \
            (gb, mb, seq)
        assert cfg.optimizer.lr == lr and cfg.schedule.lr_warmup_tokens == warm
        assert cfg.model.recompute_granularity == rc
        assert cfg.schedule.train_tokens == 10 ** 12
        # A by the definition, D = 64 / TP = 8: 2M/(32k·8) = 8, 4M/(16k·8) = 32, 4M/(8k·8) = 64
        assert d.num_micro_batches == gb // (mb * seq * 8)
        assert d.num_micro_batches == {2097152: 8, 4194304: 4194304 // (mb * seq * 8)}[gb]
        if seq == 8192:
            assert (cfg.model.rope_scaling_type, cfg.model.rope_scaling_factor,
                    cfg.model.rope_original_max_position_embeddings) == ("yarn", 2.0, 4096)
    plan = plan_run.plan_from_argv(["--config", os.path.relpath(path, ROOT), "--gpus", "64",
                                    "--gpu", "h100", "--mfu", "0.45"])
    assert plan["fits"] and plan["max_micro_batch_size"] >= cfg.training.micro_batch_size
    assert plan["grad_accum_steps"] == d.num_micro_batches
    assert plan["steps"] == d.train_iters
    # the recipe's table reading (all 64 GPUs as D) is flagged when it differs
    assert plan["recipe_table_grad_accum_steps"] == d.num_micro_batches * d.data_parallel_size / 64
    assert any("chapter-11 table" in n for n in plan["notes"])


def test_long_context_configs_dry_run(monkeypatch, capsys):
    """Issue 16 #4: the 13B 8k YaRN config trains with sequence parallelism; the 32k CPT example
    (7B, TP=8, CP=4, SP) validates its layout with --dry-run and fits 64 x H100."""
    import pretrain_llama

    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/pretrain_13b_8k_yarn.yaml", world_size=64)
    assert cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 8
    monkeypatch.setenv("WORLD_SIZE", "64")
    monkeypatch.setenv("RANK", "0")
    assert pretrain_llama.main(["--config", "configs/cpt_7b_32k_cp.yaml", "--dry-run", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "world size              : 64  (TP 8 x CP 4 x D 2, PP 1)" in out
    assert "context parallel CP     : 4  (8192 of each sample's 32768 tokens per rank" in out
    assert "grad accumulation A     : 64" in out
    assert "fp32 logits 8192 x 4096 = 128.0 MiB per rank" in out  # the LM head sees s/CP tokens
    cp_cfg = load_config("configs/cpt_7b_32k_cp.yaml", world_size=64)
    assert cp_cfg.parallel.sequence_parallel and cp_cfg.parallel.context_parallel_size == 4
    assert out.rstrip().splitlines()[-1].split(": ")[-1].startswith("FITS")
    # the layout is validated: 64 GPUs do not split into TP 8 x CP 3
    assert pretrain_llama.main(["--config", "configs/cpt_7b_32k_cp.yaml", "--dry-run",
                                "--context-parallel-size", "3"]) == 2
    assert "--context-parallel-size 3 x --tensor-model-parallel-size 8 must divide the world size 64" \
        in capsys.readouterr().err


@pytest.mark.parametrize("size,groups,want", [
    ("3b", None, 4_169_936_000),
    ("7b", None, 5_933_109_248),    # the 7b preset: 8 KV groups (GQA)
    ("7b", 32, 6_738_415_616),      # LLaMA-7B MHA: the recipe's 2VH + H + L(4H² + 3HH' + 2H)
    ("13b", None, 11_338_142_720),
])
def test_meta_device_parameter_counts(size, groups, want):
    cfg = ModelConfig(model_size=size, vocab_size=32000, num_query_groups=groups)
    cfg.validate(1)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == want == num_parameters(cfg)[1]
    if groups == 32:
        v, h, L, f = 32000, 4096, 32, 11008
        assert n == 2 * v * h + h + L * (4 * h * h + 3 * h * f + 2 * h)
        assert round(n / 1e9, 1) == 6.7


def test_deepspeed_jsons_valid_and_filled(monkeypatch):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from megatron_lite.training.deepspeed_engine import build_ds_config

    monkeypatch.chdir(ROOT)
    for name, stage, offload in (("deepspeed_zero1", 1, False), ("deepspeed_zero2", 2, False),
                                 ("deepspeed_zero3", 3, False),
                                 ("deepspeed_zero3_offload", 3, True)):
        path = f"configs/{name}.json"
        with open(path) as f:
            raw = json.load(f)
        cfg = load_config("configs/pretrain_7b_4k.yaml", {"deepspeed_config": path,
                                                          "zero_stage": stage}, world_size=64)
        from megatron_lite.config.deepspeed_json import reconcile_user_json
        reconcile_user_json(cfg)
        assert (cfg.parallel.offload_optimizer, cfg.parallel.offload_params) == (offload, offload)
        ds = build_ds_config(cfg)
        assert ds["train_batch_size"] == 1024 and ds["gradient_accumulation_steps"] == 32
        assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["bf16"]["enabled"] is True
        assert raw["gradient_clipping"] == ds["gradient_clipping"] == 1.0
        zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # rejects unknown keys
        assert int(zero.stage) == stage


EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "pretrain_*.sh")))


def test_example_scripts_exist_and_bash_n_clean():
    names = {os.path.basename(p) for p in EXAMPLES}
    want = {f"pretrain_{s}_{c}.sh" for s in ("3b", "7b", "13b") for c in ("4k", "8k")}
    assert want | {"pretrain_single_node.sh", "pretrain_tiny_cpu.sh"} <= names
    for p in EXAMPLES + [os.path.join(ROOT, "examples", "common_launch.sh")]:
        r = subprocess.run(["bash", "-n", p], capture_output=True, text=True)
        assert r.returncode == 0, (p, r.stderr)


def _check_plan_output(name: str, out: str) -> None:
    assert "resolved plan" in out
    if name == "pretrain_tiny_cpu.sh":
        assert "TP 2 x D 1" in out
    elif name == "pretrain_single_node.sh":
        assert "TP 8 x D 1" in out and "grad accumulation A     : 256" in out
    else:
        assert "world size              : 64  (TP 8 x D 8" in out
        size = name.split("_")[1]
        mb = {"3b": 8, "7b": 4, "13b": 2}[size] // (2 if "_8k" in name else 1)
        assert f"micro batch             : {mb} samples" in out


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATA_PATH", "TOKENIZER_MODEL", "WORLD_SIZE", "NNODES", "SLURM_NNODES",
                        "GPUS_PER_NODE", "NPROC")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: os.path.basename(p))
def test_example_script_dry_run_arguments(script, monkeypatch, capsys):
    """Each script's --dry-run branch, with the python launch replaced by an in-process call of
    pretrain_llama.main on exactly the arguments and world size the script would use (one torch
    import for all scripts instead of one per script)."""
    import pretrain_llama

    r = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True,
                       env={**_clean_env(), "ML_PRINT_CMD": "1"}, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("WORLD_SIZE=") and "--dry-run" in lines
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", lines[0].split("=", 1)[1])
    monkeypatch.setenv("RANK", "0")
    assert pretrain_llama.main(lines[1:]) == 0
    _check_plan_output(os.path.basename(script), capsys.readouterr().out)


@pytest.mark.slow
def test_example_script_dry_run_end_to_end():
    """One script launched for real with --dry-run (python started by the script itself)."""
    script = os.path.join(ROOT, "examples", "pretrain_7b_4k.sh")
    r = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True,
                       env=_clean_env(), cwd="/", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_plan_output("pretrain_7b_4k.sh", r.stdout)


def test_example_script_refuses_to_train_without_data():
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_MODEL")}
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_7b_4k.sh")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "set DATA_PATH" in r.stderr


def test_example_script_launches_torchrun_with_signal_forwarding(tmp_path):
    """The training branch execs torchrun (so the scheduler's signal reaches the agent), asks it
    to forward SIGUSR1, logs the console to RUN_DIR, and returns torchrun's exit status. A stub
    torchrun first in PATH records its arguments and process id."""
    stub = tmp_path / "bin" / "torchrun"
    stub.parent.mkdir()
    stub.write_text("#!/usr/bin/env bash\necho \"stub pid $$ ppid $PPID\"\n"
                    "printf '%s\\n' \"$@\" > \"$STUB_ARGS\"\nexit 3\n")
    stub.chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**_clean_env(), "PATH": f"{stub.parent}:{os.environ['PATH']}", "NNODES": "2",
           "NODE_RANK": "1", "GPUS_PER_NODE": "4", "DATA_PATH": "0.3 /d/a 0.7 /d/b",
           "TOKENIZER_MODEL": "/t/spm.model", "RUN_DIR": str(run_dir),
           "STUB_ARGS": str(tmp_path / "args.txt")}
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "pretrain_7b_4k.sh"),
                             "--lr", "2e-4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[args.index("--signals-to-handle") + 1].split(",")[-1] == "SIGUSR1"
    assert args[args.index("--nnodes") + 1] == "2" and args[args.index("--node_rank") + 1] == "1"
    assert args[args.index("--nproc_per_node") + 1] == "4"
    i = args.index("pretrain_llama.py")
    assert args[i + 1:i + 3] == ["--config", "configs/pretrain_7b_4k.yaml"]
    assert args[args.index("--data-path") + 1:][:4] == ["0.3", "/d/a", "0.7", "/d/b"]
    assert args[-2:] == ["--lr", "2e-4"]
    # exec: torchrun runs as the script's own process (pid of bash), not as a child
    pid = int(out.split("stub pid ")[1].split()[0])
    assert pid == proc.pid
    log = run_dir / "train_node1.log"
    assert "stub pid" in log.read_text() and "torchrun x 4" in log.read_text()


def test_quickstart_refuses_other_steps_over_an_existing_run(tmp_path):
    """A rerun resumes OUT/ckpt; another --steps would change that run's schedule: refused
    before anything is installed or run, with the ways out."""
    ck = tmp_path / "ckpt" / "iter_0000060"
    ck.mkdir(parents=True)
    (ck / "run_config.json").write_text(json.dumps({"config": {"derived": {"train_iters": 60}}}))
    (tmp_path / "ckpt" / "latest").write_text("iter_0000060")
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), "--steps", "64",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{tmp_path}/ckpt holds a --steps 60 run" in r.stderr and "--out DIR" in r.stderr


_QS_USAGE = "(usage: bash examples/quickstart.sh [--steps N] [--out DIR] [--corpus FILE.jsonl])"
_CPT_USAGE = ("(usage: bash examples/cpt_cpu.sh [--steps N] [--base DIR] [--base-steps N] "
              "[--out DIR])")


@pytest.mark.parametrize("script,args,message", [
    ("quickstart.sh", ["--steps"], "--steps needs a value"),
    ("quickstart.sh", ["--out", "{t}/o", "--steps", "--corpus", "c"], "--steps needs a value"),
    ("quickstart.sh", ["--corpus"], "--corpus needs a value"),
    ("quickstart.sh", ["--steps", "ten"], "--steps must be a positive whole number of steps "
                                          "(got 'ten')"),
    ("quickstart.sh", ["--steps", "0"], "--steps must be a positive whole number of steps "
                                        "(got '0')"),
    ("quickstart.sh", ["--corpus", "{t}/nonexistent.jsonl", "--out", "{t}/o"],
     "--corpus {t}/nonexistent.jsonl: no such readable file (give a JSON-lines file with a "
     "\"text\" field)"),
    ("quickstart.sh", ["--out", "{t}/afile"], "--out {t}/afile exists and is not a folder; "
                                              "choose another --out DIR"),
    ("quickstart.sh", ["--step", "5"], "unknown option '--step'"),
    ("cpt_cpu.sh", ["--base-steps"], "--base-steps needs a value"),
    ("cpt_cpu.sh", ["--base", "--out", "{t}/o"], "--base needs a value"),
    ("cpt_cpu.sh", ["--steps", "-3"], "--steps must be a positive whole number of steps "
                                      "(got '-3')"),
    ("cpt_cpu.sh", ["--out", "{t}/afile"], "--out {t}/afile exists and is not a folder; choose "
                                           "another folder"),
    ("cpt_cpu.sh", ["--bogus"], "unknown option '--bogus'"),
])
def test_cpu_walkthrough_scripts_refuse_bad_options_in_one_line(tmp_path, script, args, message):
    """A missing value or a bad one is a one-line usage error with status 2 (not bash's
    '$2: unbound variable'), found before anything is installed, created or run."""
    (tmp_path / "afile").write_text("x")
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", script),
                        *[a.format(t=tmp_path) for a in args]],
                       capture_output=True, text=True, timeout=60)
    usage = _QS_USAGE if script == "quickstart.sh" else _CPT_USAGE
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"{script}: error: {message.format(t=tmp_path)} {usage}"]
    assert r.stdout == "" and sorted(os.listdir(tmp_path)) == ["afile"]  # no --out left behind
