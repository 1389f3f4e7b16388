"""Fault injection end to end (docs/reliability.md): SIGKILL of one rank (inside a save and at
random moments), SIGTERM/SIGUSR1 preemption, a full disk while saving, a rank that raises, NaN on
one rank, broken datasets, ``--load`` of an empty folder. Each asserts the outcome: which
checkpoint is chosen, that the resumed run's losses (bit for bit on CPU), LRs, consumed samples and
per-rank sample ids equal the uninterrupted run's, exit codes and messages.

All launches happen once per session in the ``faults`` fixture (tests/faults/conftest.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_lite.checkpoint import layout
from tests.faults import harness as h

pytestmark = [pytest.mark.faults, pytest.mark.slow]
N = h.TRAIN_ITERS


def _ck(f, name):
    return os.path.join(f["root"], "ck_" + name)


def _latest(f, name):
    with open(os.path.join(_ck(f, name), "latest")) as fh:
        return fh.read().strip()


def _iter(path):
    return int(os.path.basename(path).split("_")[1])


def _assert_matches_reference(f, metrics_name, samples_prefix, steps):
    """Steps ``steps`` of a run have the reference's loss bits, LR, consumed samples and the same
    sample ids on every rank (no sample repeated or skipped)."""
    root = f["root"]
    ref = h.read_metrics(os.path.join(root, "ref.jsonl"))
    ref_s = h.read_samples(os.path.join(root, "ref.samples"))
    got = h.read_metrics(os.path.join(root, metrics_name + ".jsonl"))
    got_s = h.read_samples(os.path.join(root, samples_prefix))
    assert sorted(got) == list(steps), (metrics_name, sorted(got))
    for s in steps:
        assert got[s]["loss"] == ref[s]["loss"], (metrics_name, s)   # bitwise on CPU
        assert got[s]["lr"] == ref[s]["lr"], (metrics_name, s)
        assert got[s]["consumed_samples"] == ref[s]["consumed_samples"] == 4 * s
        for rank in (0, 1):
            assert got_s[(s, rank)] == ref_s[(s, rank)], (metrics_name, s, rank)


def _assert_resumed(f, name, from_iter):
    res = f["driver"][name]
    assert res == {"iteration": N, "skipped": 0, "consumed_samples": 4 * N}, res
    _assert_matches_reference(f, name + ".resume", name + ".resume.samples",
                              range(from_iter + 1, N + 1))
    assert _latest(f, name) == layout.tag_for(N)
    assert not [d for d in os.listdir(_ck(f, name)) if d.startswith(".tmp_")]


def test_reference_run_and_load_of_empty_folder_starts_fresh(faults):
    rc, log = faults["ref"]
    assert rc == 0, log[-3000:]
    assert "no complete checkpoint found; starting from scratch" in log
    ref = h.read_metrics(os.path.join(faults["root"], "ref.jsonl"))
    assert sorted(ref) == list(range(1, N + 1)) and ref[N]["loss"] < ref[1]["loss"]
    samples = h.read_samples(os.path.join(faults["root"], "ref.samples"))
    ids = [i for s in range(1, N + 1) for r in (0, 1) for i in samples[(s, r)]]
    assert len(ids) == len(set(ids)) == 4 * N        # each global batch: 4 distinct samples
    # The manifest lists every rank's files with their sizes.
    man = json.load(open(os.path.join(_ck(faults, "ref"), "iter_0000008", "manifest.json")))
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(man["files"])


def test_sigkill_inside_save_before_manifest(faults):
    """Rank 1 dies after DeepSpeed wrote its files for step 4: the temporary folder has no
    manifest, `latest` names step 2, which --load picks; the resume equals the reference."""
    rc, log = faults["kill_engine"]
    assert rc != 0 and "Signal 9 (SIGKILL) received by PID" in log
    snap = faults["ck_kill_engine"]
    assert snap["latest"] == "iter_0000002"
    assert ".tmp_iter_0000004" in snap["entries"] and "iter_0000004" not in snap["entries"]
    assert snap["complete"][".tmp_iter_0000004"] is False
    assert snap["found"] == os.path.join(_ck(faults, "kill_engine"), "iter_0000002")
    _assert_resumed(faults, "kill_engine", 2)     # and the next save removed the .tmp_ folder


def test_sigkill_between_rename_and_latest(faults):
    """Rank 0 dies after renaming iter_0000004 but before `latest`: the lineage `latest` names
    (step 2) is resumed; step 4 is re-saved over the complete but unnamed folder."""
    rc, _ = faults["kill_rename"]
    assert rc != 0
    snap = faults["ck_kill_rename"]
    assert snap["latest"] == "iter_0000002" and snap["complete"]["iter_0000004"] is True
    assert snap["found"] == os.path.join(_ck(faults, "kill_rename"), "iter_0000002")
    _assert_resumed(faults, "kill_rename", 2)
    assert layout.is_complete(os.path.join(_ck(faults, "kill_rename"), "iter_0000004"))


@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_one_rank_at_random_moment(faults, seed):
    name = f"kill_random_{seed}"
    rc, log, moment = faults[name]
    assert rc != 0, log[-2000:]
    root = faults["root"]
    killed = h.read_metrics(os.path.join(root, name + ".jsonl"))
    assert moment["after_steps"] <= max(killed) < N
    # Steps run before the kill were the reference's steps.
    _assert_matches_reference(faults, name, name + ".samples", range(1, max(killed) + 1))
    # Every renamed iter_ folder is complete (saves ran every step); --load picks the newest, which
    # is the killed run's last or second-to-last step (killed inside that step's save).
    snap = faults["ck_" + name]
    iters = sorted(d for d in snap["entries"] if d.startswith("iter_"))
    assert all(snap["complete"][d] for d in iters)
    assert snap["found"] == os.path.join(_ck(faults, name), snap["latest"]) and \
        snap["latest"] == iters[-1]
    k = _iter(snap["found"])
    assert max(killed) - 1 <= k <= max(killed), (moment, max(killed), k)
    _assert_resumed(faults, name, k)


@pytest.mark.parametrize("name", ["sigterm_workers", "sigterm_agent", "sigusr1_agent"])
def test_preemption_signal_saves_at_step_boundary(faults, name):
    rc, log = faults[name]
    if name == "sigterm_workers":
        assert rc == 0, log[-3000:]   # torchrun exits 0 only when every worker exited 0
    else:
        # The agent re-raises the signal as SignalException after its workers stopped: exit 1
        # (documented in docs/reliability.md); the workers themselves saved and returned 0.
        assert rc == 1, log[-3000:]
        assert "forcefully exiting via SIGKILL" not in log
    assert "[exit] signal received: stopping after step" in log
    killed = h.read_metrics(os.path.join(faults["root"], name + ".jsonl"))
    snap = faults["ck_" + name]
    assert snap["found"] is not None and _iter(snap["found"]) == max(killed) and 2 <= max(killed) < N
    assert snap["latest"] == layout.tag_for(max(killed))
    _assert_matches_reference(faults, name, name + ".samples", range(1, max(killed) + 1))
    _assert_resumed(faults, name, max(killed))


def test_full_disk_while_saving_keeps_previous_checkpoint_and_stops(faults):
    rc, log = faults["disk"]
    assert rc != 0
    assert "pretrain_llama.py: checkpoint save failed: saving iter_0000004" in log
    assert "Nothing was marked complete ('latest' still names iter_0000002); training stops" in log
    snap = faults["ck_disk"]
    assert snap["latest"] == "iter_0000002"
    assert [d for d in snap["entries"] if "iter_" in d] == ["iter_0000002"]   # no tmp, no 4
    assert snap["found"] == os.path.join(_ck(faults, "disk"), "iter_0000002")
    m = h.read_metrics(os.path.join(faults["root"], "disk.jsonl"))
    assert sorted(m) == [3, 4]            # resumed at 2, trained 3 and 4, stopped at the save


def test_rank_that_raises_ends_the_job(faults):
    rc, log = faults["raise"]                      # finish() bounds it: no hang in a collective
    assert rc != 0
    assert "RuntimeError: MEGATRON_LITE_INJECT_RAISE: injected failure on rank 1 before step 3" \
        in log
    # the other rank: one line naming the lost peer (parallel/peers.py), not a traceback
    assert "pretrain_llama.py: error: rank 0: lost rank 1 (host " in log
    assert max(h.read_metrics(os.path.join(faults["root"], "raise.jsonl"))) == 2


def test_nan_on_one_rank_skips_on_all_without_divergence(faults):
    assert faults["driver"]["nan"] == {"iteration": N, "skipped": 1, "consumed_samples": 4 * N}
    root = faults["root"]
    m = h.read_metrics(os.path.join(root, "nan.jsonl"))
    ref = h.read_metrics(os.path.join(root, "ref.jsonl"))
    assert m[3]["loss"] is None and m[3]["skipped_steps"] == 1
    assert [m[s]["loss"] for s in (1, 2)] == [ref[s]["loss"] for s in (1, 2)]
    assert m[4]["lr"] == m[3]["lr"] == ref[3]["lr"]    # the schedule did not advance
    a = torch.load(os.path.join(root, "params_nan", "rank_0.pt"))
    b = torch.load(os.path.join(root, "params_nan", "rank_1.pt"))
    r = torch.load(os.path.join(root, "params_ref", "rank_0.pt"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)         # DP replicas identical
    assert any(not torch.equal(a[k], r[k]) for k in a)     # and the skip changed the trajectory
    ra = torch.load(os.path.join(root, "params_ref", "rank_1.pt"))
    assert all(torch.equal(r[k], ra[k]) for k in r)


@pytest.mark.parametrize("kind,message", [
    ("trunc", "IndexedDatasetError: {p}.bin: 21938 bytes on disk, but {p}.idx describes 10974 "
              "tokens of uint16 = 21948 bytes (truncated, or .bin and .idx come from different "
              "runs)"),
    ("hdr", "IndexedDatasetError: {p}.idx: index version 7, only version 1 is supported"),
    ("foreign", "IndexedDatasetError: {p}.bin: 21948 bytes on disk, but {p}.idx describes 10952 "
                "tokens of uint16 = 21904 bytes (truncated, or .bin and .idx come from different "
                "runs)"),
    ("missing", "FileNotFoundError: {p}.idx does not exist: --data-path takes the prefix without "
                ".bin/.idx, e.g. 'corpus_text_document' for corpus_text_document.bin/.idx")])
def test_broken_dataset_refused_before_any_step(faults, kind, message):
    """Refused on every rank when the dataset is opened, naming the file; no step ran."""
    assert faults["driver"]["bad_" + kind] == {"error": message.format(p=faults["bad"][kind])}
    assert h.read_metrics(os.path.join(faults["root"], f"bad_{kind}.jsonl")) == {}
