"""Issue 8 section 2: every bad configuration is refused by ``parse_args`` (what ``--dry-run`` and
every rank run first) before any process group exists, in ONE line that names the flag(s) and the
fix; a checkpoint of a different model shape is refused at ``--load`` naming both shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from megatron_lite.config import ConfigError, parse_args
from megatron_lite.checkpoint import engine_state as ckpt
from megatron_lite.checkpoint import layout

BASE = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
        "--micro-batch-size", "1", "--train-iters", "10", "--device", "cpu"]

# (extra flags, world size, the exact message); tiny = hidden 128, 4 heads, 2 KV groups.
CASES = {
    # TP = 8 > 2 groups is fine (each group replicated on 4 ranks); 4 heads over 8 ranks is not.
    "heads % TP": (["--tp", "8"], 8,
                   "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8; "
                   "use TP in [1, 2, 4]"),
    "hidden % heads": (["--hidden-size", "130"], 1,
                       "--hidden-size 130 is not divisible by --num-attention-heads 4; pick a head "
                       "count dividing 130 or set --kv-channels"),
    # g < TP needs TP % g == 0 (TP/g ranks share a group), g >= TP needs g % TP == 0.
    "groups vs TP": (["--num-attention-heads", "12", "--num-query-groups", "3", "--kv-channels", "16",
                      "--tp", "4"], 4,
                     "--num-query-groups 3 and --tensor-model-parallel-size (--tp) 4: one must divide "
                     "the other (TP ranks own whole KV groups, or TP/g ranks share one); use TP in "
                     "[1, 3, 6, 12]"),
    "heads % groups": (["--num-query-groups", "3"], 1,
                       "--num-attention-heads 4 is not divisible by --num-query-groups 3; use a "
                       "group count dividing 4"),
    "seq beyond positions": (["--seq-length", "8192", "--max-position-embeddings", "4096"], 1,
                             "--seq-length 8192 exceeds --max-position-embeddings 4096; raise "
                             "--max-position-embeddings or choose a --rope-scaling-type (linear, "
                             "ntk, dynamic, yarn, llama3)"),
    "global batch": (["--global-batch-size", "5"], 2,
                     "--global-batch-size 5: global batch of 5 samples (320 tokens) is not a "
                     "multiple of micro_batch_size x D = 1 x 2 = 2 samples (mu_tok x D = 128 "
                     "tokens), so A = GB_tok / (mu_tok x D) is not an integer; use a global batch "
                     "of 4 samples (256 tokens) or change --micro-batch-size/--tp"),
    "global batch tokens": (["--global-batch-tokens", "100"], 1,
                            "--global-batch-tokens 100 must be a positive multiple of --seq-length "
                            "64 (e.g. 128)"),
    "world % TP": (["--tp", "2"], 3,
                   "--tensor-model-parallel-size 2 must divide the world size 3 (nproc_per_node x "
                   "nnodes); choose TP in [1, 3]"),
    "global batch 0": (["--global-batch-size", "0"], 1,
                       "--global-batch-size must be >= 1 (got 0): it is the number of samples per "
                       "optimizer step; omit it for micro_batch_size x D"),
    "TP 0": (["--tp", "0"], 1, "--tensor-model-parallel-size must be >= 1 (got 0)"),
    "negative warmup": (["--lr-warmup-tokens", "-5"], 1,
                        "--lr-warmup-tokens must be >= 0 (got -5); 0 means no warmup"),
    "kv channels 0": (["--kv-channels", "0"], 1, "--kv-channels must be >= 1 (got 0); omit it "
                      "for hidden_size / num_attention_heads"),
    "unknown flag": (["--micro-batch-sise", "2"], 1,
                     "unknown argument '--micro-batch-sise' (did you mean '--micro-batch-size' or "
                     "'--rampup-batch-size' or '--global-batch-size'?)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_config_is_one_line_naming_flag_and_fix(name):
    extra, world, message = CASES[name]
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + extra, world_size=world)
    assert str(e.value) == message
    assert "\n" not in str(e.value)
    assert not dist.is_initialized()        # refused before any process group exists


def test_seq_beyond_positions_is_fine_with_rope_scaling():
    cfg = parse_args(BASE + ["--seq-length", "8192", "--max-position-embeddings", "4096",
                             "--rope-scaling-type", "linear", "--rope-scaling-factor", "2"])
    assert cfg.model.seq_length == 8192


@pytest.mark.parametrize("body,message", [
    ("model:\n  hidden_size: 128\ntraining:\n  micro_batch_sise: 2\n",
     "{y}:4: unknown key training.micro_batch_sise (did you mean 'micro_batch_size' or "
     "'rampup_batch_size' or 'global_batch_size'?)"),
    ("modle:\n  hidden_size: 128\n",
     "{y}:1: unknown section 'modle' (did you mean 'model'?); sections are model, data, parallel, "
     "optimizer, schedule, training, checkpoint, logging, eval, cpt"),
])
def test_unknown_yaml_key_or_section_names_file_line_and_suggestion(tmp_path, body, message):
    y = str(tmp_path / "run.yaml")
    with open(y, "w") as f:
        f.write(body)
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--config", y])
    assert str(e.value) == message.format(y=y)


# Output paths are checked with the config (issue: a bad --save failed after the engine was built).
_FILE_PARENT = "{t}/afile is a file, not a folder, so nothing can be created under it; remove it " \
    "or choose another path"
PATH_CASES = {
    "empty save": (["--save", ""], "--save is an empty string (an unset shell variable?); give a "
                   "path, or leave --save out"),
    "save is a file": (["--save", "{t}/afile"], "--save {t}/afile: exists and is a file, not a "
                       "folder; remove it or choose another path"),
    "save under a file": (["--save", "{t}/afile/sub"], "--save {t}/afile/sub: " + _FILE_PARENT),
    "tensorboard under a file": (["--tensorboard-dir", "{t}/afile/tb"],
                                 "--tensorboard-dir {t}/afile/tb: " + _FILE_PARENT),
    "metrics file under a file": (["--metrics-file", "{t}/afile/deep/m.jsonl"],
                                  "--metrics-file {t}/afile/deep/m.jsonl: " + _FILE_PARENT),
    "metrics file is a folder": (["--metrics-file", "{t}/adir"], "--metrics-file {t}/adir: is a "
                                 "folder, not a file; give a file path (a new name inside it, say)"),
    "cache is a file": (["--data-cache-path", "{t}/afile"], "--data-cache-path {t}/afile: exists "
                        "and is a file, not a folder; remove it or choose another path"),
    "broken symlink": (["--save", "{t}/dangling"], "--save {t}/dangling: exists and is a broken "
                       "symlink, not a folder; remove it or choose another path"),
}


def _path_fixture(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "dangling"))
    return sorted(os.listdir(tmp_path))


@pytest.mark.parametrize("name", list(PATH_CASES))
def test_bad_output_path_is_refused_at_validation(tmp_path, name):
    before = _path_fixture(tmp_path)
    extra, message = PATH_CASES[name]
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + [a.format(t=tmp_path) for a in extra])
    assert str(e.value) == message.format(t=tmp_path)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, no probe left behind


def test_good_output_paths_pass_and_create_nothing(tmp_path):
    before = _path_fixture(tmp_path)
    cfg = parse_args(BASE + ["--save", str(tmp_path / "a" / "b" / "ckpt"), "--tensorboard-dir",
                             str(tmp_path / "adir"), "--metrics-file",
                             str(tmp_path / "m" / "metrics.jsonl"), "--data-cache-path",
                             str(tmp_path / "adir" / "cache")])
    assert cfg.checkpoint.save == str(tmp_path / "a" / "b" / "ckpt")
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "adir") == []


def test_output_folder_that_refuses_new_entries(tmp_path, monkeypatch):
    """/proc refuses mkdir even to root (for whom os.access says yes): the probe catches it; a
    folder os.access calls unwritable is refused without a probe; an existing read-only
    --data-cache-path is allowed (a prebuilt index cache is only read)."""
    from megatron_lite.config import checks as validate

    if os.path.isdir("/proc/self"):
        with pytest.raises(ConfigError) as e:
            parse_args(BASE + ["--save", "/proc/ck"])
        assert str(e.value).startswith("--save /proc/ck: cannot be created: the folder /proc ")
        assert str(e.value).endswith("; choose a folder you can write to, or fix its permissions")
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(validate.os, "access",
                        lambda p, m: False if p == str(tmp_path / "ro") else real(p, m))
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--save", str(tmp_path / "ro" / "x")])
    assert str(e.value) == (f"--save {tmp_path}/ro/x: cannot be created: the folder {tmp_path}/ro "
                            "is not writable by this user; choose a folder you can write to, or "
                            "fix its permissions")
    with pytest.raises(ConfigError, match=f"^--tensorboard-dir {tmp_path}/ro: the folder "):
        parse_args(BASE + ["--tensorboard-dir", str(tmp_path / "ro")])
    parse_args(BASE + ["--data-cache-path", str(tmp_path / "ro")])


def test_dry_run_prints_one_line_error_and_exits_2():
    """The real entrypoint with --dry-run: status 2, the one-line message, no traceback."""
    out = subprocess.run([sys.executable, "pretrain_llama.py", *BASE, "--tp", "2", "--dry-run"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, WORLD_SIZE="3", PYTHONPATH=os.getcwd()))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "pretrain_llama.py: error: " + CASES["world % TP"][2]]


def _saved(tmp_path, **flags):
    """A checkpoint folder whose run_config.json is a run with ``flags`` (the weights do not matter:
    the shape check runs before DeepSpeed reads any file)."""
    extra = [x for k, v in flags.items() for x in (k, v)]
    saved = parse_args(BASE + ["--data-path", "x"] + extra)
    d = os.path.join(str(tmp_path), "iter_0000003")
    os.makedirs(d)
    with open(os.path.join(d, "run_config.json"), "w") as f:
        json.dump({"config": saved.to_dict()}, f)
    with open(os.path.join(d, "trainer_state.json"), "w") as f:
        json.dump({"zero_stage": 1, "data_parallel_size": 1, "world_size": 1}, f)
    layout.write_manifest(d)


def test_resume_with_different_model_shape_names_both_shapes_and_flag(tmp_path):
    from megatron_lite.training.step import TrainState

    _saved(tmp_path, **{"--num-layers": "2", "--ffn-hidden-size": "352"})
    now = parse_args(BASE + ["--data-path", "x", "--num-layers", "3", "--load", str(tmp_path)])
    with pytest.raises(ValueError) as e:
        ckpt.load_checkpoint(None, now, TrainState(), None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path}/iter_0000003 does not match this run's model: "
                          f"--num-layers: checkpoint 2, this run 3")
    assert "checkpoint shape: hidden 128, layers 2, heads 4, groups 2, ffn 352, padded vocab 256" \
        in msg and "this run: hidden 128, layers 3, heads 4, groups 2, ffn 352, padded vocab 256" \
        in msg
    assert "run_config.json" in msg          # where to read the checkpoint's values
