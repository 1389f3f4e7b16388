"""What a new user meets (issue 15): the project's own shipped files raise none of its own
warnings, outputs teammates read follow the umask, tools run without an activated venv, and
the small print/help details a first run shows."""

import glob
import json
import os
import subprocess
import sys
import warnings

import pytest

from megatron_lite.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_JSONS = sorted(glob.glob(os.path.join(ROOT, "configs", "deepspeed_zero*.json")))


@pytest.mark.parametrize("path", DS_JSONS, ids=os.path.basename)
def test_shipped_deepspeed_json_warns_nothing(path, monkeypatch):
    # The stage is the file's own, so the JSON and the flags agree as a user's run would.
    from megatron_lite.config.deepspeed_json import reconcile_user_json
    from megatron_lite.training.deepspeed_engine import build_ds_config

    monkeypatch.chdir(ROOT)
    with open(path) as f:
        stage = json.load(f)["zero_optimization"]["stage"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config("configs/pretrain_7b_4k.yaml",
                          {"deepspeed_config": os.path.relpath(path, ROOT), "zero_stage": stage},
                          world_size=64)
        reconcile_user_json(cfg)
        build_ds_config(cfg)
    assert [str(w.message) for w in caught] == []


# ---- #3: outputs others read follow the umask ------------------------------------------------

@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder):
    """relative path -> permission bits of every file under ``folder``."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, folder)] = oct(os.stat(p).st_mode & 0o777)
    return out


def test_index_cache_follows_umask(tmp_path, umask):
    import numpy as np

    from megatron_lite.data.gpt_dataset import GPTDataset
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(tmp_path / "c.bin"), np.uint16)
    for d in ([1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0]):
        b.add_document(np.array(d, dtype=np.int64))
    b.finalize(str(tmp_path / "c.idx"))
    GPTDataset(str(tmp_path / "c"), (0, 3), 4, 5, seed=1, cache_dir=str(tmp_path / "cache"))
    modes = _modes(tmp_path / "cache")
    assert len(modes) == 4 and set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_hf_export_follows_umask(tmp_path, umask):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures_data import load_tool

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "src"))
    load_tool("convert_checkpoint").main(["--load-format", "hf", "--save-format", "hf",
                                          "--load", str(tmp_path / "src"),
                                          "--save", str(tmp_path / "out")])
    modes = _modes(tmp_path / "out")
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct(os.stat(tmp_path / "out").st_mode & 0o777) == oct(0o777 & ~umask)


def test_run_info_and_config_yaml_follow_umask(tmp_path, umask):
    # run_info.json holds only launcher/threading/comms variables, never a name with TOKEN, KEY,
    # SECRET, PASSWORD or CREDENTIAL in it: readable by the team like config.yaml (README).
    from megatron_lite.training.run_info import write_run_info

    os.environ["HF_TOKEN_FIRST_USE_TEST"] = "x"  # not recorded whatever its prefix
    try:
        info = write_run_info(str(tmp_path), {"a": 1})
    finally:
        del os.environ["HF_TOKEN_FIRST_USE_TEST"]
    assert "HF_TOKEN_FIRST_USE_TEST" not in info["environment"]
    assert _modes(tmp_path) == {"config.yaml": oct(0o666 & ~umask),
                                "run_info.json": oct(0o666 & ~umask)}


def test_umask_file_mode_reads_without_changing(umask):
    from megatron_lite.utils import umask_file_mode

    assert umask_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask


# ---- #14: the test suite's progress reaches a redirected log while it runs -------------------

def test_run_tests_progress_reaches_a_redirected_log(tmp_path):
    # Run pytest with scripts/run_tests.sh's exported variables and options, stdout to a file: the
    # module's name must be in the log while its first test runs (with -q nothing but dots is
    # printed, after a collection that takes a minute for the whole suite, so the log stays empty).
    lines = open(os.path.join(ROOT, "scripts", "run_tests.sh")).read().splitlines()
    exports = [ln for ln in lines if ln.startswith("export ")]
    run = [ln for ln in lines if ln.startswith("python -m pytest ")]
    assert len(run) == 1 and run[0].endswith(' tests "$@"'), run
    opts = run[0][len("python -m pytest "):-len(' tests "$@"')]
    (tmp_path / "test_gate.py").write_text(
        "import os, time\n"
        "def test_waits_for_its_module_in_the_log():\n"
        "    t = time.time()\n"
        "    while 'test_gate.py' not in open(os.environ['GATE_LOG']).read():\n"
        "        assert time.time() - t < 15, 'nothing about this module reached the log'\n"
        "        time.sleep(0.1)\n")
    log = tmp_path / "log"
    script = "\n".join(exports) + (f"\n{sys.executable} -m pytest {opts} -p no:cacheprovider "
                                   f"--rootdir {tmp_path} {tmp_path}/test_gate.py > {log} 2>&1")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    r = subprocess.run(["bash", "-c", script], env={**env, "GATE_LOG": str(log)}, timeout=120)
    assert r.returncode == 0, log.read_text()


# ---- #8: tools/plan_run.py's FLOPs lines and the currency in --help --------------------------

def _plan_run():
    from tests.fixtures_data import load_tool

    return load_tool("plan_run")


def test_plan_run_flops_lines_in_one_order(capsys):
    plan_run = _plan_run()
    flags = ["--model-size", "7b", "--vocab-size", "32000", "--gpus", "64", "--tp", "8",
             "--micro-batch-size", "4", "--global-batch-tokens", "4194304",
             "--train-tokens", "1000000000000", "--bf16"]
    assert plan_run.main(flags) == 0
    out = capsys.readouterr().out
    per_token = next(ln for ln in out.splitlines() if ln.startswith("FLOPs/token"))
    train = next(ln for ln in out.splitlines() if ln.startswith("FLOPs_train"))
    assert "exact (6N)" in per_token and "exact (6·N·T)" in train, (per_token, train)

    def figures(line):
        a, b = line.split()[-2:]
        return float(a), float(b.strip("()"))

    # exact first on both lines: the exact/6N ratio is the same per token and per run
    (e1, s1), (e2, s2) = figures(per_token), figures(train)
    assert e1 > s1 and e2 > s2 and abs(e1 / s1 - e2 / s2) < 1e-3


def test_plan_run_help_names_the_currency(capsys):
    assert _plan_run().main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "price of one GPU-hour in ¥ (yuan" in text and "price of one kWh in ¥ (yuan)" in text


# ---- #2: tools and launch scripts in a fresh shell (no venv activated) -----------------------

BASE_PYTHON = os.path.join(sys.base_prefix, "bin", "python3")  # the venv's interpreter, bare


def _fresh_shell_env():
    """The environment of a new shell: no venv on PATH, no VIRTUAL_ENV."""
    venv_bin = os.path.dirname(sys.executable)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and os.path.realpath(p) != os.path.realpath(venv_bin)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path)}


def _bare_python_lacks_torch():
    r = subprocess.run([BASE_PYTHON, "-c", "import torch"], capture_output=True,
                       env=_fresh_shell_env())
    return r.returncode != 0


needs_bare_python = pytest.mark.skipif(
    not os.path.exists(BASE_PYTHON) or not _bare_python_lacks_torch()
    or not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")),
    reason="needs a Python without torch and the checkout's .venv")


def _fake_checkout(tmp_path, with_tools=("plan_run.py",)):
    """The few files the venv check needs, in a folder without .venv."""
    import shutil

    for rel in ["megatron_lite/__init__.py", "megatron_lite/utils.py",
                "scripts/project_python.sh", "examples/common_launch.sh",
                "examples/pretrain_7b_4k.sh", "configs/pretrain_7b_4k.yaml"] + \
            [f"tools/{t}" for t in with_tools]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    return tmp_path


@needs_bare_python
def test_tool_started_without_venv_reruns_under_it(tmp_path):
    r = subprocess.run([BASE_PYTHON, os.path.join(ROOT, "tools", "plan_run.py"), "--model-size",
                        "tiny", "--vocab-size", "512", "--gpus", "1", "--micro-batch-size", "1",
                        "--global-batch-size", "1", "--seq-length", "64", "--train-iters", "10",
                        "--json"],
                       capture_output=True, text=True, cwd=tmp_path, env=_fresh_shell_env())
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["num_gpus"] == 1


@needs_bare_python
def test_tool_without_any_torch_says_how_to_set_up(tmp_path):
    root = _fake_checkout(tmp_path)
    r = subprocess.run([BASE_PYTHON, "tools/plan_run.py", "--help"], capture_output=True,
                       text=True, cwd=root, env=_fresh_shell_env())
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("plan_run.py: error: torch is not installed for ")
    assert "source scripts/setup_env.sh" in r.stderr and len(r.stderr.splitlines()) == 1


@needs_bare_python
def test_launch_script_finds_the_venv_in_a_fresh_shell():
    env = {**_fresh_shell_env(), "ML_PRINT_CMD": "1"}
    r = subprocess.run(["bash", "examples/pretrain_7b_4k.sh", "--dry-run"], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stdout.startswith("WORLD_SIZE=64\n"), r.stderr
    r = subprocess.run(["bash", "-c", "source scripts/project_python.sh && project_python && "
                        "python -c 'import torch, sys; print(sys.prefix)'"],
                       capture_output=True, text=True, cwd=ROOT, env=_fresh_shell_env())
    assert r.returncode == 0 and os.path.realpath(r.stdout.strip()) == \
        os.path.realpath(os.path.join(ROOT, ".venv")), r.stderr


@needs_bare_python
def test_launch_script_without_any_torch_says_how_to_set_up(tmp_path):
    root = _fake_checkout(tmp_path)
    r = subprocess.run(["bash", "examples/pretrain_7b_4k.sh", "--dry-run"], capture_output=True,
                       text=True, cwd=root, env=_fresh_shell_env())
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("pretrain_7b_4k.sh: error: no Python with torch found")
    assert "source scripts/setup_env.sh" in r.stderr and len(r.stderr.splitlines()) == 1


def test_tokenizer_and_data_files_follow_umask(tmp_path, umask):
    from tests.fixtures_data import load_tool

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                              for i in range(200)), encoding="utf-8")
    assert load_tool("train_tokenizer").main(["--input", str(corpus), "--model-prefix",
                                              str(tmp_path / "tok" / "spm"), "--vocab-size",
                                              "300", "--num-threads", "1"]) == 0
    assert load_tool("preprocess_data").main([
        "--input", str(corpus), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
        str(tmp_path / "tok" / "spm.model"), "--output-prefix", str(tmp_path / "data" / "c"),
        "--no-progress", "--append-eod"]) == 0
    modes = {**_modes(tmp_path / "tok"), **_modes(tmp_path / "data")}
    assert len(modes) == 6 and set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ---- #11: one error style: "<script>.py: error: ..." as argparse and the entrypoints print -----

def test_tools_use_the_script_name_as_prefix():
    import re

    for path in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py"))):
        stem = os.path.basename(path)[:-3]
        src = open(path, encoding="utf-8").read()
        assert not re.search(rf'f?"{stem}: ', src), f"{stem}: a line prefixed without .py"
        assert f'run_tool("{stem}",' not in src, stem


@pytest.mark.parametrize("tool,argv,message", [
    ("inspect_data", ["--data-path", "x", "--seq-length", "0", "--index", "0"],
     "--seq-length must be >= 1 (got 0)"),
    ("inspect_data", ["--data-path", "x", "--seq-length", "8", "--index", "-1"],
     "--index must be >= 0 (got -1)"),
    ("plan_run", ["--config", "configs/pretrain_7b_4k.yaml", "--gpus", "0"],
     "--gpus must be >= 1 (got 0)"),
    ("eval_ppl", ["--load", "configs", "--data-path", "nope"], None),
])
def test_bad_input_and_usage_errors_share_one_prefix(tool, argv, message):
    def run(args):
        return subprocess.run([sys.executable, os.path.join("tools", f"{tool}.py"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    r = run(argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}.py: error: "), r.stderr
    if message:
        assert lines[0] == f"{tool}.py: error: {message}"
    usage = run(["--no-such-flag"])  # argparse's own error line
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines()[-1].startswith(f"{tool}.py: error: ")


# ---- #10: the README's suggested output folders are not offered to git ------------------------

def test_readme_output_folders_are_ignored():
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    paths = ["hf/7b/model.safetensors", "runs/quickstart/ckpt/latest", "tok/spm.model",
             "data/web_text_document.bin", "tests.log"]
    r = subprocess.run(["git", "check-ignore", *paths], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == paths
    tracked = subprocess.run(["git", "check-ignore", "tests/data/README.md"], cwd=ROOT)
    assert tracked.returncode == 1  # not ignored


# ---- #15: pip install in a fresh venv -------------------------------------------------------

@pytest.mark.slow
def test_pip_install_no_build_isolation_in_a_fresh_venv(tmp_path):
    """A fresh venv with the build's requirements (torch, pybind11, setuptools): a plain
    `pip install -e .` stops with the hint (the isolated build has no torch), while
    `pip install --no-build-isolation -e .` and `... .` build both extensions (about 4 minutes
    on 2 cores: two C++ builds)."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    skip = shutil.ignore_patterns("*.so", "__pycache__", "build")
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc", ignore=skip)
    shutil.copytree(os.path.join(ROOT, "megatron_lite"), src / "megatron_lite", ignore=skip)
    venv = tmp_path / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    import torch

    env = {**_fresh_shell_env(), "OMP_NUM_THREADS": "1", "MAX_JOBS": "2"}
    r = subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}", "pybind11>=2.12",
                              "setuptools", "wheel", "ninja", "numpy"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]

    def install(*args):
        return subprocess.run(pip + list(args), capture_output=True, text=True, cwd=src, env=env)

    def check_import():
        code = ("import torch, megatron_lite, megatron_lite._rope_ops as r, "
                "megatron_lite._data_helpers as d; print(megatron_lite.__file__)")
        r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                           text=True, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    isolated = install("-e", ".")
    assert isolated.returncode != 0
    assert "pip install --no-build-isolation -e ." in isolated.stdout + isolated.stderr
    assert "No module named" not in isolated.stdout + isolated.stderr  # pybind11 is declared

    r = install("--no-build-isolation", "-e", ".")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert check_import() == str(src / "megatron_lite" / "__init__.py")

    subprocess.run(pip[:-2] + ["uninstall", "-y", "-q", "megatron_lite"], check=True, env=env)
    for so in (src / "megatron_lite").glob("*.so"):
        so.unlink()
    shutil.rmtree(src / "build", ignore_errors=True)
    r = install("--no-build-isolation", ".")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "site-packages" in check_import()
