"""Verified checkpoints and asynchronous saves, in process (no training): checksums against
independent hashes, the manifest's checksums, which folder --load takes when the newest is
damaged (flipped byte, truncated, deleted shard), --no-checkpoint-fallback, --no-verify-checkpoint,
old manifests without checksums, tools/verify_checkpoint.py, the host copy of an asynchronous
save (same bytes, unaffected by the next step) and a failed background write. The end-to-end
proofs with training (2 ranks) are in tests/faults/test_verified_async.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import OrderedDict

import pytest
import torch

from megatron_lite.checkpoint import engine_state as ckpt
from megatron_lite.checkpoint import layout, verify
from megatron_lite.checkpoint.async_save import stage, staged_bytes
from megatron_lite.config import parse_args
from megatron_lite.errors import CheckpointLoadError, CheckpointSaveError
from tests.fixtures_data import load_tool
from tests.test_training import COMMON

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _cfg(*extra):
    return parse_args(COMMON + ["--data-path", "x"] + list(extra), world_size=1)


class _CE:
    """DeepSpeed's checkpoint_engine surface: ``save(state_dict, path)`` through torch.save."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save(self, state_dict, path):
        if self.fail:
            raise OSError(28, "No space left on device")
        torch.save(state_dict, path)


class _Engine:
    """Writes a model file and an optimizer partition through its checkpoint_engine, as
    DeepSpeed's ``save_checkpoint`` does."""

    def __init__(self, fail: bool = False):
        self.checkpoint_engine = _CE(fail)
        flat = torch.arange(64, dtype=torch.float32)
        self.weights = OrderedDict(w=flat[:48].view(6, 8), b=flat[48:])   # views of one buffer
        self.moment = torch.nn.Parameter(torch.ones(16))

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        self.checkpoint_engine.save({"module": self.weights, "step": 3}, os.path.join(d, MODEL))
        self.checkpoint_engine.save(state_dict={"exp_avg": self.moment, "lr": [0.1]},
                                    path=os.path.join(d, OPTIM))


def _sched():
    from megatron_lite.training.schedules import LRScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return LRScheduler(opt, max_lr=0.1, min_lr=0.0, warmup_iters=0, decay_iters=10,
                       decay_style="constant")


def _save(root, it, engine=None, background=False):
    from megatron_lite.training.train_state import TrainState

    engine = engine or _Engine()
    pending = ckpt.start_save(engine, _cfg(), TrainState(iteration=it), _sched(), root,
                              background=background)
    return engine, pending


def _three(root):
    for it in (2, 4, 6):
        _, p = _save(root, it)
        ckpt.commit_save(p, _cfg())
    return [os.path.join(root, layout.tag_for(i)) for i in (2, 4, 6)]


def test_checksums_equal_independent_hashes(tmp_path):
    data = os.urandom(verify.CHUNK + 12345)          # more than one read
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert verify.file_checksum(str(p), "sha256") == hashlib.sha256(data).hexdigest()
    assert verify.file_checksum(str(p), "blake2b") == hashlib.blake2b(data).hexdigest()
    xxhash = pytest.importorskip("xxhash")
    assert verify.file_checksum(str(p), "xxh3_128") == xxhash.xxh3_128(data).hexdigest()
    assert verify.ALGORITHM == "xxh3_128"            # the measured fastest (module docstring)


def test_manifest_records_every_files_size_and_checksum(tmp_path):
    d = _three(str(tmp_path))[-1]
    man = json.load(open(os.path.join(d, "manifest.json")))
    assert man["checksum_algorithm"] == verify.ALGORITHM
    assert set(man["checksums"]) == set(man["files"]) == {
        MODEL, OPTIM, "rng/rank_00000.pt", "trainer_state.json", "run_config.json"}
    for rel, digest in man["checksums"].items():
        raw = open(os.path.join(d, rel), "rb").read()
        assert digest == verify.bytes_checksum(raw) and man["files"][rel] == len(raw)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_falls_back_to_the_previous_with_one_line(tmp_path, damage):
    c2, c4, c6 = _three(str(tmp_path))
    target = os.path.join(c6, MODEL if damage == "flip" else OPTIM)
    size = os.path.getsize(target)
    if damage == "flip":
        _flip(target)
        why = rf"{MODEL} is damaged \(xxh3_128 checksum [0-9a-f]{{32}}, the manifest says " \
              rf"[0-9a-f]{{32}}\)"
    elif damage == "truncate":
        os.truncate(target, size - 100)
        why = rf"{OPTIM} has {size - 100} bytes, the manifest says {size} \(truncated\)"
    else:
        os.remove(target)
        why = rf"{OPTIM} is missing"
    said = []
    assert verify.choose_checkpoint(str(tmp_path), say=said.append) == c4
    assert len(said) == 1
    assert __import__("re").fullmatch(
        rf"\[checkpoint\] iter_0000006 is unusable \({why}\): falling back to iter_0000004",
        said[0]), said
    with pytest.raises(CheckpointLoadError, match=rf"--load {tmp_path}: iter_0000006 is unusable "
                       rf"\({why}\); drop --no-checkpoint-fallback"):
        verify.choose_checkpoint(str(tmp_path), fallback=False, say=said.append)
    # All of them damaged: an error, never a silent start at step 0.
    for c in (c2, c4):
        os.remove(os.path.join(c, MODEL))
    with pytest.raises(CheckpointLoadError, match="no usable checkpoint .*iter_0000002 is "
                       "unusable .*refusing to start from step 0"):
        verify.choose_checkpoint(str(tmp_path), say=said.append)


def test_no_verify_checks_sizes_only_and_old_manifests_load_unverified(tmp_path):
    c2, c4, c6 = _three(str(tmp_path))
    _flip(os.path.join(c6, MODEL))
    said = []
    assert verify.choose_checkpoint(str(tmp_path), verify=False, say=said.append) == c6
    assert said == []
    for c in (c4, c6):            # a manifest written before verified checkpoints
        shutil.rmtree(c)
    layout.write_manifest(c2)
    (tmp_path / "latest").write_text("iter_0000002\n")
    assert verify.choose_checkpoint(str(tmp_path), say=said.append) == c2
    assert said == ["[checkpoint] iter_0000002 has no checksums (saved before verified "
                    "checkpoints): loaded unverified"]
    assert verify.choose_checkpoint(str(tmp_path / "empty")) is None   # a first start


def test_verify_checkpoint_tool(tmp_path, capsys):
    tool = load_tool("verify_checkpoint")
    c2, c4, c6 = _three(str(tmp_path))
    assert tool.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "iter_0000006  ok  5 files" in out and "xxh3_128 checksums match" in out
    assert out.strip().endswith("latest: iter_0000006; --load would resume from iter_0000006")
    _flip(os.path.join(c6, MODEL))
    os.truncate(os.path.join(c6, OPTIM), 10)
    os.makedirs(tmp_path / ".tmp_iter_0000008")
    assert tool.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"iter_0000006  DAMAGED  {MODEL} is damaged (xxh3_128" in out
    assert f"; {OPTIM} has 10 bytes, the manifest says" in out
    assert ".tmp_iter_0000008  unfinished save" in out
    assert "latest: iter_0000006; --load would resume from iter_0000004" in out
    assert tool.main([c4]) == 0 and tool.main([c6]) == 1
    from megatron_lite.eval.tool_cli import run_tool

    os.makedirs(tmp_path / "none")
    assert run_tool("verify_checkpoint.py", tool.main, [str(tmp_path / "none")]) == 2
    assert "verify_checkpoint.py: error: " in capsys.readouterr().err


def test_stage_copies_storages_once_and_serialises_to_the_same_bytes():
    flat = torch.arange(10.0, requires_grad=False)
    shared = {"x": 1}
    sd = OrderedDict(a=flat[:4].view(2, 2), b=flat[4:], p=torch.nn.Parameter(torch.ones(3)),
                     g=torch.zeros(2, requires_grad=True), s1=shared, s2=shared, t=(1, "u"))
    memo: dict = {}
    copy = stage(sd, memo)
    assert type(copy) is OrderedDict and copy["s1"] is copy["s2"]
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr() \
        != flat.untyped_storage().data_ptr()
    assert staged_bytes(memo) == 10 * 4 + 3 * 4 + 2 * 4
    f1, f2 = io.BytesIO(), io.BytesIO()
    torch.save(sd, f1)
    torch.save(copy, f2)
    assert f1.getvalue() == f2.getvalue()
    flat.add_(1.0)                                   # the next step changes the live state
    assert copy["b"].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_async_save_writes_the_boundary_state_with_the_sync_bytes(tmp_path):
    sync_dir, async_dir = str(tmp_path / "s"), str(tmp_path / "a")
    _, p = _save(sync_dir, 2)
    ckpt.commit_save(p, _cfg())
    engine, pending = _save(async_dir, 2, background=True)
    rng_memo: dict = {}
    stage(ckpt.rng_state(), rng_memo)
    # Extra host memory: the module's buffer and the moment once each, plus the RNG states.
    assert pending.background.host_bytes == 64 * 4 + 16 * 4 + staged_bytes(rng_memo)
    with torch.no_grad():                            # training goes on before the write ends
        engine.weights["b"].add_(100.0)
        engine.moment.mul_(3.0)
    assert layout.find_checkpoint(async_dir) is None            # not committed yet
    final = ckpt.commit_save(pending, _cfg())
    a = json.load(open(os.path.join(final, "manifest.json")))["checksums"]
    s = json.load(open(os.path.join(sync_dir, "iter_0000002", "manifest.json")))["checksums"]
    for rel in (MODEL, OPTIM, "rng/rank_00000.pt", "trainer_state.json"):
        assert a[rel] == s[rel], rel
    assert verify.choose_checkpoint(async_dir) == final


def test_failed_background_write_marks_nothing_complete(tmp_path):
    root = str(tmp_path)
    _, p = _save(root, 2)
    ckpt.commit_save(p, _cfg())
    _, pending = _save(root, 4, engine=_Engine(fail=True), background=True)
    with pytest.raises(CheckpointSaveError, match=r"saving iter_0000004 to .* failed on rank 0: "
                       r"OSError: \[Errno 28\] No space left on device\. Nothing was marked "
                       r"complete \('latest' still names iter_0000002\)"):
        ckpt.commit_save(pending, _cfg())
    assert sorted(d for d in os.listdir(root) if "iter_" in d) == ["iter_0000002"]


def test_flags():
    ck = _cfg().checkpoint
    assert (ck.async_save, ck.no_verify_checkpoint, ck.no_checkpoint_fallback) == (False,) * 3
    cfg = _cfg("--async-save", "--no-verify-checkpoint", "--no-checkpoint-fallback", "--save",
               "/tmp/x", "--save-interval", "5")
    ck = cfg.checkpoint
    assert (ck.async_save, ck.no_verify_checkpoint, ck.no_checkpoint_fallback) == (True,) * 3
    from megatron_lite.config import format_plan

    assert ("checkpoints             : every 5 steps, after the last step, async (host copy at the "
            "step boundary, written by a background thread); --load checks sizes only "
            "(--no-verify-checkpoint), damaged newest -> error") in format_plan(cfg).splitlines()
    assert "checkpoints  " not in format_plan(_cfg())                 # no --save: no line


class _Logger:
    """The TrainingLogger surface CheckpointSaver uses."""

    class timers:  # noqa: N801 - mimics the attribute
        @staticmethod
        def time(name):
            import contextlib

            return contextlib.nullcontext()

    @staticmethod
    def exclude_time():
        import contextlib

        return contextlib.nullcontext()


def test_saver_commits_when_written_waits_before_the_next_save_and_on_exit(tmp_path):
    """--async-save through the Trainer's CheckpointSaver: a save is committed at the first step
    boundary after its thread finished, a second save first commits the pending one, and a save
    on an exit signal (stopping) is complete when maybe_save returns."""
    import threading

    from megatron_lite.training.callbacks.checkpoint_saver import CheckpointSaver
    from megatron_lite.training.train_state import TrainState

    gate = threading.Event()

    class _SlowCE(_CE):
        def save(self, state_dict, path):
            gate.wait(30)                            # the write lasts until the test opens it
            super().save(state_dict, path)

    engine = _Engine()
    engine.checkpoint_engine = _SlowCE()
    cfg = _cfg("--save", str(tmp_path), "--save-interval", "2", "--async-save")
    saver = CheckpointSaver(cfg, engine, _sched(), _Logger(), None, lambda: None)
    st = TrainState(iteration=2)
    saver.maybe_save(st, stopping=False)
    assert saver.pending is not None and layout.find_checkpoint(str(tmp_path)) is None
    st.iteration = 3
    saver.maybe_save(st, stopping=False)             # still writing: nothing committed
    assert saver.pending is not None and not os.path.exists(tmp_path / "latest")
    gate.set()
    saver.pending.background.thread.join()
    st.iteration = 4
    saver.maybe_save(st, stopping=False)             # commits step 2, then starts step 4
    assert (tmp_path / "latest").read_text() == "iter_0000002\n"
    assert saver.pending is not None and saver.pending.iteration == 4
    st.iteration = 5
    saver.maybe_save(st, stopping=True)              # exit signal: 4 and 5 complete on return
    assert saver.pending is None and (tmp_path / "latest").read_text() == "iter_0000005\n"
    assert verify.choose_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000005")
    assert layout.is_complete(str(tmp_path / "iter_0000004"))
