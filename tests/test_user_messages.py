"""What a user reads (issue 15 #1, #6, #7, #9, #10): MFU's peak named in the first train line,
one-line warnings, the checkpoint-save and end-of-training lines, choices in ``--help``, input
paths checked at parse time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import megatron_lite.training.metrics as M
from megatron_lite.config.sections import LoggingConfig
from megatron_lite.training.metrics import TrainingLogger
from tests.test_first_use import BASE_PYTHON, ROOT, _fresh_shell_env, needs_bare_python


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _steps(logger, clock, n):
    out = []
    for step in range(1, n + 1):
        logger.start_interval() if step == 1 else None
        clock.t += 1.0
        out.append(logger.log_step(step, {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5,
                                          "loss_scale": None, "consumed_samples": step,
                                          "consumed_tokens": step * 1000, "skipped_steps": 0}))
    return out


def test_cpu_mfu_peak_is_measured_with_the_training_threads_and_named_once(monkeypatch):
    """#9: the CPU peak is a matmul measured with torch.get_num_threads() threads, and the first
    train line says what MFU is relative to (later lines do not repeat it)."""
    seen = []

    def fake(dtype):
        seen.append(torch.get_num_threads())
        return 0.004
    monkeypatch.setattr(M, "measure_cpu_matmul_tflops", fake)
    clock, lines = _Clock(), []
    logger = TrainingLogger(LoggingConfig(log_interval=1), 0, 1, 1e9, 1000, "cpu",
                            train_iters=3, clock=clock, print_fn=lines.append)
    assert seen == [torch.get_num_threads()]
    _steps(logger, clock, 2)
    logger.close()
    n = torch.get_num_threads()
    assert f"(vs measured matmul peak 0.004 TFLOP/s ({n} threads))" in lines[1], lines[1]
    assert "vs measured" not in lines[2] and "MFU: " in lines[2]


def test_measure_cpu_matmul_uses_the_thread_count_given():
    before = torch.get_num_threads()
    calls = []
    real_mm = torch.mm

    def mm(a, b):
        calls.append(torch.get_num_threads())
        return real_mm(a, b)
    torch.mm = mm
    try:
        assert M.measure_cpu_matmul_tflops(n=32, min_seconds=0.001, threads=1) > 0
    finally:
        torch.mm = real_mm
    assert set(calls) == {1} and torch.get_num_threads() == before


# ---- #2: the training entrypoints and the Lightning runner in a fresh shell -------------------
@pytest.mark.parametrize("cmd", [["pretrain_llama.py", "--help"], ["cpt_llama.py", "--help"],
                                 ["-m", "megatron_lite.integrations.lightning", "--help"]])
@needs_bare_python
def test_entrypoints_started_without_venv_rerun_under_it(cmd):
    r = subprocess.run([BASE_PYTHON, *cmd], capture_output=True, text=True, cwd=ROOT,
                       env=_fresh_shell_env(), timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("usage: "), r.stdout[:200]


# ---- #10: choice flags list their allowed values in --help -----------------------------------
def test_help_lists_the_choices_of_choice_flags():
    from megatron_lite.config.cli import build_parser

    text = build_parser().format_help()
    for flag, values in (("--attention-backend", "auto,flash,sdpa,flex,eager"),
                         ("--tokenizer-type", "SentencePieceTokenizer,HuggingFaceTokenizer"),
                         ("--rope-scaling-type", "none,linear,ntk,dynamic,yarn,llama3"),
                         ("--lr-decay-style", "cosine,linear,constant,inverse-square-root,wsd")):
        assert f"{flag} {{{values}}}" in text, flag


# ---- #1: every input path is checked when the flags are parsed (dry runs too) ----------------
TINY = ["--model-size", "tiny", "--vocab-size", "512", "--train-iters", "5",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "64"]


def _dataset(prefix, parts=(".bin", ".idx")):
    for ext in parts:
        open(str(prefix) + ext, "wb").close()
    return str(prefix)


def _main(argv, capsys, script="pretrain_llama"):
    """(exit status, stdout, stderr) of the entrypoint's main, in this process."""
    module = __import__(script)
    rc = module.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(argv, capsys, *pieces, script="pretrain_llama"):
    rc, out, err = _main(argv, capsys, script)
    assert rc == 2 and out == "", (rc, out, err)
    assert err.startswith(f"{script}.py: error: ") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, (piece, err)
    return err


@pytest.mark.parametrize("flag", ["--data-path", "--train-data-path", "--valid-data-path",
                                  "--test-data-path"])
def test_missing_data_prefix_is_refused_at_parse_time(tmp_path, capsys, flag, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    good = _dataset(tmp_path / "good_text_document")
    missing = str(tmp_path / "nope" / "train_text_document")
    argv = TINY + ["--data-path", "0.5", good, "0.5", missing] if flag == "--data-path" else \
        TINY + ["--data-path", good, flag, missing]
    for extra in ([], ["--dry-run"]):
        _refused(argv + extra, capsys, f"{flag} {missing}: ", f"{missing}.bin/.idx not found",
                 "tools/preprocess_data.py")


def test_data_prefix_with_extension_half_pair_or_folder(tmp_path, capsys):
    good = _dataset(tmp_path / "c_text_document")
    _refused(TINY + ["--data-path", good + ".bin", "--dry-run"], capsys,
             f"--data-path {good}.bin: give the prefix without .bin: {good}")
    half = _dataset(tmp_path / "half_text_document", parts=(".bin",))
    _refused(TINY + ["--data-path", half, "--dry-run"], capsys,
             f"{half}.idx is missing beside {half}.bin", "rerun tools/preprocess_data.py")
    _refused(TINY + ["--data-path", str(tmp_path), "--dry-run"], capsys,
             "is a folder; give the prefix of the .bin/.idx pair inside it")
    rc, out, err = _main(TINY + ["--data-path", good, "--dry-run"], capsys)
    assert rc == 0, err


def test_data_stages_file_and_its_prefixes(tmp_path, capsys):
    a, b = _dataset(tmp_path / "a_text_document"), _dataset(tmp_path / "b_text_document")
    blend = TINY + ["--data-path", a, b, "--dry-run"]
    _refused(blend + ["--data-stages", str(tmp_path / "stages.yaml")], capsys,
             f"--data-stages {tmp_path / 'stages.yaml'}: file not found")
    stages = tmp_path / "s.yaml"
    stages.write_text("- {until_tokens: 1000, weights: {" + str(tmp_path / "zz") + ": 1.0}}\n")
    _refused(blend + ["--data-stages", str(stages)], capsys, "--data-stages ", "unknown prefixes")
    stages.write_text(f"- {{until_tokens: 1000, weights: [1, 0]}}\n- {{until_tokens: 2000, "
                      f"weights: [0, 1]}}\n")
    rc, _, err = _main(blend + ["--data-stages", str(stages)], capsys)
    assert rc == 0, err


def test_missing_tokenizer_load_base_and_deepspeed_json(tmp_path, capsys):
    _refused(TINY + ["--tokenizer-model", str(tmp_path / "spm.model"), "--dry-run"], capsys,
             f"--tokenizer-model {tmp_path / 'spm.model'}: not found", "tools/train_tokenizer.py")
    _refused(TINY + ["--tokenizer-model", str(tmp_path / "spm.model")], capsys,
             "tools/train_tokenizer.py")
    _refused(TINY + ["--deepspeed-config", str(tmp_path / "ds.json"), "--dry-run"], capsys,
             f"--deepspeed-config {tmp_path / 'ds.json'}: file not found",
             "configs/deepspeed_zero1.json")
    _refused(TINY + ["--deepspeed-config", str(tmp_path), "--dry-run"], capsys, ": is a folder")
    # --load: a missing folder is a typo unless it is --save (a job's first start)
    ck = str(tmp_path / "ckpt")
    _refused(TINY + ["--load", str(tmp_path / "ckpy"), "--save", ck, "--dry-run"], capsys,
             f"--load {tmp_path / 'ckpy'}: folder not found, and it is not the --save folder",
             "leave --load out")
    _refused(TINY + ["--load", str(tmp_path / "ckpy")], capsys, "folder not found")
    (tmp_path / "file").write_text("x")
    _refused(TINY + ["--load", str(tmp_path / "file"), "--dry-run"], capsys, ": is a file")
    for load in (ck, str(tmp_path)):   # --load == --save before the first save; an empty folder
        rc, _, err = _main(TINY + ["--load", load, "--save", ck, "--dry-run"], capsys)
        assert rc == 0, err
    _refused(["--pretrained-checkpoint", str(tmp_path / "base"), "--dry-run", *TINY[2:]], capsys,
             str(tmp_path / "base"), script="cpt_llama")


def test_dry_run_ends_with_nothing_launched_and_the_memory_verdict(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rc, out, err = _main(TINY + ["--dry-run"], capsys)
    assert rc == 0, err
    last = out.splitlines()[-1]
    want = "dry run: nothing was launched; planned memory per device on " + \
        ("cpu" if not torch.cuda.is_available() else "")
    assert last.startswith(want) and ": FITS (tools/plan_run.py --gpu " in last, last
    big = ["--model-size", "7b", "--vocab-size", "32000", "--seq-length", "4096", "--bf16",
           "--train-iters", "5", "--micro-batch-size", "4", "--global-batch-size", "8"]
    rc, out, err = _main(big + ["--dry-run", "--gpu", "h100"], capsys)
    last = out.splitlines()[-1]
    assert rc == 0 and last.startswith("dry run: nothing was launched; planned memory per "
                                       "device on h100: ") and "of 80.0 GiB device memory: " \
        "DOES NOT FIT" in last, last
    # the same figure as tools/plan_run.py
    from megatron_lite.planning import memory
    from tests.fixtures_data import load_tool
    plan = load_tool("plan_run").plan_from_argv(["--gpu", "h100", "--gpus", "1"] + big)
    assert f"h100: {plan['memory_per_gpu_bytes'] / memory.GiB:.1f} GiB of" in last
    _refused(TINY + ["--dry-run", "--gpu", "h1000"], capsys, "--gpu h1000: unknown device")


# ---- #6, #7: the save line, the closing summary and one-line warnings in a tiny run -----------
def test_tiny_run_prints_save_line_summary_and_one_line_warnings(tmp_path):
    import json
    import re

    from megatron_lite.training.callbacks.checkpoint_saver import folder_bytes
    from tests.test_training import make_dataset

    make_dataset(str(tmp_path / "data"))
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    ck.mkdir()   # an empty --load folder: the run starts from scratch with a warning
    r = subprocess.run(
        [sys.executable, "pretrain_llama.py", "--model-size", "tiny", "--vocab-size", "256",
         "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2",
         "--train-iters", "3", "--split", "90,10,0", "--num-workers", "0", "--log-interval", "1",
         "--eval-interval", "2", "--eval-iters", "1", "--device", "cpu", "--zero-stage", "0",
         "--data-path", str(tmp_path / "data"), "--save", str(ck), "--load", str(ck),
         "--save-interval", "3", "--tensorboard-dir", str(tb)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    # #7: our warning is one prefixed line, not Python's "file:line: UserWarning:" + source line
    assert "UserWarning" not in r.stderr, r.stderr
    assert f"[megatron_lite] warning: --load {ck}: no complete checkpoint found; starting from " \
           "scratch\n" in r.stderr
    out = r.stdout
    # #6: the save line
    saved = ck / "iter_0000003"
    m = re.search(rf"^\[checkpoint\] saved iteration 3 to {re.escape(str(saved))} "
                  r"\(([\d.]+) MB, ([\d.]+) s\)$", out, re.M)
    assert m, out
    assert float(m.group(1)) == round(folder_bytes(str(saved)) / 1e6, 1) > 0
    # the summary, with the logger's numbers
    recs = [json.loads(ln) for ln in open(ck / "metrics.jsonl")]
    train = [x for x in recs if x["type"] == "train"]
    evals = [x for x in recs if x["type"] == "eval"]
    secs = sum(128 / x["tokens_per_sec"] for x in train)
    summary = out[out.index("---------------- training summary"):]
    lines = dict(ln.split(" : ", 1) for ln in summary.splitlines()[1:-1])
    lines = {k.strip(): v for k, v in lines.items()}
    assert lines["steps"] == "3 this run (iteration 3 of 3)"
    assert lines["tokens"] == "384 this run (384 in total)"
    tps = float(lines["throughput"].split()[0])
    assert abs(tps - 384 / secs) <= 0.05 + 1e-3 * tps, (tps, 384 / secs)
    assert re.search(r", MFU \d+\.\d\d%$", lines["throughput"])
    last, best = evals[-1], min(evals, key=lambda x: x["val_loss"])
    assert lines["validation loss"] == (f"last {last['val_loss']:.4f} (iteration {last['step']}), "
                                        f"best {best['val_loss']:.4f} (iteration {best['step']})")
    assert lines["checkpoint"] == str(saved) and saved.is_dir()
    assert lines["metrics.jsonl"] == str(ck / "metrics.jsonl")
    assert lines["TensorBoard"] == str(tb) and any(tb.iterdir())
    assert lines["view the curves"] == f"tensorboard --logdir {tb}"
    # #9: the first train line names MFU's peak
    first = next(ln for ln in out.splitlines() if ln.startswith(" iteration        1/"))
    assert "(vs measured matmul peak " in first and "(1 threads))" in first


def test_warning_format_is_one_line_for_ours_only(capsys):
    import warnings

    from megatron_lite import entrypoints

    saved, passed_on = warnings.showwarning, []
    try:
        # Python's own printer, as a recorder: what is not ours must reach it unchanged
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: passed_on.append((m, c, f))
        entrypoints.install_warning_format(rank=0)
        ours = os.path.join(entrypoints.PACKAGE_DIR, "training", "setup.py")
        theirs = "/usr/lib/python3/site-packages/x.py"
        warnings.showwarning("bf16 on CPU is\n slow", UserWarning, ours, 148)
        warnings.showwarning("theirs", UserWarning, theirs, 3)
        warnings.showwarning("old", DeprecationWarning, ours, 5)
        assert capsys.readouterr().err == "[megatron_lite] warning: bf16 on CPU is slow\n"
        assert passed_on == [("theirs", UserWarning, theirs), ("old", DeprecationWarning, ours)]
        entrypoints.install_warning_format(rank=1)   # other ranks: ours are not repeated
        warnings.showwarning("dup", UserWarning, ours, 1)
        assert capsys.readouterr().err == ""
    finally:
        warnings.showwarning = saved


# ---- a fresh-clone review: empty paths (unset shell variables), a plan that cannot be made ----
@pytest.mark.parametrize("flag", ["--load", "--tokenizer-model", "--data-stages",
                                  "--deepspeed-config", "--data-path"])
def test_empty_input_path_is_refused_not_taken_as_unset(flag, tmp_path, capsys):
    """``--load ""`` trained from scratch beside a later checkpoint and moved ``latest`` back;
    ``--tokenizer-model ""`` left the vocabulary unknown. Both are unset shell variables."""
    argv = TINY + ["--save", str(tmp_path / "ck"), flag, ""]
    for extra in ([], ["--dry-run"]):
        _refused(argv + extra, capsys, f"{flag} is an empty string (an unset shell variable?)")


def test_dry_run_without_a_vocabulary_is_one_line_not_a_traceback(capsys):
    argv = ["--model-size", "tiny", "--train-iters", "5", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--seq-length", "64", "--dry-run"]
    _refused(argv, capsys, "--vocab-size unset")


def test_tool_outputs_refuse_an_empty_path_and_a_file(tmp_path):
    """plot_run printed raw errno text; convert_checkpoint --save "" --force emptied the working
    folder. Each is now one line naming the flag, and nothing in the folder changes."""
    (tmp_path / "precious.txt").write_text("keep")
    (tmp_path / "afile").write_text("x")
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"type": "train", "step": 1, "loss": 1.0, "lr": 0.001}\n')
    cases = [
        (["tools/plot_run.py", str(metrics), "--out", ""], "plot_run.py: error: --out is an "
         "empty string"),
        (["tools/plot_run.py", str(metrics), "--out", str(tmp_path / "afile")],
         f"plot_run.py: error: --out {tmp_path / 'afile'}: exists and is a file"),
        (["tools/convert_checkpoint.py", "--load-format", "megatron_lite", "--save-format", "hf",
          "--load", str(tmp_path), "--save", "", "--force"],
         "convert_checkpoint.py: error: --save is an empty string"),
        (["tools/lr_sweep.py", "--out", "", "--lr", "1e-3", "--print-only"],
         "lr_sweep.py: error: --out is an empty string"),
    ]
    for argv, want in cases:
        r = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().startswith(want), (argv, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m.jsonl", "precious.txt"]


def test_load_naming_a_file_says_so(tmp_path):
    """``--load CKPT/latest`` (a file) read 'no such folder' (convert) or 'need manifest.json'
    (eval_ppl); pretrain_llama.py already said 'is a file'."""
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    (tmp_path / "latest").write_text("iter_0000001\n")
    load = str(tmp_path / "latest")
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"))
    builder.add_item(torch.arange(100))
    builder.end_document()
    builder.finalize(str(tmp_path / "x.idx"))
    for argv in (["tools/convert_checkpoint.py", "--load-format", "megatron_lite", "--save-format",
                  "hf", "--load", load, "--save", str(tmp_path / "hf")],
                 ["tools/eval_ppl.py", "--load", load, "--data-path", str(tmp_path / "x"),
                  "--seq-length", "64"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and f"--load {load}: is a file; give the checkpoint folder" in \
            r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
