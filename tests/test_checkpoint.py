"""Checkpoints: only complete folders are loaded, keep-last, model-mismatch errors, inference
loading, resume with a different DP size, SIGTERM saves and exits 0, --load with nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_lite.config import parse_args
from megatron_lite.checkpoint import compat, layout
from megatron_lite.checkpoint import engine_state as ckpt
from megatron_lite.checkpoint import weights as ckpt_weights
from megatron_lite.errors import CheckpointSaveError
from tests.test_training import COMMON, e2e, read_metrics  # noqa: F401 (session fixture)


def _fake_ckpt(root, it, files=("mp_rank_00_model_states.pt", "trainer_state.json")):
    d = os.path.join(root, layout.tag_for(it))
    os.makedirs(d)
    for f in files:
        with open(os.path.join(d, f), "w") as fh:
            fh.write("x" * (10 + it))
    layout.write_manifest(d)
    return d


def test_only_complete_checkpoints_are_chosen(tmp_path):
    root = str(tmp_path)
    assert layout.find_checkpoint(root) is None
    c2 = _fake_ckpt(root, 2)
    c4 = _fake_ckpt(root, 4)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000004\n")
    assert layout.find_checkpoint(root) == c4
    os.remove(os.path.join(c4, "trainer_state.json"))          # a file went missing
    with pytest.warns(UserWarning, match="incomplete"):
        assert layout.find_checkpoint(root) == c2
    with open(os.path.join(c2, "trainer_state.json"), "a") as f:
        f.write("truncated-or-grown")                           # size no longer matches
    with pytest.warns(UserWarning):
        assert layout.find_checkpoint(root) is None
    # A half-written save (temporary folder, no manifest) is never picked either.
    c6 = _fake_ckpt(root, 6)
    os.rename(c6, os.path.join(root, ".tmp_iter_0000008"))
    with pytest.warns(UserWarning):
        assert layout.find_checkpoint(root) is None
    assert layout.find_checkpoint(c4) is None and not layout.is_complete(c4)


def test_keep_last(tmp_path):
    for it in (1, 2, 3, 4):
        _fake_ckpt(str(tmp_path), it)
    layout.prune(str(tmp_path), 2)
    assert [os.path.basename(p) for p in layout.list_checkpoints(str(tmp_path))] == \
        ["iter_0000003", "iter_0000004"]


def test_rollback_save_is_not_pruned_and_later_tags_are_not_resumed(tmp_path):
    """--load DIR/iter_N --save DIR after a spike: the new lineage's saves survive --keep-last and
    a restart never falls back to the abandoned later iterations."""
    root = str(tmp_path)
    for it in (10, 15, 20):
        _fake_ckpt(root, it)
    c11 = _fake_ckpt(root, 11)                      # first save after rolling back to iter 10
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000011\n")
    with pytest.warns(UserWarning, match="abandoned"):
        layout.prune(root, 2)
    assert [os.path.basename(p) for p in layout.list_checkpoints(root)] == \
        ["iter_0000010", "iter_0000011", "iter_0000015", "iter_0000020"]
    assert layout.find_checkpoint(root) == c11
    os.remove(os.path.join(c11, "trainer_state.json"))  # latest broken: fall back before it
    with pytest.warns(UserWarning, match="incomplete"):
        assert layout.find_checkpoint(root) == os.path.join(root, "iter_0000010")


def _cfg(*extra):
    return parse_args(COMMON + ["--data-path", "x"] + list(extra), world_size=2)


def test_mismatch_that_changes_the_model_is_an_error():
    saved = _cfg().to_dict()
    compat.check_compatible(saved, _cfg("--seq-length", "32", "--global-batch-size", "4"))
    with pytest.raises(ValueError, match="--hidden-size: checkpoint 128, this run 256"):
        compat.check_compatible(saved, _cfg("--hidden-size", "256"))
    with pytest.raises(ValueError, match="--tensor-model-parallel-size: checkpoint 1, this run 2"):
        compat.check_compatible(saved, _cfg("--tp", "2"))
    with pytest.raises(ValueError, match="padded vocab"):
        compat.check_compatible(saved, _cfg("--make-vocab-size-divisible-by", "512"))


def test_load_with_no_checkpoint_warns_and_starts_fresh(tmp_path):
    from megatron_lite.training.step import TrainState

    cfg = _cfg("--load", str(tmp_path))
    st = TrainState()
    with pytest.warns(UserWarning, match="starting from scratch"):
        assert ckpt.load_checkpoint(None, cfg, st, None) is None
    assert st.iteration == 0


def test_zero1_resume_with_other_dp_size_reshards_the_optimizer_state(tmp_path):
    """D=2 -> D=1 at ZeRO-1 is no longer refused: the load goes to zero_reshard, which reads
    every saved DP rank's partition (this fake checkpoint has none, so it names the first
    missing file); a stage change is refused in one line (tests/test_zero_reshard.py runs it)."""
    from megatron_lite.training.step import TrainState

    saved = _cfg("--zero-stage", "1")                      # world 2: D = 2
    d = _fake_ckpt(str(tmp_path), 3, files=())
    with open(os.path.join(d, "run_config.json"), "w") as f:
        json.dump({"config": saved.to_dict()}, f)
    with open(os.path.join(d, "trainer_state.json"), "w") as f:
        json.dump({"zero_stage": 1, "data_parallel_size": 2, "world_size": 2}, f)
    torch.save({"param_shapes": [{"w": torch.Size([2])}], "ds_config": {}},
               os.path.join(d, "mp_rank_00_model_states.pt"))
    layout.write_manifest(d)
    now = parse_args(COMMON + ["--data-path", "x", "--zero-stage", "1", "--load", str(tmp_path)],
                     world_size=1)
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        ckpt.load_checkpoint(None, now, TrainState(), None)
    now = parse_args(COMMON + ["--data-path", "x", "--zero-stage", "2", "--load", str(tmp_path)],
                     world_size=1)
    with pytest.raises(ValueError, match="resume with --zero-stage 1 or pass --no-load-optim"):
        ckpt.load_checkpoint(None, now, TrainState(), None)


@pytest.mark.slow
def test_inference_loading_zero0_and_zero3(e2e):  # noqa: F811
    root, _, _ = e2e
    m0, cfg0 = ckpt_weights.load_model_for_inference(os.path.join(root, "ck_z0"), 0, 1)
    m3, cfg3 = ckpt_weights.load_model_for_inference(os.path.join(root, "ck_z3"), 0, 1)
    assert cfg0.parallel.zero_stage == 0 and cfg3.parallel.zero_stage == 3
    assert cfg0.derived.data_parallel_size == 2 and not m0.training
    s0, s3 = m0.state_dict(), m3.state_dict()
    assert s0.keys() == s3.keys()
    for k in s0:      # the ZeRO-0 and ZeRO-3 runs trained the same model
        # Adam's update is ~lr * sign(g) for tiny g, so reduction-order noise can move a
        # near-zero-gradient element by up to ~lr (3e-3) per step; the bulk agrees to 1e-6.
        torch.testing.assert_close(s0[k], s3[k], rtol=0, atol=3e-3)
        assert (s0[k] - s3[k]).abs().mean() < 1e-6, k
    torch.manual_seed(7)
    from megatron_lite.model.llama import LlamaModel

    init = LlamaModel(cfg0.model).state_dict()
    assert any(not torch.equal(init[k], s0[k]) for k in s0)
    with pytest.raises(ValueError, match="num-attention-heads 4 is not divisible"):
        ckpt_weights.load_model_for_inference(os.path.join(root, "ck_z0"), 0, 8)
    for f in ("config.yaml", "run_info.json", "deepspeed_config.json"):   # run folder = --save
        assert os.path.isfile(os.path.join(root, "ck_z0", f)), f
    ds = json.load(open(os.path.join(root, "ck_z0", "deepspeed_config.json")))
    assert ds["zero_optimization"]["stage"] == 0 and ds["train_batch_size"] == 4
    man = json.load(open(os.path.join(root, "ck_z0", "iter_0000006", "manifest.json")))["files"]
    assert "rng/rank_00001.pt" in man and "run_config.json" in man


def _run(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "pretrain_llama.py", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_resume_with_different_dp_size_keeps_data_position(e2e, tmp_path):  # noqa: F811
    root, _, _ = e2e
    load = str(tmp_path / "ck")
    os.makedirs(load)
    shutil.copytree(os.path.join(root, "ck_z0", "iter_0000003"), os.path.join(load, "iter_0000003"))
    metrics = str(tmp_path / "m.jsonl")
    p = _run(COMMON + ["--data-path", os.path.join(root, "data"), "--zero-stage", "0",
                       "--load", load, "--metrics-file", metrics])   # 1 process: D=1, A=4
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert "RNG states not restored" in out
    ref = read_metrics(os.path.join(root, "z0.jsonl"))
    got = read_metrics(metrics)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):   # same samples in the same global batches: same loss up to fp order
        assert got[s]["consumed_samples"] == ref[s]["consumed_samples"]
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5)
        assert got[s]["lr"] == ref[s]["lr"]


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_exits_zero(e2e, tmp_path):  # noqa: F811
    root, _, _ = e2e
    save = str(tmp_path / "ck")
    metrics = str(tmp_path / "m.jsonl")
    argv = [a if a != "6" else "400" for a in COMMON]    # --train-iters 400
    p = _run(argv + ["--data-path", os.path.join(root, "data"), "--zero-stage", "0",
                     "--save", save, "--metrics-file", metrics])
    deadline = time.time() + 600      # generous: start-up is slow on a loaded 2-core machine
    started = False
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2:
            started = True
            break
        time.sleep(0.5)
    if not started:
        p.kill()
        pytest.fail("training did not log 2 steps: " + p.communicate()[0][-3000:])
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "signal received" in out
    saved = layout.find_checkpoint(save)
    st = json.load(open(os.path.join(saved, "trainer_state.json")))
    assert 2 <= st["iteration"] < 400
    assert st["consumed_samples"] == 4 * st["iteration"]
    assert max(read_metrics(metrics)) == st["iteration"]


def test_blend_state_restored_through_build_data(tmp_path):
    """The per-source counts a checkpoint saves (TrainState.data_state) are applied when the data is
    rebuilt: changing the weights on resume keeps the consumed prefix and re-derives the rest."""
    import numpy as np

    from megatron_lite.config import parse_args
    from megatron_lite.training.setup import build_data
    from tests.test_training import make_dataset

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a)
    make_dataset(b)

    def cfg_for(wa, wb):
        return parse_args(["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "64",
                           "--micro-batch-size", "1", "--global-batch-size", "4",
                           "--train-iters", "50", "--split", "100,0,0", "--eval-interval", "0",
                           "--num-workers", "0", "--device", "cpu",
                           "--data-cache-path", str(tmp_path / "cache"),
                           "--data-path", str(wa), a, str(wb), b], world_size=1)

    ds1 = build_data(cfg_for(0.5, 0.5), 0, None).train_ds
    state = ds1.state_dict(40)
    assert state["source_consumed"] == [20, 20]
    ds2 = build_data(cfg_for(0.9, 0.1), 40, state).train_ds
    # Positions before the resume point are never read again; from it on the new weights apply.
    assert ds2.source_consumed(40).tolist() == [20, 20]
    later = np.bincount(ds2.dataset_index[40:140].astype(np.int64), minlength=2)
    assert later.tolist() == [90, 10]
    # Each source continues with its next sample (20, 21, ...): nothing repeated or skipped.
    for j, n in ((0, 90), (1, 10)):
        taken = ds2.dataset_sample_index[40:140][ds2.dataset_index[40:140] == j]
        assert taken.tolist() == list(range(20, 20 + n))


def test_manifest_coverage_of_all_ranks(tmp_path):
    """Rank 0 refuses to mark a checkpoint complete when it cannot see a file another rank wrote
    (--save on node-local disks), or sees it with another size (a write still in flight)."""
    mine = {"mp_rank_00_model_states.pt": 10, "rng/rank_00000.pt": 5}
    layout.check_coverage([mine, dict(mine)], mine, "D/.tmp_iter_0000002")   # shared FS: fine
    other = {"zero_pp_rank_1_mp_rank_00_optim_states.pt": 7, "rng/rank_00001.pt": 5}
    with pytest.raises(CheckpointSaveError,
                       match=r"rank 1 sees zero_pp_rank_1_mp_rank_00_optim_states.pt \(7 bytes\) "
                             r"but rank 0 sees None bytes: --save must be a filesystem shared"):
        layout.check_coverage([mine, other], mine, "D/.tmp_iter_0000002")
    with pytest.raises(CheckpointSaveError, match=r"sees rng/rank_00000.pt \(6 bytes\)"):
        layout.check_coverage([mine, {"rng/rank_00000.pt": 6}], mine, "D")


class _FilesEngine:
    """The DeepSpeed engine surface save_checkpoint uses: writes one module file of ``size``
    bytes."""

    def __init__(self, size):
        self.size = size

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"m" * self.size)


def _sched():
    from megatron_lite.training.schedules import LRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return LRScheduler(opt, max_lr=0.1, min_lr=0.0, warmup_iters=0, decay_iters=10,
                       decay_style="constant")


def test_save_is_complete_fsynced_and_a_failed_save_changes_nothing(tmp_path, monkeypatch):
    synced = []
    real = ckpt.fsync_path
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: (synced.append(p), real(p)))
    from megatron_lite.training.step import TrainState

    d2 = ckpt.save_checkpoint(_FilesEngine(100), _cfg(), TrainState(iteration=2), _sched(),
                              str(tmp_path))
    assert layout.find_checkpoint(str(tmp_path)) == d2 and layout.is_complete(d2)
    man = json.load(open(os.path.join(d2, "manifest.json")))["files"]
    assert man["mp_rank_00_model_states.pt"] == 100 and "rng/rank_00000.pt" in man
    tmp = os.path.join(str(tmp_path), ".tmp_iter_0000002")
    # every file fsynced before the rename, the folder itself, and DIR after the rename
    assert {os.path.join(tmp, f) for f in man if f not in ("trainer_state.json", "run_config.json")} \
        <= set(synced)
    assert tmp in synced and synced.count(str(tmp_path)) == 2
    # A write that fails (here: the engine raises like a full disk) marks nothing complete.

    def full(save_dir, tag, save_latest=False):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        raise OSError(28, "No space left on device")

    engine = _FilesEngine(100)
    engine.save_checkpoint = full
    with pytest.raises(CheckpointSaveError) as e:
        ckpt.save_checkpoint(engine, _cfg(), TrainState(iteration=4), _sched(), str(tmp_path))
    assert str(e.value) == (
        f"saving iter_0000004 to {tmp_path} failed on rank 0: OSError: [Errno 28] No space left "
        f"on device. Nothing was marked complete ('latest' still names iter_0000002); training "
        f"stops. Free disk space (or lower --keep-last) and restart with --load {tmp_path}")
    assert sorted(d for d in os.listdir(tmp_path) if "iter_" in d) == ["iter_0000002"]
    assert layout.find_checkpoint(str(tmp_path)) == d2


def test_each_rank_fsyncs_the_files_it_wrote(tmp_path, monkeypatch):
    """With DeepSpeed's checkpoint_engine observable, a rank fsyncs exactly its own files (its
    engine's saves and its RNG file), not another rank's."""
    from megatron_lite.training.step import TrainState

    class _CE:
        def save(self, state_dict, path):
            with open(path, "wb") as f:
                f.write(b"s" * 3)

    class _Engine:
        checkpoint_engine = _CE()

        def save_checkpoint(self, save_dir, tag, save_latest=False):
            d = os.path.join(save_dir, tag)
            os.makedirs(d, exist_ok=True)
            self.checkpoint_engine.save({}, os.path.join(d, "mine.pt"))
            self.checkpoint_engine.save(state_dict={}, path=os.path.join(d, "mine2.pt"))
            with open(os.path.join(d, "other_rank.pt"), "wb") as f:   # not through this rank
                f.write(b"o")

    synced = []
    monkeypatch.setattr(ckpt, "fsync_path", synced.append)
    eng = _Engine()
    d = ckpt.save_checkpoint(eng, _cfg(), TrainState(iteration=1), _sched(), str(tmp_path))
    tmp = os.path.join(str(tmp_path), ".tmp_iter_0000001")
    files = [p for p in synced if os.path.basename(os.path.dirname(p)) in (".tmp_iter_0000001", "rng")
             and p != os.path.join(tmp, "rng")]
    assert sorted(os.path.relpath(p, tmp) for p in files) == ["mine.pt", "mine2.pt",
                                                             "rng/rank_00000.pt"]
    assert "save" not in vars(eng.checkpoint_engine)          # the recording wrapper is removed
    assert layout.is_complete(d) and "other_rank.pt" in json.load(
        open(os.path.join(d, "manifest.json")))["files"]
