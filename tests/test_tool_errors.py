"""Bad input to the tools in ``tools/`` ends in ONE line ``<tool>: error: <what and the fix>`` on
stderr and exit status 2 (``megatron_lite.eval.tool_cli.run_tool``), before any slow work;
``MEGATRON_LITE_TRACEBACK=1`` re-raises. The real ``__main__`` wiring is checked with a few
subprocesses; the many cases run in process through the same ``run_tool``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_lite.eval.tool_cli import error_line, run_tool
from tests.fixtures_data import ROOT, TINY_VOCAB_SIZE, load_tool, tiny_corpus_and_tokenizer  # noqa: F401
from tests.test_eval import _save_tiny_checkpoint, _tiny_docs, _write_dataset

DATA_HINT = ("--data-path takes the prefix without .bin/.idx, e.g. 'corpus_text_document' for "
             "corpus_text_document.bin/.idx")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A TP=1 checkpoint trained at seq_length 16 (vocab 50), a dataset for it, a folder that
    looks like a HuggingFace one (config.json, no manifest.json) and a regular file."""
    t = tmp_path_factory.mktemp("tool_errors")
    _save_tiny_checkpoint(str(t / "ckpt"), 1)
    _write_dataset(str(t / "val"), _tiny_docs(50, n_docs=8))
    (t / "hf").mkdir()
    (t / "hf" / "config.json").write_text("{}")
    (t / "afile").write_text("x")
    return t


def _subprocess(tool, *args, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env))


def _in_process(capsys, tool, argv):
    """run_tool on the tool's main: (status, stderr lines)."""
    mod = load_tool(tool)
    status = run_tool(f"{tool}.py", getattr(mod, "main", None) or mod.run, argv)
    return status, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------ the helper
def test_run_tool_contract(monkeypatch, capsys):
    def bad(argv):
        raise FileNotFoundError("x.idx does not exist:\n  give the prefix")

    assert run_tool("t", bad) == 2
    assert capsys.readouterr().err == "t: error: x.idx does not exist: give the prefix\n"
    assert run_tool("t", lambda argv: {"ppl": 1.0}) == 0
    assert run_tool("t", lambda argv: 3) == 3
    assert run_tool("t", lambda argv: argv, ["--x"]) == 0  # a list is a result, not a status
    with pytest.raises(RuntimeError):  # not bad input: a bug keeps its traceback
        run_tool("t", lambda argv: (_ for _ in ()).throw(RuntimeError("bug")))
    monkeypatch.setenv("MEGATRON_LITE_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="x.idx"):
        run_tool("t", bad)
    assert capsys.readouterr().err == ""
    assert error_line("t", ValueError("")) == "t: error: ValueError"
    assert error_line("t", ValueError("one\n\n two ")) == "t: error: one; two"


# ------------------------------------------------------------- real scripts (the __main__ line)
def test_eval_ppl_script_hf_folder_without_format_and_traceback_switch(assets):
    r = _subprocess("eval_ppl", "--load", str(assets / "hf"), "--data-path", str(assets / "val"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1:] == [
        f"eval_ppl.py: error: --load {assets}/hf: no megatron_lite checkpoint there (no "
        "manifest.json) but a config.json: for a HuggingFace folder pass --load-format hf"]
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = _subprocess("eval_ppl", "--load", str(assets / "ckpt"), "--data-path", str(assets / "val"),
                    "--tp", "2", MEGATRON_LITE_TRACEBACK="1")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "ValueError: --tp 2 needs 2 processes: launch with torchrun --nproc_per_node 2 ...")


def test_generate_script_empty_prompt(assets):
    r = _subprocess("generate", "--load", str(assets / "ckpt"), "--prompt", "")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "generate.py: error: --prompt is empty (no tokens to continue): give some text, or pass "
        "--add-bos to generate from the BOS token alone"]


# ------------------------------------------------------------------------------- eval_ppl
def test_eval_ppl_bad_input_is_one_line(assets, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    load, val = str(assets / "ckpt"), str(assets / "val")
    cases = [
        (["--load", load, "--data-path", f"{assets}/nope"],
         f"{assets}/nope.idx does not exist: {DATA_HINT}"),
        # the data is opened before the model: a wrong --data-path is reported first
        (["--load", f"{assets}/gone", "--data-path", f"{assets}/nope"],
         f"{assets}/nope.idx does not exist: {DATA_HINT}"),
        (["--load", f"{assets}/gone", "--data-path", val],
         f"--load {assets}/gone: no such file or folder"),
        (["--load", load, "--load-format", "hf", "--data-path", val],
         f"--load {load} --load-format hf: that is a megatron_lite checkpoint (no config.json); "
         "drop --load-format hf"),
        (["--load", load, "--data-path", val, "--stride", "300", "--seq-length", "256"],
         "--stride 300 must be <= --seq-length 256: a stride above the window length would "
         "leave targets unscored"),
        (["--load", load, "--data-path", val, "--stride", "300"],
         "--stride 300 must be <= the window length 16 (the checkpoint's --seq-length; pass "
         "--seq-length to change it)"),
        (["--load", load, "--data-path", val, "--stride", "0"], "--stride must be >= 1 (got 0)"),
        (["--load", load, "--data-path", val, "--max-tokens", "1"],
         "--max-tokens must be >= 2 (got 1)"),
        (["--load", load, "--data-path", val, "--tp", "2"],
         "--tp 2 needs 2 processes: launch with torchrun --nproc_per_node 2 ..."),
    ]
    for argv, message in cases:
        assert _in_process(capsys, "eval_ppl", argv) == (2, [f"eval_ppl.py: error: {message}"]), argv


def test_eval_ppl_warns_once_beyond_the_trained_length(assets, capsys):
    mod = load_tool("eval_ppl")
    common = ["--load", str(assets / "ckpt"), "--data-path", str(assets / "val"), "--json"]
    at_16 = mod.main(common + ["--seq-length", "16"])
    assert "warning" not in capsys.readouterr().err
    at_32 = mod.main(common + ["--seq-length", "32"])
    err = capsys.readouterr().err
    warning = ("eval_ppl.py: warning: --seq-length 32 is longer than the 16 positions the model was "
               "trained at (RoPE without scaling): positions 16..31 are extrapolated and the "
               "perplexity is not comparable with --seq-length <= 16; to evaluate a longer "
               "context, extend the model first (continued pretraining at that length with "
               "--rope-scaling-type yarn/linear/llama3 and --rope-scaling-factor)")
    assert err.count("eval_ppl.py: warning:") == 1 and warning in err.splitlines()
    assert at_32["tokens"] == at_16["tokens"] and at_32["nll"] != at_16["nll"]  # still evaluated


# ------------------------------------------------------------------------------- generate
def test_generate_flags_checked_before_loading(assets, capsys):
    """Refused before the (here missing) checkpoint is read."""
    base = ["--load", f"{assets}/gone", "--prompt", "x"]
    cases = [(["--top-p", "1.5"], "--top-p must be in (0, 1] (got 1.5); 1 keeps every token"),
             (["--top-p", "0"], "--top-p must be in (0, 1] (got 0.0); 1 keeps every token"),
             (["--temperature", "-1"], "--temperature must be >= 0 (got -1.0); 0 means greedy"),
             (["--temperature", "nan"], "--temperature must be >= 0 (got nan); 0 means greedy"),
             (["--top-k", "-1"], "--top-k must be >= 0 (got -1); 0 turns it off"),
             (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)")]
    for extra, message in cases:
        assert _in_process(capsys, "generate", base + extra) == \
            (2, [f"generate.py: error: {message}"]), extra
    assert _in_process(capsys, "generate", base) == \
        (2, [f"generate.py: error: --load {assets}/gone: no such file or folder"])


def test_generate_temperature_zero_is_greedy_and_empty_prompt_with_bos(
        assets, capsys, tiny_corpus_and_tokenizer):
    from megatron_lite.data.tokenizer import build_tokenizer

    _, spm = tiny_corpus_and_tokenizer
    save = str(assets / "ckpt_spm")
    if not os.path.isdir(save):
        _save_tiny_checkpoint(save, 1, vocab_size=TINY_VOCAB_SIZE,
                              tokenizer_type="SentencePieceTokenizer", tokenizer_model=spm)
    tool = load_tool("generate")
    common = ["--load", save, "--max-new-tokens", "5", "--no-stop-at-eod", "--json"]

    def last_json():
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    tool.main(common + ["--prompt", "def f(x):", "--greedy"])
    greedy = last_json()
    tool.main(common + ["--prompt", "def f(x):", "--temperature", "0", "--top-p", "0.5"])
    assert last_json()["new_ids"] == greedy["new_ids"]
    tool.main(common + ["--prompt", "", "--add-bos", "--greedy"])
    bos_only = last_json()
    assert bos_only["prompt_ids"] == [build_tokenizer("SentencePieceTokenizer", spm).bos]
    assert len(bos_only["new_ids"]) == 5


# ------------------------------------------------------------- the other tools' output paths
def test_other_tools_refuse_bad_outputs_before_working(assets, capsys):
    """Output paths are checked first (the inputs here do not even exist)."""
    before = sorted(os.listdir(assets))
    proc = "cannot be created: the folder /proc "
    under_file = (f"{assets}/afile is a file, not a folder, so nothing can be created under it; "
                  "remove it or choose another path")
    if os.path.isdir("/proc/self"):
        status, err = _in_process(capsys, "cpt_report", [
            "--base", "b", "--cpt", "c", "--base-data", "d", "--domain-data", "e",
            "--output", "/proc/x.json"])
        assert status == 2 and len(err) == 1
        assert err[0].startswith(f"cpt_report.py: error: --output /proc/x.json: {proc}")
        status, err = _in_process(capsys, "noise_scale_estimator", [
            "--load", "b", "--data-path", "d", "--output", "/proc/x.json"])
        assert status == 2 and len(err) == 1
        assert err[0].startswith(f"noise_scale_estimator.py: error: --output /proc/x.json: {proc}")
    assert _in_process(capsys, "noise_scale_estimator", [
        "--load", "b", "--data-path", "d", "--batch-sizes", "4,x"]) == (2, [
            "noise_scale_estimator.py: error: --batch-sizes 4,x: give at least two distinct sizes "
            ">= 1, comma-separated (e.g. 4,8,16,32)"])
    for tool, flag, extra in [
            ("preprocess_data", "--output-prefix", ["--input", "in.jsonl", "--tokenizer-type",
                                                    "SentencePieceTokenizer", "--tokenizer-model",
                                                    "t.model"]),
            ("merge_datasets", "--output-prefix", ["--input", "in"]),
            ("train_tokenizer", "--model-prefix", ["--input", "in.jsonl"])]:
        rc = load_tool(tool).main(extra + [flag, f"{assets}/afile/out"])
        err = capsys.readouterr().err.strip().splitlines()
        assert (rc, err) == (2, [f"{tool}.py: error: {flag} {assets}/afile/out: {under_file}"])
    assert sorted(os.listdir(assets)) == before  # nothing written


def test_chinchilla_refuses_non_positive_values(capsys):
    with pytest.raises(SystemExit) as e:
        load_tool("chinchilla").run(["--params", "7e9", "--tokens", "0"])
    assert e.value.code == 2
    # argparse names the program after sys.argv[0] (pytest's here)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        ": error: --tokens must be > 0 (got 0)")


def test_plan_run_refuses_zero_gpus(capsys):
    # 0 used to fall back to $WORLD_SIZE and blame the TP degree instead
    assert load_tool("plan_run").main(["--config", f"{ROOT}/configs/pretrain_7b_4k.yaml",
                                        "--gpus", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "plan_run.py: error: --gpus must be >= 1 (got 0)"]


# ------------------------------------------------------------------------ bench/bench_data.py
def test_bench_data_prints_significant_digits_and_unrounded_ratios(capsys):
    import argparse
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("_bench_data",
                                                  os.path.join(ROOT, "bench", "bench_data.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert [bench.fmt_seconds(t) for t in (2.5, 0.0123456, 4.2e-5, 0.0)] == \
        ["2.5 s", "12.35 ms", "42 us", "0 us"]
    assert (bench.fmt_ratio(1.0, 3.0), bench.fmt_ratio(1.0, 0.0)) == ("0.333x", "n/a")
    args = argparse.Namespace(index_tokens="1e5", mean_doc_tokens=100, seq_length=64, repeat=1,
                              skip_loop=False)
    times = bench.bench_sample_index(args)
    out = capsys.readouterr().out
    assert "0.000 s" not in out
    from megatron_lite.data import helpers
    if helpers.have_cpp():
        shown = re.findall(r"speed-up (\S+) vs", out)
        assert shown == [bench.fmt_ratio(times["numpy"], times["cpp"]),
                         bench.fmt_ratio(times["loop"], times["cpp"])]
        assert out.count("identical: True") == 2


def test_tool_usage_errors_are_one_line_with_a_suggestion():
    """A mistyped flag printed argparse's 7-line usage block; now one line with 'did you mean'."""
    r = subprocess.run([sys.executable, f"{ROOT}/tools/eval_ppl.py", "--load", "x", "--data-path",
                        "y", "--seq-lenght", "256"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "eval_ppl.py: error: unrecognized arguments: --seq-lenght 256 (did you mean "
        "--seq-length?); see eval_ppl.py --help"], r.stderr
