"""Session fixture ``faults``: runs every fault scenario once (real torchrun launches of
pretrain_llama.py, then ONE shared launch of driver.py for all resumes) and hands the outcomes to
the tests in test_faults.py. See docs/reliability.md for the matrix."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import time

import pytest

from tests.faults import harness as h

FSIZE_LIMIT = 2_000_000  # bytes: the tiny model's module file (1.7 MB) fits, a ZeRO shard does not
RANDOM_KILL_SEEDS = (11, 12)


def _fsize_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def _corrupt_copies(root: str, data: str) -> dict[str, str]:
    """Broken copies of the corpus: name -> prefix."""
    out = {}
    for name in ("trunc", "hdr", "foreign"):
        p = os.path.join(root, f"bad_{name}")
        shutil.copyfile(data + ".bin", p + ".bin")
        shutil.copyfile(data + ".idx", p + ".idx")
        out[name] = p
    with open(out["trunc"] + ".bin", "r+b") as f:       # lost the last 10 bytes (5 tokens)
        f.truncate(os.path.getsize(out["trunc"] + ".bin") - 10)
    with open(out["hdr"] + ".idx", "r+b") as f:         # version field overwritten
        f.seek(9)
        f.write(b"\x07")
    # The .idx of a different .bin: a corpus of the same texts minus its first document.
    from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder

    ds = IndexedDataset(data)
    b = IndexedDatasetBuilder(os.path.join(root, "other.bin"), ds.dtype)
    for i in range(1, len(ds)):
        b.add_document(ds[i])
    b.finalize(out["foreign"] + ".idx")
    out["missing"] = os.path.join(root, "no_such_corpus_text_document")
    return out


def _snapshot(ck: str) -> dict:
    """What the checkpoint folder holds right after a faulted launch (before any resume)."""
    from megatron_lite.checkpoint.layout import find_checkpoint, is_complete

    latest = os.path.join(ck, "latest")
    entries = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
    return {"latest": open(latest).read().strip() if os.path.isfile(latest) else None,
            "entries": entries, "found": find_checkpoint(ck),
            "complete": {d: is_complete(os.path.join(ck, d)) for d in entries
                         if os.path.isdir(os.path.join(ck, d))}}


def _launch(root, name, ck, interval, data, tok, env=None, **kw):
    argv = h.run_argv(root, name, ck, interval, data, tok) + kw.pop("extra", [])
    log = os.path.join(root, name + ".log")
    return h.launch(argv, h.env_for(root, name, **(env or {})), log, **kw), log


@pytest.fixture(scope="session")
def faults(tmp_path_factory):
    try:
        yield _run_all(str(tmp_path_factory.mktemp("faults")))
    finally:
        h.kill_leftovers()    # a failed wait must not leave torchrun jobs running


def _run_all(root: str) -> dict:
    data, tok = h.make_corpus(root)
    ck = lambda n: os.path.join(root, "ck_" + n)  # noqa: E731
    out: dict = {"root": root, "data": data, "tok": tok, "times": {}}

    def timed(name, fn):
        t = time.time()
        res = fn()
        out["times"][name] = round(time.time() - t, 1)
        out["ck_" + name] = _snapshot(ck(name))
        return res

    # A: the uninterrupted reference; --load names an empty folder (first start of a job).
    def ref():
        p, log = _launch(root, "ref", ck("ref"), 2, data, tok,
                         env={"MEGATRON_LITE_DUMP_PARAMS": os.path.join(root, "params_ref")})
        return h.finish(p, log)
    out["ref"] = timed("ref", ref)

    # B/C: SIGKILL inside save_checkpoint at step 4 (hook), rank 1 after DeepSpeed's files,
    # rank 0 after the rename but before `latest`.
    for name, point in (("kill_engine", "4:1:engine"), ("kill_rename", "4:0:rename")):
        def killed(name=name, point=point):
            p, log = _launch(root, name, ck(name), 2, data, tok,
                             env={"MEGATRON_LITE_INJECT_SAVE_KILL": point})
            return h.finish(p, log)
        out[name] = timed(name, killed)

    # D/E: SIGKILL of one rank at a random moment (a save every step, so often inside one).
    for seed in RANDOM_KILL_SEEDS:
        name = f"kill_random_{seed}"

        def rand_kill(name=name, seed=seed):
            rng = random.Random(seed)
            k, delay, rank = rng.randint(2, 5), rng.uniform(0.0, 0.25), rng.randint(0, 1)
            p, log = _launch(root, name, ck(name), 1, data, tok)
            pids = h.workers(p)
            h.wait_steps(os.path.join(root, name + ".jsonl"), k, p)
            time.sleep(delay)
            h.send(pids[rank], signal.SIGKILL)
            rc, text = h.finish(p, log)
            return rc, text, {"after_steps": k, "delay_s": delay, "rank": rank}
        out[name] = timed(name, rand_kill)

    # F: SIGTERM to every worker (preemption); G: SIGTERM to the torchrun agent only, which
    # forwards it; H: SIGUSR1 to the agent, forwarded with --signals-to-handle.
    for name, target, sig, targs in (
            ("sigterm_workers", "workers", signal.SIGTERM, ()),
            ("sigterm_agent", "agent", signal.SIGTERM, ()),
            ("sigusr1_agent", "agent", signal.SIGUSR1,
             ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"))):
        def signalled(name=name, target=target, sig=sig, targs=targs):
            p, log = _launch(root, name, ck(name), 100, data, tok, torchrun_args=targs)
            pids = h.workers(p)
            h.wait_steps(os.path.join(root, name + ".jsonl"), 2, p)
            for pid in (pids.values() if target == "workers" else [p.pid]):
                h.send(pid, sig)
            return h.finish(p, log)
        out[name] = timed(name, signalled)

    # I: the disk fills while saving step 4 (RLIMIT_FSIZE on every process); resumed from the
    # reference run's step-2 checkpoint so a previous checkpoint exists.
    def full_disk():
        os.makedirs(ck("disk"))
        shutil.copytree(os.path.join(ck("ref"), "iter_0000002"),
                        os.path.join(ck("disk"), "iter_0000002"))
        with open(os.path.join(ck("disk"), "latest"), "w") as f:
            f.write("iter_0000002\n")
        p, log = _launch(root, "disk", ck("disk"), 2, data, tok, preexec_fn=_fsize_limit)
        return h.finish(p, log)
    out["disk"] = timed("disk", full_disk)

    # J: rank 1 raises before step 3; collectives time out after 1 minute at most.
    def raises():
        p, log = _launch(root, "raise", ck("raise"), 100, data, tok,
                         env={"MEGATRON_LITE_INJECT_RAISE": "3:1"},
                         extra=["--distributed-timeout-minutes", "1"])
        return h.finish(p, log, timeout=200)
    out["raise"] = timed("raise", raises)

    # K: one launch for every resume, the NaN-on-one-rank run and the broken datasets.
    bad = _corrupt_copies(root, data)
    out["bad"] = bad
    runs = []
    for name in ("kill_engine", "kill_rename", *[f"kill_random_{s}" for s in RANDOM_KILL_SEEDS],
                 "sigterm_workers", "sigterm_agent", "sigusr1_agent"):
        argv = h.run_argv(root, name + ".resume", ck(name), 2, data, tok)
        runs.append({"name": name, "argv": argv, "env": {
            "MEGATRON_LITE_LOG_SAMPLES": os.path.join(root, name + ".resume.samples")}})
    runs.append({"name": "nan", "argv": h.run_argv(root, "nan", ck("nan"), 100, data, tok),
                 "env": {"MEGATRON_LITE_INJECT_NAN": "3:1",
                         "MEGATRON_LITE_DUMP_PARAMS": os.path.join(root, "params_nan"),
                         "MEGATRON_LITE_LOG_SAMPLES": os.path.join(root, "nan.samples")}})
    for name, prefix in bad.items():
        runs.append({"name": "bad_" + name,
                     "argv": h.run_argv(root, "bad_" + name, ck("bad_" + name), 100, prefix, tok)})
    spec = os.path.join(root, "driver_spec.json")
    with open(spec, "w") as f:
        json.dump(runs, f)

    def driver():
        res = os.path.join(root, "driver_results.json")
        p = h.launch([spec, res], h.env_for(root, "driver"), os.path.join(root, "driver.log"),
                     script="tests/faults/driver.py")
        rc, text = h.finish(p, os.path.join(root, "driver.log"), timeout=400)
        assert rc == 0, text[-4000:]
        with open(res) as f:
            return json.load(f)
    out["driver"] = timed("driver", driver)
    print("fault suite launch times (s):", out["times"])
    return out
