"""A new user's first hour (issue 15, "habits"): from a fresh clone, in a shell with no venv
activated, the README's tool commands exit as documented, print no Python traceback and no warning
about the project's own shipped files, and write files the group and others can read.

Slow: a clone, a handful of tool processes (each imports torch) and a tiny tokenizer/data pipeline
(about a minute on 2 cores). The clone reuses this checkout's ``.venv`` (a symlink) and its built
extensions (copied) instead of running ``scripts/setup_env.sh`` again, which would take minutes.

A very short training run (tiny model, 3 steps, started with the bare ``python3``) stands in for
the quickstart (minutes of two-process training, evaluation and sampling on 2 cores): its
checkpoint line and closing summary name paths that exist, its warnings are one line, and a dry
run refuses a missing data path in one line and ends with the planner's memory verdict.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")) or not os.path.isdir(VENV),
                       reason="needs a git checkout with its .venv (scripts/setup_env.sh)"),
]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed project with this checkout's .venv and extensions."""
    dest = tmp_path_factory.mktemp("newcomer") / "megatron_lite"
    subprocess.run(["git", "clone", "-q", ROOT, str(dest)], check=True)
    os.symlink(VENV, dest / ".venv")
    for so in glob.glob(os.path.join(ROOT, "megatron_lite", "*.so")):
        shutil.copy(so, dest / "megatron_lite")
    return dest


def _fresh_env():
    """A new login shell's environment: no venv on PATH, no VIRTUAL_ENV, no PYTHONPATH."""
    venv_bin = os.path.realpath(os.path.join(VENV, "bin"))
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and os.path.realpath(p) != venv_bin and os.path.realpath(p) !=
            os.path.realpath(os.path.dirname(sys.executable))]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def run(clone, command: str, expect: int = 0) -> subprocess.CompletedProcess:
    """``command`` in bash under umask 022 in the clone; checks the status and that no Python
    traceback and no warning about a shipped config was printed."""
    r = subprocess.run(["bash", "-c", f"umask 022 && {command}"], cwd=clone, env=_fresh_env(),
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == expect, (command, out[-3000:])
    assert "Traceback (most recent call last)" not in out, (command, out[-3000:])
    for shipped in ("deepspeed_zero", "configs/"):
        assert not any("warn" in ln.lower() and shipped in ln for ln in out.splitlines()), \
            (command, out[-3000:])
    return r


def _modes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): oct(os.stat(os.path.join(d, f)).st_mode & 0o777)
            for d, _, files in os.walk(folder) for f in files}


def test_documented_tool_commands_in_a_fresh_shell(clone):
    # the README's pipeline table, with the planner's and Chinchilla's own examples
    r = run(clone, "python3 tools/plan_run.py --config configs/pretrain_7b_4k.yaml --gpus 64 "
                   "--gpu h100 --mfu 0.45 --price-gpu-hour 15")
    assert "FLOPs_train exact (6·N·T)" in r.stdout
    run(clone, "python3 tools/chinchilla.py --help")
    run(clone, "bash examples/pretrain_7b_4k.sh --dry-run")


def test_tiny_pipeline_outputs_are_readable_by_others(clone, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                              for i in range(300)), encoding="utf-8")
    out = tmp_path / "out"
    run(clone, f"python3 tools/train_tokenizer.py --input {corpus} --model-prefix {out}/tok/spm "
               f"--vocab-size 300 --num-threads 1")
    run(clone, f"python3 tools/preprocess_data.py --input {corpus} --json-keys text "
               f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {out}/tok/spm.model "
               f"--output-prefix {out}/data/c --workers 1 --append-eod")
    run(clone, f"python3 tools/inspect_data.py --data-path {out}/data/c_text_document "
               f"--seq-length 16 --index 0 --tokenizer-model {out}/tok/spm.model "
               f"--data-cache-path {out}/cache --json")
    modes = _modes(out)
    assert len(modes) >= 9 and set(modes.values()) == {"0o644"}, modes


def test_bad_input_is_one_line_and_leaves_nothing(clone, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": nope}\n', encoding="utf-8")
    r = run(clone, f"python3 tools/preprocess_data.py --input {bad} --tokenizer-type "
                   f"SentencePieceTokenizer --tokenizer-model {clone}/tests/data/none.model "
                   f"--output-prefix {tmp_path}/new/web", expect=2)
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("preprocess_data.py: error: ")
    assert not (tmp_path / "new").exists()


TINY_RUN = ("--model-size tiny --vocab-size 256 --seq-length 64 --micro-batch-size 1 "
            "--global-batch-size 2 --split 90,10,0 --num-workers 0 --log-interval 1 "
            "--device cpu --zero-stage 0")


def test_entrypoint_help_and_dry_run_in_a_fresh_shell(clone, tmp_path):
    for cmd in ("python3 pretrain_llama.py --help", "python3 cpt_llama.py --help"):
        assert run(clone, cmd).stdout.startswith("usage: ")
    # the README's Lightning dry run, started as `python -m` with the bare python3
    r = run(clone, "python3 -m megatron_lite.integrations.lightning --config "
                   "configs/lightning/tiny_cpu.yaml --dry-run")
    assert "resolved plan" in r.stdout and "lightning.Trainer(" in r.stdout
    missing = tmp_path / "does_not_exist" / "train_text_document"
    r = run(clone, f"python3 pretrain_llama.py --dry-run {TINY_RUN} --train-iters 5 "
                   f"--data-path {missing}", expect=2)
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"pretrain_llama.py: error: --data-path {missing}: ")
    assert "tools/preprocess_data.py" in r.stderr
    r = run(clone, f"python3 pretrain_llama.py --dry-run {TINY_RUN} --train-iters 5")
    last = r.stdout.splitlines()[-1]
    assert last.startswith("dry run: nothing was launched; planned memory per device on ") \
        and ": FITS (" in last, last


def test_short_training_run_summary_paths_exist_and_warnings_are_one_line(clone, tmp_path):
    import re

    # a tiny learnable corpus (.bin/.idx), written by the tests' own helper with the venv's Python
    run(clone, ".venv/bin/python -c 'import sys; sys.path.insert(0, \".\"); from "
               f"tests.test_training import make_dataset; make_dataset(\"{tmp_path}/data\")'")
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    ck.mkdir()
    r = run(clone, f"python3 pretrain_llama.py {TINY_RUN} --train-iters 3 --eval-interval 3 "
                   f"--eval-iters 1 --data-path {tmp_path}/data --save {ck} --load {ck} "
                   f"--save-interval 3 --tensorboard-dir {tb}")
    out, err = r.stdout, r.stderr
    assert "UserWarning" not in err and "[megatron_lite] warning: --load " in err, err
    assert re.search(rf"^\[checkpoint\] saved iteration 3 to {re.escape(str(ck))}/iter_0000003 "
                     r"\([\d.]+ MB, [\d.]+ s\)$", out, re.M), out
    summary = out[out.index("---------------- training summary"):].splitlines()[1:-1]
    fields = {k.strip(): v for k, v in (ln.split(" : ", 1) for ln in summary)}
    for key in ("checkpoint", "metrics.jsonl", "TensorBoard"):
        assert os.path.exists(fields[key]), (key, fields[key])
    assert fields["view the curves"] == f"tensorboard --logdir {tb}"
    modes = _modes(ck)
    assert modes and set(modes.values()) == {"0o644"}, modes
