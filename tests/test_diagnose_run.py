"""The run doctor (megatron_lite/analysis/doctor.py, tools/diagnose_run.py): synthetic metrics
files with one pathology each (and a healthy one) give exactly the expected findings; a real CPU
run with an injected loss spike is diagnosed with the spike at the injected step (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.fixtures_data import load_tool

from megatron_lite.analysis.doctor import Thresholds, diagnose, exit_status
from megatron_lite.analysis.run_data import load_run
from megatron_lite.eval.tool_cli import run_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP, ITERS, LOG, EVAL = 100, 1000, 10, 100


def _loss(step: int) -> float:
    """A power law plus small deterministic noise: a healthy loss curve."""
    return 2.0 + 8.0 * (step / 10) ** -0.3 + 0.01 * math.sin(step)


def _lr(step: int) -> float:
    if step <= WARMUP:
        return 3e-4 * step / WARMUP
    t = (step - WARMUP) / (ITERS - WARMUP)
    return 3e-5 + 0.5 * (3e-4 - 3e-5) * (1 + math.cos(math.pi * t))


def healthy_records() -> list[dict]:
    """Train records every LOG steps and eval records every EVAL steps of a healthy run."""
    out = []
    for s in range(LOG, ITERS + 1, LOG):
        tps = 1000.0 + 10 * math.sin(s)
        out.append({"type": "train", "step": s, "consumed_samples": 16 * s,
                    "consumed_tokens": 16 * 256 * s, "lr": _lr(s), "loss": _loss(s),
                    "grad_norm": 0.5 + 0.05 * math.sin(s), "loss_scale": None,
                    "skipped_steps": 0, "nan_steps_in_interval": 0, "tokens_per_sec": tps,
                    "tokens_per_sec_per_device": tps / 2, "tflops_per_device": 0.01,
                    "mfu": tps * 1e-4, "step_time_s": 1.0, "data_wait_s": 0.01,
                    "forward_backward_s": 0.8, "optimizer_s": 0.1, "peak_memory_bytes": 1 << 30,
                    "step_loss": _loss(s), "step_skipped": 0,
                    "global_batch_size": 8 if s < 200 else 16})
        if s % EVAL == 0:
            v = _loss(s) + 0.05
            out.append({"type": "eval", "step": s, "val_loss": v, "val_ppl": math.exp(v),
                        "val_tokens": 4096, "val_loss/a": v, "val_ppl/a": math.exp(v),
                        "val_loss/b": v + 0.1, "val_ppl/b": math.exp(v + 0.1)})
    return out


def write_run(folder, records, spikes=None, clip=1.0) -> str:
    """A run folder: metrics.jsonl, run_info.json (config) and spikes/step_<n>.jsonl captures."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    cfg = {"optimizer": {"clip_grad": clip},
           "derived": {"lr_warmup_iters": WARMUP, "train_iters": ITERS}}
    with open(os.path.join(folder, "run_info.json"), "w") as f:
        json.dump({"config": cfg}, f)
    for step, text in (spikes or {}).items():
        os.makedirs(os.path.join(folder, "spikes"), exist_ok=True)
        with open(os.path.join(folder, "spikes", f"step_{step}.jsonl"), "w") as f:
            f.write(json.dumps({"type": "spike", "step": step, "criterion": "loss", "value": 9.0,
                                "window_mean": 3.0, "window_std": 0.1, "action": "skip"}) + "\n")
            f.write(json.dumps({"type": "sample", "sample_id": 42, "dataset_id": 0, "loss": 12.5,
                                "worst_rank": 1, "text": text}) + "\n")
    return str(folder)


def _train(recs):
    return [r for r in recs if r["type"] == "train"]


def _evals(recs):
    return [r for r in recs if r["type"] == "eval"]


def inject_spike(recs):
    for r in _train(recs):
        if r["step"] == 500:
            r["loss"] = r["step_loss"] = r["loss"] * 2


def inject_plateau(recs):
    for r in _train(recs):
        if r["step"] > 600:
            r["loss"] = r["step_loss"] = 3.0 + 0.01 * math.sin(r["step"])


def inject_divergence(recs):
    for r in _train(recs):
        if r["step"] > 600:
            f = (r["step"] - 600) / 400
            r["loss"] = _loss(600) * (1 + 0.5 * f)
            r["grad_norm"] = 0.5 + 3.0 * f


def inject_nan_end(recs):
    for r in _train(recs)[-3:]:
        r["loss"] = None
        r["nan_steps_in_interval"] = LOG


def inject_warmup_rise(recs):
    for r in _train(recs):
        if r["step"] <= WARMUP:
            r["loss"] = 10.0 + r["step"] / 100


def inject_no_progress(recs):
    for r in _train(recs):
        if r["step"] > WARMUP:
            r["loss"] = 5.0 + 0.01 * math.sin(r["step"])


def inject_skipped(recs):
    n = 0
    for r in _train(recs):
        if r["step"] % 50 == 0:
            n += 1
            r["nan_steps_in_interval"] = 1
        r["skipped_steps"] = n


def inject_clipping(recs):
    for r in _train(recs):
        if r["step"] > WARMUP:
            r["grad_norm"] = 1.5


def inject_data_stall(recs):
    for r in _train(recs):
        r["data_wait_s"] = 0.3


def inject_throughput_drop(recs):
    for r in _train(recs):
        if r["step"] > 800:
            r["tokens_per_sec"] /= 2
            r["mfu"] /= 2


def inject_overfit(recs):
    base = {r["step"]: r["val_loss"] for r in _evals(recs)}
    for r in _evals(recs):
        if r["step"] > 500:
            r["val_loss"] = base[500] * (1 + 0.1 * (r["step"] - 500) / 500)


def inject_corpus_overfit(recs):
    base = {r["step"]: r["val_loss/b"] for r in _evals(recs)}
    for r in _evals(recs):
        if r["step"] > 500:
            r["val_loss/b"] = base[500] * (1 + 0.1 * (r["step"] - 500) / 500)


def inject_corpus_lag(recs):
    first = _evals(recs)[0]["val_loss/b"]
    for i, r in enumerate(_evals(recs)):
        r["val_loss/b"] = first * (1 - 0.001 * i)


def inject_guard_skip_in_tail(recs):
    """The spike guard skipped step 950 (log interval 1 there): the record's mean loss is null
    and its step_loss is the spike; the trend checks (plateau) must not see it."""
    for r in _train(recs):
        if r["step"] == 950:
            r.update(loss=None, step_loss=r["loss"] * 20, step_skipped=1, spikes=1,
                     nan_steps_in_interval=1)
        if r["step"] >= 950:
            r["skipped_steps"] = 1
            r["spikes"] = 1


CASES = {
    "guard_skip_in_tail": (inject_guard_skip_in_tail, {"loss_spike"}, 1),
    "healthy": (None, set(), 0),
    "spike": (inject_spike, {"loss_spike"}, 1),
    "plateau": (inject_plateau, {"plateau"}, 1),
    "divergence": (inject_divergence, {"divergence"}, 2),
    "nan_end": (inject_nan_end, {"divergence"}, 2),
    "warmup_rise": (inject_warmup_rise, {"lr_warmup_rise"}, 1),
    "no_progress": (inject_no_progress, {"no_progress"}, 1),
    "skipped": (inject_skipped, {"skipped_steps"}, 1),
    "clipping": (inject_clipping, {"grad_clipping"}, 1),
    "data_stall": (inject_data_stall, {"data_stall"}, 1),
    "throughput_drop": (inject_throughput_drop, {"throughput_drop"}, 1),
    "overfit": (inject_overfit, {"eval_loss_rising"}, 1),
    "corpus_overfit": (inject_corpus_overfit, {"eval_loss_rising"}, 1),
    "corpus_lag": (inject_corpus_lag, {"corpus_divergence"}, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_pathology_gives_exactly_its_finding(tmp_path, case):
    inject, expected, status = CASES[case]
    recs = healthy_records()
    if inject:
        inject(recs)
    findings = diagnose(load_run(write_run(tmp_path / case, recs)))
    assert {f.code for f in findings} == expected, [(f.code, f.summary) for f in findings]
    assert exit_status(findings) == status
    for f in findings:
        assert f.evidence and f.remedy and f.steps


def test_findings_name_the_right_steps(tmp_path):
    recs = healthy_records()
    inject_spike(recs)
    (f,) = diagnose(load_run(write_run(tmp_path / "s", recs)))
    assert f.steps == [500] and "step 500" in f.evidence[0]
    recs = healthy_records()
    inject_throughput_drop(recs)
    (f,) = diagnose(load_run(write_run(tmp_path / "t", recs)))
    assert f.steps == list(range(810, 1001, 10))
    recs = healthy_records()
    inject_corpus_overfit(recs)
    (f,) = diagnose(load_run(write_run(tmp_path / "c", recs)))
    assert f.data["series"] == "val_loss/b" and f.steps == [500, 1000]
    recs = healthy_records()
    inject_divergence(recs)
    (f,) = diagnose(load_run(write_run(tmp_path / "d", recs)))
    assert f.severity == "critical" and any("grad norm" in e for e in f.evidence)


def test_spike_capture_brings_its_samples(tmp_path):
    run = load_run(write_run(tmp_path / "cap", healthy_records(), spikes={300: "@@@ 0000000"}))
    (f,) = diagnose(run)
    assert f.code == "loss_spike" and f.steps == [300]
    assert "sample 42" in f.evidence[0] and "@@@ 0000000" in f.evidence[0]


def test_thresholds_are_flags(tmp_path):
    recs = healthy_records()
    inject_clipping(recs)
    run = load_run(write_run(tmp_path / "r", recs))
    assert diagnose(run, Thresholds(clip_fraction=1.0)) == []
    assert [f.code for f in diagnose(run, Thresholds(clip_grad=2.0))] == []
    assert [f.code for f in diagnose(load_run(write_run(tmp_path / "h", healthy_records())),
                                     Thresholds(data_wait_share=0.005))] == ["data_stall"]


def _tool():
    return load_tool("diagnose_run")


def test_tool_exit_status_and_json(tmp_path, capsys):
    tool = _tool()
    healthy = write_run(tmp_path / "h", healthy_records())
    assert run_tool("diagnose_run.py", tool.main, [healthy]) == 0
    assert "healthy: no finding" in capsys.readouterr().out
    recs = healthy_records()
    inject_divergence(recs)
    bad = write_run(tmp_path / "d", recs)
    assert run_tool("diagnose_run.py", tool.main,
                    [os.path.join(bad, "metrics.jsonl"), "--json"]) == 2
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == 2 and [f["code"] for f in rep["findings"]] == ["divergence"]
    recs = healthy_records()
    inject_clipping(recs)
    warn = write_run(tmp_path / "c", recs)
    assert run_tool("diagnose_run.py", tool.main, [warn]) == 1
    assert run_tool("diagnose_run.py", tool.main, [warn, "--clip-fraction", "1"]) == 0
    capsys.readouterr()
    assert run_tool("diagnose_run.py", tool.main, [str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diagnose_run.py: error:") and err.count("\n") == 1


@pytest.mark.slow
def test_real_run_with_injected_spike(tmp_path):
    """A tiny single-process CPU run; MEGATRON_LITE_INJECT_SPIKE multiplies step 8's loss."""
    from tests.test_training import COMMON, make_dataset

    make_dataset(str(tmp_path / "data"))
    argv = list(COMMON)
    argv[argv.index("--train-iters") + 1] = "10"
    save = str(tmp_path / "ck")
    argv += ["--data-path", str(tmp_path / "data"), "--zero-stage", "1", "--spike-detection",
             "--spike-window", "6", "--save", save]
    env = dict(os.environ, MEGATRON_LITE_INJECT_SPIKE="8:50", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_llama.py"), *argv],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "diagnose_run.py"), save,
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    rep = json.loads(out.stdout)
    spikes = [f for f in rep["findings"] if f["code"] == "loss_spike"]
    assert len(spikes) == 1 and spikes[0]["steps"] == [8], rep
    assert "sample" in spikes[0]["evidence"][0]   # the captured samples are cited
    assert out.returncode == rep["status"] >= 1
