"""Verified checkpoints and ``--async-save`` end to end (issue 20 #4, #5; docs/reliability.md):
2 ranks, tiny model, the real entrypoint, as the rest of tests/faults.

Launches (once per module): ``sync``, the uninterrupted reference saving every 2 steps;
``async``, the same command line with ``--async-save`` and rank 1 SIGKILLed inside its
background write of step 6 (hook ``MEGATRON_LITE_INJECT_SAVE_KILL=6:1:async_write``); then one
driver launch resuming (a) the killed async run and (b) three copies of the reference's
checkpoints 2, 4, 6 whose newest has one byte flipped / one ZeRO shard truncated / one shard
deleted, and (c) a flipped copy with ``--no-checkpoint-fallback``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest

from megatron_lite.checkpoint import layout
from tests.faults import harness as h
from tests.fixtures_data import load_tool

pytestmark = [pytest.mark.faults, pytest.mark.slow]
N = h.TRAIN_ITERS
MODEL = "mp_rank_00_model_states.pt"
SHARD = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
DAMAGES = ("flip", "truncate", "delete")


def _damage(ck: str, kind: str) -> str:
    """Damage iter_0000006 of ``ck``; returns the damaged file's name."""
    d = os.path.join(ck, "iter_0000006")
    if kind == "flip":
        p = os.path.join(d, MODEL)
        with open(p, "r+b") as f:
            f.seek(os.path.getsize(p) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
        return MODEL
    name = SHARD.format(1 if kind == "truncate" else 0)
    if kind == "truncate":
        os.truncate(os.path.join(d, name), os.path.getsize(os.path.join(d, name)) // 2)
    else:
        os.remove(os.path.join(d, name))
    return name


def _copy_three(src: str, dst: str) -> None:
    os.makedirs(dst)
    for it in (2, 4, 6):
        shutil.copytree(os.path.join(src, layout.tag_for(it)), os.path.join(dst, layout.tag_for(it)))
    with open(os.path.join(dst, "latest"), "w") as f:
        f.write("iter_0000006\n")


def _tool(path: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = load_tool("verify_checkpoint").main([path])
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def va(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("verified_async"))
    try:
        yield _run_all(root)
    finally:
        h.kill_leftovers()


def _run_all(root: str) -> dict:
    data, tok = h.make_corpus(root)
    ck = lambda n: os.path.join(root, "ck_" + n)  # noqa: E731
    out: dict = {"root": root}

    def launch(name, extra=(), env=None):
        argv = h.run_argv(root, name, ck(name), 2, data, tok) + list(extra)
        p = h.launch(argv, h.env_for(root, name, **(env or {})), os.path.join(root, name + ".log"))
        return h.finish(p, os.path.join(root, name + ".log"))

    out["sync"] = launch("sync")
    out["async"] = launch("async", ["--async-save"],
                          {"MEGATRON_LITE_INJECT_SAVE_KILL": "6:1:async_write"})
    out["async_entries"] = sorted(os.listdir(ck("async")))
    out["async_latest"] = open(os.path.join(ck("async"), "latest")).read().strip()
    runs = [{"name": "async", "argv": h.run_argv(root, "async.resume", ck("async"), 2, data, tok)
             + ["--async-save"]}]
    out["damaged"], out["tool"] = {}, {"good": _tool(ck("sync"))}
    for kind in (*DAMAGES, "nofallback"):
        _copy_three(ck("sync"), ck(kind))
        out["damaged"][kind] = _damage(ck(kind), "flip" if kind == "nofallback" else kind)
        extra = ["--no-checkpoint-fallback"] if kind == "nofallback" else []
        runs.append({"name": kind, "argv": h.run_argv(root, kind, ck(kind), 2, data, tok) + extra})
        if kind in DAMAGES:
            out["tool"][kind] = _tool(ck(kind))
    spec, res = os.path.join(root, "spec.json"), os.path.join(root, "results.json")
    with open(spec, "w") as f:
        json.dump(runs, f)
    p = h.launch([spec, res], h.env_for(root, "driver"), os.path.join(root, "driver.log"),
                 script="tests/faults/driver.py")
    rc, out["driver_log"] = h.finish(p, os.path.join(root, "driver.log"), timeout=400)
    assert rc == 0, out["driver_log"][-4000:]
    with open(res) as f:
        out["driver"] = json.load(f)
    return out


def _losses(root, name):
    return {s: r["loss"] for s, r in h.read_metrics(os.path.join(root, name + ".jsonl")).items()}


def test_async_save_trains_identically_and_writes_the_sync_files(va):
    rc, log = va["sync"]
    assert rc == 0, log[-3000:]
    root = va["root"]
    ref = _losses(root, "sync")
    assert sorted(ref) == list(range(1, N + 1))
    killed = _losses(root, "async")
    assert killed and all(killed[s] == ref[s] for s in killed)      # bit for bit on CPU
    # Checkpoints 2 and 4 were committed by the async run: every file but run_config.json (which
    # records --async-save) is byte-identical to the synchronous save's.
    for it in (2, 4):
        tag = layout.tag_for(it)
        a = json.load(open(os.path.join(root, "ck_async", tag, "manifest.json")))["checksums"]
        s = json.load(open(os.path.join(root, "ck_sync", tag, "manifest.json")))["checksums"]
        assert set(a) == set(s) and [k for k in s if a[k] != s[k]] == ["run_config.json"]
    assert "training blocked" in va["async"][1] and "written in the background" in va["async"][1]


def test_kill_during_async_write_leaves_previous_checkpoint_and_resume_is_bitwise(va):
    rc, log = va["async"]
    assert rc != 0 and "Signal 9 (SIGKILL) received by PID" in log
    assert va["async_latest"] == "iter_0000004"
    assert ".tmp_iter_0000006" in va["async_entries"] and "iter_0000006" not in va["async_entries"]
    assert va["driver"]["async"] == {"iteration": N, "skipped": 0, "consumed_samples": 4 * N}
    ref, got = _losses(va["root"], "sync"), _losses(va["root"], "async.resume")
    assert sorted(got) == list(range(5, N + 1))
    assert all(got[s] == ref[s] for s in got)       # resumed after an async save == sync run


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(va, kind):
    name = va["damaged"][kind]
    assert va["driver"][kind] == {"iteration": N, "skipped": 0, "consumed_samples": 4 * N}
    why = {"flip": f"{name} is damaged (xxh3_128 checksum ", "truncate": f"{name} has ",
           "delete": f"{name} is missing): falling back to iter_0000004"}[kind]
    line = [ln for ln in va["driver_log"].splitlines() if "iter_0000006 is unusable" in ln
            and why in ln]
    assert len(line) == 1 and line[0].startswith("[checkpoint] iter_0000006 is unusable (") \
        and line[0].endswith(": falling back to iter_0000004"), line
    ref, got = _losses(va["root"], "sync"), _losses(va["root"], kind)
    assert sorted(got) == list(range(5, N + 1)) and all(got[s] == ref[s] for s in got)
    rc, text = va["tool"][kind]                     # the offline tool, before the resume
    assert rc == 1 and f"iter_0000006  DAMAGED  {why.split(')')[0]}" in text
    assert "iter_0000004  ok" in text and "--load would resume from iter_0000004" in text


def test_no_checkpoint_fallback_is_a_one_line_error_and_tool_passes_good_dirs(va):
    err = va["driver"]["nofallback"]["error"]
    assert err.startswith(f"CheckpointLoadError: --load {va['root']}/ck_nofallback: "
                          f"iter_0000006 is unusable ({MODEL} is damaged (xxh3_128 checksum ")
    assert err.endswith("; drop --no-checkpoint-fallback to resume from the previous checkpoint, "
                        "or --load an earlier iter_ folder") and "\n" not in err
    rc, text = va["tool"]["good"]
    assert rc == 0 and text.count("  ok  ") == 4 and "--load would resume from iter_0000008" in text
