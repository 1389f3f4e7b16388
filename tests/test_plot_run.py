"""Figures of runs (megatron_lite/analysis/plots.py, tools/plot_run.py): the plotted series are
the metrics.jsonl values (checked on the figures' Line2D data, not on pixels), several runs are
overlaid with a legend, --smooth draws the EMA, --format svg writes SVG."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.fixtures_data import load_tool

from megatron_lite.analysis.plots import FIGURES, build_figures, step_time_parts
from megatron_lite.analysis.run_data import ema, load_run, read_records, series
from megatron_lite.eval.tool_cli import run_tool
from tests.test_diagnose_run import (ROOT, healthy_records, inject_skipped, inject_spike,
                                     write_run)


def _line(fig, label, ax=0):
    lines = [ln for ln in fig.axes[ax].lines if ln.get_label() == label]
    assert len(lines) == 1, [ln.get_label() for ln in fig.axes[ax].lines]
    return lines[0].get_xydata()


def _xy(records, key, x="step"):
    xs, ys = series(records, key, x)
    return np.column_stack([xs, ys])


@pytest.fixture
def two_runs(tmp_path):
    a = healthy_records()
    b = healthy_records()
    inject_skipped(b)
    for r in b:
        if r["type"] == "train":
            r["tp_comm_s"] = 0.05      # a timing field the breakdown must pick up
    inject_spike(b)
    pa = write_run(tmp_path / "a", a)
    pb = write_run(tmp_path / "b", b, spikes={300: "bad sample"}, clip=0.8)
    return [load_run(pa), load_run(pb)], [a, b]


def test_plotted_series_equal_the_metrics(two_runs):
    runs, recs = two_runs
    figs = build_figures(runs)
    assert set(figs) == set(FIGURES)
    for run, rec in zip(runs, recs):
        tr = [r for r in rec if r["type"] == "train"]
        ev = [r for r in rec if r["type"] == "eval"]
        n = run.name
        np.testing.assert_array_equal(_line(figs["loss"], f"{n} train"), _xy(tr, "loss"))
        np.testing.assert_array_equal(_line(figs["loss"], f"{n} validation"), _xy(ev, "val_loss"))
        np.testing.assert_array_equal(_line(figs["loss_loglog"], f"{n} train"),
                                      _xy(tr, "loss", "consumed_tokens"))
        np.testing.assert_array_equal(_line(figs["lr"], f"{n} lr"), _xy(tr, "lr"))
        np.testing.assert_array_equal(_line(figs["grad_norm"], f"{n} grad_norm"),
                                      _xy(tr, "grad_norm"))
        np.testing.assert_array_equal(_line(figs["throughput"], f"{n} tokens_per_sec"),
                                      _xy(tr, "tokens_per_sec"))
        mfu = _xy(tr, "mfu")
        mfu[:, 1] *= 100
        np.testing.assert_allclose(_line(figs["mfu"], f"{n} mfu"), mfu)
        np.testing.assert_array_equal(_line(figs["batch_size"], f"{n} global_batch_size"),
                                      _xy(tr, "global_batch_size"))
        ppl = _xy(tr, "loss")
        ppl[:, 1] = np.exp(ppl[:, 1])
        np.testing.assert_allclose(_line(figs["perplexity"], f"{n} train"), ppl)
        for c in ("a", "b"):
            np.testing.assert_array_equal(_line(figs["perplexity"], f"{n} validation {c}"),
                                          _xy(ev, f"val_ppl/{c}"))
    ax = figs["loss_loglog"].axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert [t.get_text() for t in figs["loss"].axes[0].get_legend().get_texts()][:2] == \
        ["a train", "a validation"]


def test_clip_line_spikes_and_skipped_steps(two_runs):
    runs, recs = two_runs
    figs = build_figures(runs)
    clip = _line(figs["grad_norm"], "b --clip-grad 0.8")
    assert set(clip[:, 1]) == {0.8}
    assert set(_line(figs["grad_norm"], "a --clip-grad 1")[:, 1]) == {1.0}
    spikes = _line(figs["loss"], "b spikes")
    assert list(spikes[:, 0]) == [300]      # the capture file's step (the counter is absent)
    skipped = _line(figs["loss"], "b skipped steps")
    assert list(skipped[:, 0]) == list(range(50, 1001, 50))
    assert not [ln for ln in figs["loss"].axes[0].lines if ln.get_label() == "a spikes"]


def test_step_time_breakdown_stacks_every_timing_field(two_runs):
    runs, recs = two_runs
    parts = step_time_parts(runs[1])
    assert list(parts) == ["data_wait_s", "forward_backward_s", "optimizer_s", "tp_comm_s"]
    tr = [r for r in recs[1] if r["type"] == "train"]
    for k, (xs, ys) in parts.items():
        assert xs == [r["step"] for r in tr] and ys == [r[k] for r in tr]
    fig = build_figures(runs)["step_time"]
    assert len(fig.axes) == 2       # one panel per run
    stacked = fig.axes[1].collections
    assert len(stacked) == 4
    np.testing.assert_array_equal(_line(fig, "b step_time", ax=1), _xy(tr, "step_time_s"))


def test_smooth_draws_the_ema(two_runs):
    runs, recs = two_runs
    figs = build_figures(runs, smooth=0.8)
    xs, ys = series([r for r in recs[0] if r["type"] == "train"], "loss")
    got = _line(figs["loss"], "a train")
    np.testing.assert_allclose(got, np.column_stack([xs, ema(ys, 0.8)]))
    assert ema([2.0, 4.0], 0.5) == [2.0, (0.5 * 0.5 * 2 + 0.5 * 4) / 0.75]
    with pytest.raises(ValueError):
        build_figures(runs, smooth=1.0)


def test_rollback_records_replace_the_earlier_steps(tmp_path):
    recs = [{"type": "train", "step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3, 4)]
    recs += [{"type": "train", "step": s, "loss": 1.0} for s in (3, 4, 5)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut short')
    got = [(r["step"], r["loss"]) for r in read_records(str(path))]
    assert got == [(1, 4.9), (2, 4.8), (3, 1.0), (4, 1.0), (5, 1.0)]
    run = load_run(str(path))
    assert run.name == "m" and run.config is None


def _tool():
    return load_tool("plot_run")


def test_tool_writes_png_and_svg(tmp_path, capsys):
    tool = _tool()
    a = write_run(tmp_path / "x" / "ckpt", healthy_records())
    b = write_run(tmp_path / "y" / "ckpt", healthy_records())
    out = tmp_path / "plots"
    assert run_tool("plot_run.py", tool.main, [a, b, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / f"{n}.png") for n in FIGURES]
    for p in printed:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert run_tool("plot_run.py", tool.main,
                    [a, "--out", str(out), "--format", "svg", "--smooth", "0.5"]) == 0
    svg = (out / "loss.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    capsys.readouterr()
    assert run_tool("plot_run.py", tool.main, [str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("plot_run.py: error:")


def test_disjoint_breakdown_is_stacked_without_the_coarse_fields(tmp_path):
    recs = healthy_records()
    fine = {"forward_s": 0.3, "backward_s": 0.4, "tp_comm_s": 0.1, "dp_comm_s": 0.05,
            "optimizer_step_s": 0.08, "other_s": 0.06, "checkpoint_s": 0.0, "batch_s": 0.01}
    for r in recs:
        if r["type"] == "train":
            r.update(fine)
    parts = step_time_parts(load_run(write_run(tmp_path / "f", recs)))
    assert list(parts) == ["data_wait_s", "forward_s", "backward_s", "tp_comm_s", "dp_comm_s",
                           "optimizer_step_s", "other_s", "checkpoint_s"]
    assert set(parts["tp_comm_s"][1]) == {0.1}
