"""bench/device_check.sh stays runnable without a GPU: its --cpu-dry-run runs every step with
tiny shapes on the CPU (issue 17 item 5), and its measurement half reads the training log's own
figures."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import device_bench  # noqa: E402


def test_variants_cover_the_issue_and_skip_cuda_ones_on_cpu():
    rows = {name: (flags, skip) for name, flags, skip in device_bench.variants(cuda=False)}
    assert {"eager", "compile", "attn-flash", "attn-flex", "attn-eager", "fused-liger", "fused-apex",
            "chunked-ce"} <= set(rows)
    for name in ("attn-flash", "attn-flex", "fused-liger", "fused-apex"):
        assert rows[name][1] and "CUDA" in rows[name][1]
    for name in ("eager", "compile", "attn-eager", "chunked-ce"):
        assert rows[name][1] is None
    assert "--compile" in rows["compile"][0] and "chunked" in rows["chunked-ce"][0]


def test_planner_estimate_is_the_plan_runs(tmp_path):
    """The bench's 'planned' column is tools/plan_run.py's per-device memory for the same flags."""
    from megatron_lite.config import parse_args
    from megatron_lite.planning.run_config import memory_verdict

    flags = device_bench.GPU_SHAPE + ["--vocab-size", "32000", "--zero-stage", "0", "--tp", "1",
                                      "--global-batch-size", "1", "--train-iters", "10"]
    planned = device_bench.planner_bytes(flags, "h100")
    assert planned and planned > 2 ** 30
    line = memory_verdict(parse_args(flags, world_size=1), "h100")
    assert f"{planned / 2 ** 30:.1f} GiB" in line


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh"), "--cpu-dry-run",
                          "--out", str(tmp_path), "--steps", "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    doc = json.load(open(tmp_path / "device_check.json"))
    steps = {s["name"]: s["status"] for s in doc["steps"]}
    assert list(steps) == ["environment", "build", "gpu-tests", "measurements"]
    assert steps["gpu-tests"].startswith("skipped: no GPU")
    rows = {r["name"]: r for r in doc["measurements"]["rows"]}
    for name in ("eager", "compile", "attn-eager", "chunked-ce"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["tokens_per_sec_per_device"] > 0 and rows[name]["peak_memory_bytes"] > 0
    assert rows["attn-flash"]["status"].startswith("skipped: needs CUDA")
    assert "device_check summary (CPU dry run)" in res.stdout
