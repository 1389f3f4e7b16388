"""tools/lr_sweep.py and megatron_lite/eval/lr_sweep.py (issue 19, item 4): grid expansion and
command lines, the table and heatmap data from synthetic metrics files, and one tiny real sweep."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from megatron_lite.eval import lr_sweep as ls
from tests.fixtures_data import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_values_and_grid_order():
    assert ls.parse_values("1e-4, 3e-4,1e-3", "lr") == ["1e-4", "3e-4", "1e-3"]
    for text, axis in (("", "lr"), ("a", "lr"), ("0", "lr"), ("-1e-3", "lr"), ("1e-3,1e-3", "lr"),
                       ("8192.5", "global_batch_tokens"), ("nan", "lr"), ("-1", "lr_warmup_iters")):
        with pytest.raises(ValueError):
            ls.parse_values(text, axis)
    assert ls.parse_values("0,10", "lr_warmup_iters") == ["0", "10"]
    cells = ls.expand_grid({"lr": ["1e-4", "3e-4"], "global_batch_tokens": ["8192", "16384"]})
    assert [c.name for c in cells] == ["lr1e-4_global_batch_tokens8192", "lr1e-4_global_batch_tokens16384",
                                       "lr3e-4_global_batch_tokens8192", "lr3e-4_global_batch_tokens16384"]
    assert cells[1].flags() == ["--lr", "1e-4", "--global-batch-tokens", "16384"]
    with pytest.raises(ValueError, match="two axes"):
        ls.expand_grid({"lr": ["1"], "lr_warmup_iters": ["1"], "global_batch_size": ["2"]})
    with pytest.raises(ValueError, match="same thing"):
        ls.expand_grid({"global_batch_size": ["2"], "global_batch_tokens": ["64"]})
    with pytest.raises(ValueError, match="at least one"):
        ls.expand_grid({})


def test_command_lines_and_reserved_flags():
    cell = ls.expand_grid({"lr": ["3e-4"], "lr_warmup_iters": ["5"]})[0]
    cmd = ls.cell_command(cell, ["--model-size", "tiny"], "/s", 1, "pretrain_llama.py", "py")
    assert cmd == ["py", "pretrain_llama.py", "--model-size", "tiny", "--log-interval", "1", "--lr", "3e-4",
                   "--lr-warmup-iters", "5", "--metrics-file", "/s/lr3e-4_lr_warmup_iters5/metrics.jsonl"]
    cmd = ls.cell_command(cell, ["--log-interval=5"], "/s", 1, "pretrain_llama.py", "py")
    assert cmd.count("--log-interval=5") == 1 and "--log-interval" not in cmd
    cmd = ls.cell_command(cell, [], "/s", 2, "pretrain_llama.py", "py")
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6] == "pretrain_llama.py"
    for base in (["--lr", "1"], ["--lr=1"], ["--save", "x"], ["--metrics-file", "m"],
                 ["--lr-warmup-tokens", "100"]):
        with pytest.raises(ValueError, match="sweep sets"):
            ls.check_base_args(base, ["lr", "lr_warmup_iters"])
    ls.check_base_args(["--global-batch-size", "8"], ["lr"])


def test_print_only_prints_one_command_per_cell(capsys):
    tool = load_tool("lr_sweep")
    assert tool.main(["--out", "/tmp/sw", "--global-batch-tokens", "8192,16384", "--lr", "1e-4,1e-3",
                      "--print-only", "--nproc-per-node", "2", "--", "--model-size", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    argv = shlex.split(lines[0])
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert argv[6].endswith("pretrain_llama.py")
    # The first axis on the command line (here the batch) varies slowest and names the cell first.
    assert argv[-1] == "/tmp/sw/global_batch_tokens8192_lr1e-4/metrics.jsonl"
    with pytest.raises(ValueError, match="sweep sets"):
        tool.main(["--out", "/tmp/sw", "--lr", "1e-4", "--print-only", "--", "--lr", "1"])


def _write_metrics(path, losses, evals):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i, "loss": loss, "lr": 1e-3}) + "\n")
        for step, v in evals:
            f.write(json.dumps({"type": "eval", "step": step, "val_loss": v}) + "\n")


def test_collect_synthetic_values_best_and_diverged(tmp_path):
    out = str(tmp_path)
    axes = {"lr": ["1e-4", "3e-4", "1e-3"], "global_batch_tokens": ["8192", "16384"]}
    cells = ls.expand_grid(axes)
    finals = {}
    for k, cell in enumerate(cells):
        path = ls.metrics_path(out, cell)
        v = dict(cell.values)
        if v["lr"] == "1e-3" and v["global_batch_tokens"] == "8192":
            _write_metrics(path, [5.0, 7.0, None], [(2, 9.0)])          # NaN loss: diverged
        elif v["lr"] == "1e-3":
            _write_metrics(path, [5.0, 6.0], [(1, 5.5), (2, 6.5)])       # above the start: diverged
        elif v["lr"] == "1e-4" and v["global_batch_tokens"] == "16384":
            continue                                                       # never ran: missing
        else:
            finals[cell.name] = 3.0 + 0.125 * k
            _write_metrics(path, [5.0, 4.0], [(1, 4.5), (2, finals[cell.name])])
    results, hm = ls.collect(cells, list(axes), out)
    by = {r.cell.name: r for r in results}
    assert by["lr1e-3_global_batch_tokens8192"].status == "diverged"
    assert by["lr1e-3_global_batch_tokens16384"].status == "diverged"
    assert by["lr1e-4_global_batch_tokens16384"].status == "missing"
    best = min(finals, key=finals.get)
    assert [r.cell.name for r in results if r.best] == [best] == ["lr1e-4_global_batch_tokens8192"]
    # Heatmap data: x = lr, y = global batch tokens; each ok cell holds its metrics' final loss.
    assert hm.x_values == axes["lr"] and hm.y_values == axes["global_batch_tokens"]
    for name, v in finals.items():
        c = dict(by[name].cell.values)
        i, j = hm.y_values.index(c["global_batch_tokens"]), hm.x_values.index(c["lr"])
        assert hm.values[i][j] == v and hm.labels[i][j].startswith(f"{v:.4f}")
    assert hm.best == (0, 0) and hm.labels[0][0].endswith("(best)")
    assert hm.values[0][2] is None and hm.labels[0][2].startswith("diverged")
    assert hm.status[1][2] == "diverged" and hm.labels[1][0] == "missing"
    # The CSV holds the same numbers, exactly.
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == [c.name for c in cells]
    for r in rows:
        if r["cell"] in finals:
            assert float(r["final_val_loss"]) == finals[r["cell"]] and r["status"] == "ok"
        assert r["best"] == ("1" if r["cell"] == best else "0")
    assert {r["lr"] for r in rows} == set(axes["lr"])
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_and_no_ok_cell(tmp_path):
    cell = ls.expand_grid({"lr": ["1e-3"]})[0]
    path = ls.metrics_path(str(tmp_path), cell)
    _write_metrics(path, [5.0, 4.0], [])
    assert ls.read_cell(cell, path).status == "failed"                 # no validation record
    _write_metrics(path, [5.0, 4.0], [(2, 4.2)])
    assert ls.read_cell(cell, path, exit_status=1).status == "failed"
    assert ls.read_cell(cell, path, exit_status=0).status == "ok"
    assert ls.read_cell(cell, path, diverge_ratio=0.5).status == "diverged"
    assert ls.read_cell(cell, str(tmp_path / "none.jsonl"), exit_status=2).status == "failed"
    tool = load_tool("lr_sweep")
    os.remove(path)
    assert tool.main(["--out", str(tmp_path), "--lr", "1e-3", "--collect-only"]) == 1


@pytest.mark.slow
def test_tiny_real_sweep_two_cells(tmp_path):
    """Two cells of the tiny model, 4 steps each, run for real; the CSV's losses are the runs'."""
    from tests.test_per_corpus_eval import make_corpus

    make_corpus(str(tmp_path / "data"), 0, 1)
    out = tmp_path / "sweep"
    base = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "4", "--lr-warmup-iters", "1",
            "--data-path", str(tmp_path / "data"), "--split", "90,10,0", "--eval-interval", "4",
            "--eval-iters", "2", "--num-workers", "0", "--device", "cpu"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "lr_sweep.py"), "--out", str(out),
                           "--lr", "1e-3,3e-3", "--", *base], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["lr"] for r in rows] == ["1e-3", "3e-3"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        with open(out / r["cell"] / "metrics.jsonl") as f:
            evals = [json.loads(x) for x in f if '"eval"' in x]
        assert float(r["final_val_loss"]) == evals[-1]["val_loss"] and evals[-1]["step"] == 4
        assert math.isfinite(float(r["final_val_loss"]))
        assert float(r["first_train_loss"]) > float(r["final_val_loss"])   # logged every step
    assert sum(int(r["best"]) for r in rows) == 1
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "<- best" in proc.stdout
