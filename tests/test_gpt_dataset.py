"""Packing GPT dataset: exact sample boundaries, masks/positions around EOD, C++ == NumPy, caching."""

import os
import socket

import numpy as np
import pytest
import torch

from megatron_lite.data import helpers
from megatron_lite.data.builder import build_data_loader, build_train_valid_test_datasets
from megatron_lite.data.collate import collate_samples
from megatron_lite.data.data_config import DataConfig
from megatron_lite.data.gpt_dataset import GPTDataset, split_document_ranges
from megatron_lite.data.indexed import IndexedDatasetBuilder

DOCS = [[1, 2, 3, 0], [], [4, 5, 0], [6, 7, 8, 9, 10, 0]]  # 0 = EOD; 13 tokens


def write(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_document(np.array(d, dtype=np.int64))
    b.finalize(prefix + ".idx")
    return prefix


def megatron_loop(sizes, doc_idx, L, n):
    """Line-by-line transliteration of Megatron-LM's build_sample_idx loop (the definition)."""
    out = [[0, 0]]
    k = off = 0
    for _ in range(n):
        rem = L + 1
        while rem != 0:
            length = int(sizes[doc_idx[k]]) - off
            rem -= length
            if rem <= 0:
                off += rem + length - 1
                rem = 0
            else:
                k += 1
                off = 0
        out.append([k, off])
    return np.array(out, dtype=np.int64)


def test_sample_boundaries_by_hand(tmp_path):
    ds = GPTDataset(write(str(tmp_path / "c"), DOCS), (0, 4), 4, 5, eod_id=0, shuffle=False)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 10 0 | 1 2 3 0 4 5 0 6 7 8 9 10 0 ; B = (13-1)//4 = 3 per epoch
    assert len(ds) == 6 and ds.num_epochs == 2
    assert ds.sample_idx.tolist() == [[0, 0], [2, 0], [3, 1], [3, 5], [4, 3], [7, 0], [7, 4]]
    expect = [[1, 2, 3, 0, 4], [4, 5, 0, 6, 7], [7, 8, 9, 10, 0], [0, 1, 2, 3, 0], [0, 4, 5, 0, 6],
              [6, 7, 8, 9, 10]]
    for i, e in enumerate(expect):
        s = ds[i]
        assert s["tokens"].tolist() == e[:-1] and s["labels"].tolist() == e[1:]
        assert s["position_ids"].tolist() == [0, 1, 2, 3] and s["loss_mask"].tolist() == [1, 1, 1, 1]
        assert s["cu_seqlens"].tolist() == [0, 4]
    assert ds[0]["document_ids"].tolist() == [0, 2]  # the empty document 1 contributes nothing
    assert ds[4]["document_ids"].tolist() == [0, 2, 3]
    with pytest.raises(IndexError):
        ds[6]


def test_eod_flags_megatron_semantics(tmp_path):
    ds = GPTDataset(write(str(tmp_path / "c"), DOCS), (0, 4), 4, 5, eod_id=0, shuffle=False,
                    reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    s1, s3, s4 = ds[1], ds[3], ds[4]  # inputs [4 5 0 6], [0 1 2 3], [0 4 5 0]
    assert s1["loss_mask"].tolist() == [1, 1, 0, 1]  # keyed on the input token being EOD
    assert s1["position_ids"].tolist() == [0, 1, 2, 0] and s1["cu_seqlens"].tolist() == [0, 3, 4]
    assert s3["loss_mask"].tolist() == [0, 1, 1, 1]
    assert s3["position_ids"].tolist() == [0, 0, 1, 2] and s3["cu_seqlens"].tolist() == [0, 1, 4]
    assert s4["loss_mask"].tolist() == [0, 1, 1, 0]
    assert s4["position_ids"].tolist() == [0, 0, 1, 2] and s4["cu_seqlens"].tolist() == [0, 1, 4]
    only_pos = GPTDataset(ds.indexed, (0, 4), 4, 5, eod_id=0, shuffle=False, reset_position_ids=True)
    assert only_pos[1]["position_ids"].tolist() == [0, 1, 2, 0]
    assert only_pos[1]["cu_seqlens"].tolist() == [0, 4] and only_pos[1]["loss_mask"].tolist() == [1] * 4


def test_shuffled_epochs_cover_stream(tmp_path):
    rng = np.random.default_rng(3)
    docs = [list(rng.integers(1, 50, rng.integers(0, 9))) + [0] * int(rng.random() < .7) for _ in range(40)]
    ix = write(str(tmp_path / "r"), docs)
    ds = GPTDataset(ix, (5, 35), 7, 50, seed=11, eod_id=0)
    B = ds.samples_per_epoch
    assert len(ds) % B == 0 and len(ds) >= 50
    for b in range(ds.num_epochs):  # each epoch's documents are a permutation of the split
        assert sorted(ds.doc_idx[b * 30:(b + 1) * 30].tolist()) == list(range(5, 35))
        assert sorted(ds.shuffle_idx[b * B:(b + 1) * B].tolist()) == list(range(b * B, (b + 1) * B))
    stream = np.concatenate([np.array(docs[d], dtype=np.int64) for d in ds.doc_idx])
    inv = np.argsort(ds.shuffle_idx)
    for j in range(len(ds)):  # the unshuffled j-th sample is stream[j*L : j*L + L + 1]
        t, _ = ds.get_text(int(inv[j]))
        assert t.tolist() == stream[j * 7:j * 7 + 8].tolist()
    again = GPTDataset(ix, (5, 35), 7, 50, seed=11, eod_id=0)
    other = GPTDataset(ix, (5, 35), 7, 50, seed=12, eod_id=0)
    assert np.array_equal(again.shuffle_idx, ds.shuffle_idx) and not np.array_equal(other.doc_idx, ds.doc_idx)
    # growing the dataset keeps the order of the samples already there (blend resume relies on it)
    big = GPTDataset(ix, (5, 35), 7, 3 * len(ds), seed=11, eod_id=0)
    assert all(np.array_equal(big[i]["tokens"], ds[i]["tokens"]) for i in range(len(ds)))


def test_cpp_equals_numpy_and_megatron_loop():
    rng = np.random.default_rng(0)
    for trial in range(5):
        sizes = rng.integers(0, 30, 200).astype(np.int32)
        sizes[:3] = 0 if trial % 2 else sizes[:3]
        doc_idx = np.concatenate([rng.permutation(200) for _ in range(2)]).astype(np.int32)
        L = int(rng.integers(1, 40))
        n = (int(sizes[doc_idx].astype(np.int64).sum()) - 1) // L
        ref = megatron_loop(sizes, doc_idx, L, n)
        assert np.array_equal(helpers.build_sample_idx_numpy(sizes, doc_idx, L, n), ref)
        if helpers.have_cpp():
            assert np.array_equal(helpers.build_sample_idx_cpp(sizes, doc_idx, L, n), ref)
            assert np.array_equal(helpers.build_sample_idx_cpp(sizes, doc_idx.astype(np.int64), L, n), ref)
    for f in [helpers.build_sample_idx_numpy] + ([helpers.build_sample_idx_cpp] if helpers.have_cpp() else []):
        with pytest.raises(ValueError, match="fewer than"):
            f(np.array([3, 4], np.int32), np.array([0, 1]), 3, 3)


def test_over_2_pow_31_tokens():
    big = 2**31 - 1
    sizes = np.array([big, 0, 5, big, 2**30], dtype=np.int32)
    doc_idx = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    L = 2**28 + 3
    total = 2 * big + 5 + 2**30
    n = (total - 1) // L
    idx = helpers.build_sample_idx_numpy(sizes, doc_idx, L, n)
    starts = np.concatenate([[0], np.cumsum(sizes[doc_idx].astype(np.int64))[:-1]])
    assert idx[-1, 0] == 4 and np.array_equal(starts[idx[1:, 0]] + idx[1:, 1], np.arange(1, n + 1) * L)
    assert (idx[:, 1] < sizes[doc_idx[idx[:, 0]]]).all()
    if helpers.have_cpp():
        assert np.array_equal(helpers.build_sample_idx_cpp(sizes, doc_idx, L, n), idx)


def test_zero_length_documents_everywhere(tmp_path):
    docs = [[], [], [7], [], [], [8, 9, 0], [], [1], [], []]
    ds = GPTDataset(write(str(tmp_path / "z"), docs), (0, 10), 2, 6, eod_id=0, shuffle=False,
                    reset_position_ids=True, reset_attention_mask=True)
    # stream per epoch 7 8 9 0 1 (5 tokens) -> B = 2 samples per epoch
    assert [ds[i]["tokens"].tolist() + [int(ds[i]["labels"][-1])] for i in range(len(ds))] == \
        [[7, 8, 9], [9, 0, 1], [1, 7, 8], [8, 9, 0], [0, 1, 7], [7, 8, 9]]
    shuffled = GPTDataset(ds.indexed, (0, 10), 2, 40, eod_id=0)
    assert all(len(shuffled[i]["tokens"]) == 2 for i in range(len(shuffled)))


def test_too_small_split_and_ranges(tmp_path):
    ix = write(str(tmp_path / "s"), [[1, 2], [3]])
    with pytest.raises(ValueError, match="fewer than seq_length"):
        GPTDataset(ix, (0, 2), 4, 1)
    assert len(GPTDataset(ix, (0, 2), 4, 0)) == 0
    assert split_document_ranges(1000, (.969, .03, .001)) == ((0, 969), (969, 999), (999, 1000))
    assert split_document_ranges(10, (.969, .03, .001)) == ((0, 10), (10, 10), (10, 10))
    # bounds 0, round(3.5)=4, 4+round(3.5)=8, 8; Megatron subtracts the drift (1) from every bound after 0
    assert split_document_ranges(7, (.5, .5, 0)) == ((0, 3), (3, 7), (7, 7))


def test_cache_reuse_and_invalidation(tmp_path):
    ix = write(str(tmp_path / "c"), DOCS)
    cache = str(tmp_path / "cache")
    a = GPTDataset(ix, (0, 4), 4, 5, seed=1, cache_dir=cache)
    assert not a.cache_hit and len(os.listdir(cache)) == 4
    b = GPTDataset(ix, (0, 4), 4, 5, seed=1, cache_dir=cache)
    assert b.cache_hit and np.array_equal(a.shuffle_idx, b.shuffle_idx)
    assert not GPTDataset(ix, (0, 4), 4, 5, seed=2, cache_dir=cache).cache_hit
    assert not GPTDataset(ix, (0, 4), 3, 5, seed=1, cache_dir=cache).cache_hit
    write(ix, DOCS[:3] + [[6, 7, 8, 9, 10, 11, 0]])  # corpus changed in place
    c = GPTDataset(ix, (0, 4), 4, 5, seed=1, cache_dir=cache)
    assert not c.cache_hit and len(os.listdir(cache)) == 16
    assert not any(f.endswith(".tmp") for f in os.listdir(cache))
    blocker = tmp_path / "file"
    blocker.write_text("")  # a cache "directory" below a regular file cannot be created
    with pytest.warns(UserWarning, match="cannot write the index cache"):
        d = GPTDataset(ix, (0, 4), 4, 5, seed=1, cache_dir=str(blocker / "sub"))
    assert not d.cache_hit and np.array_equal(d.shuffle_idx, c.shuffle_idx)


def _dist_worker(rank, world, port, prefix, cache, q):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    ds = GPTDataset(prefix, (0, 4), 4, 5, seed=3, cache_dir=cache)
    q.put((rank, ds.cache_hit, [ds[i]["tokens"].tolist() for i in range(len(ds))]))
    torch.distributed.destroy_process_group()


def test_one_rank_builds_others_wait(tmp_path):
    ix = write(str(tmp_path / "c"), DOCS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, ix, str(tmp_path / "cache"), q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict((r, (hit, toks)) for r, hit, toks in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert res[0][0] is False and res[1][0] is True and res[0][1] == res[1][1]


def test_collate_and_loader(tmp_path):
    ix = write(str(tmp_path / "c"), DOCS)
    cfg = DataConfig(data_path=[ix], split="1,0,0", no_shuffle=True, reset_attention_mask=True,
                     reset_position_ids=True, data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(cfg, 4, (5, 0, 0), seed=1, eod_id=0)
    assert valid is None and test is None and len(train) == 6
    batches = list(build_data_loader(train, 1, 2, 1, 2, num_workers=0))
    assert len(batches) == 1  # samples [1, 5) in micro-batches of 2*2; rank 1 takes 3, 4
    b = batches[0]
    assert b["tokens"].tolist() == [[0, 1, 2, 3], [0, 4, 5, 0]] and b["tokens"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32 and b["position_ids"].tolist() == [[0, 0, 1, 2], [0, 0, 1, 2]]
    assert b["cu_seqlens"].tolist() == [0, 1, 4, 5, 8] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 3 and b["sample_ids"].tolist() == [3, 4] and b["dataset_ids"].tolist() == [0, 0]
    plain = collate_samples([GPTDataset(ix, (0, 4), 4, 5, shuffle=False)[i] for i in (0, 1)])
    assert plain["cu_seqlens"].tolist() == [0, 4, 8] and plain["max_seqlen"] == 4


def test_fallback_without_extension_warns_once():
    code = (
        "import sys, warnings, numpy as np\n"
        "sys.modules['megatron_lite._data_helpers'] = None\n"
        "from megatron_lite.data import helpers as h\n"
        "assert not h.have_cpp()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = h.build_sample_idx(np.array([3, 0, 4], np.int32), np.array([0, 1, 2]), 2, 3)\n"
        "    b = h.build_blending_indices([0.5, 0.5], 3)\n"
        "assert sum('NumPy reference' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "assert a.tolist() == [[0, 0], [0, 2], [2, 1], [2, 3]], a.tolist()\n"
        "assert b[0].tolist() == [0, 1, 0]\n")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
