"""--packing best-fit|none (issue 18 item 1): the packed index by hand, C++ == NumPy, every token once
per epoch, no short document split, padding masks, resume/caching, blend, default concat unchanged,
config errors, and tools/inspect_data.py --packing-report / --index guard."""

import hashlib
import json

import numpy as np
import pytest

from megatron_lite.config import ConfigError, format_plan, parse_args
from megatron_lite.data import helpers
from megatron_lite.data.builder import build_data_loader, build_train_valid_test_datasets
from megatron_lite.data.collate import collate_samples
from megatron_lite.data.data_config import DataConfig
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDatasetBuilder
from tests.fixtures_data import load_tool


def write(prefix, docs):
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:
        b.add_document(np.asarray(d, dtype=np.int64))
    b.finalize(prefix + ".idx")
    return prefix


def unique_corpus(prefix, n_docs=90, max_len=30, seed=0):
    """Documents whose tokens are all distinct (1, 2, 3, ...), some empty, some longer than L + 1."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], 1
    for _ in range(n_docs):
        n = int(rng.integers(0, max_len))
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return write(prefix, docs), docs


def rows(segs, starts):
    return [[tuple(r) for r in segs[starts[b]:starts[b + 1]].tolist()] for b in range(len(starts) - 1)]


def both(*args):
    """The NumPy reference, checked equal to the C++ builder when it is built."""
    ref = helpers.build_packed_idx_numpy(*args)
    if helpers.have_cpp():
        cpp = helpers.build_packed_idx_cpp(*args)
        assert all(np.array_equal(a, b) for a, b in zip(ref, cpp))
    return rows(*ref)


def test_packed_index_by_hand_and_cpp_equals_numpy():
    sizes = np.array([3, 4, 2, 1, 12, 2], np.int32)
    docs = np.arange(6)
    # C = 5: pieces (0,0,3) (1,0,4) (2,0,2) (3,0,1) (4,0,5) (4,5,5) (4,10,2) (5,0,2); decreasing
    # best fit: 5 | 5 | 4 (+1 into free 1) | 3 (+2 fills free 2, not the bin with free 1) | 2 + 2
    assert both(sizes, docs, 5, "best-fit", 6, False) == [
        [(4, 0, 5)], [(4, 5, 5)], [(1, 0, 4), (3, 0, 1)], [(0, 0, 3), (2, 0, 2)], [(4, 10, 2), (5, 0, 2)]]
    assert both(sizes, docs, 5, "none", 6, False) == [
        [(0, 0, 3)], [(1, 0, 4)], [(2, 0, 2)], [(3, 0, 1)], [(4, 0, 5)], [(4, 5, 5)], [(4, 10, 2)], [(5, 0, 2)]]
    three = np.array([3, 3, 3], np.int32)
    # fill: bin 2 (least filled) gives its last 2 tokens to bin 0, then its first token to bin 1
    assert both(three, np.arange(3), 5, "best-fit", 10, True) == [[(0, 0, 3), (2, 1, 2)], [(1, 0, 3), (2, 0, 1)]]
    assert both(three, np.arange(3), 5, "best-fit", 2, False) == [[(0, 0, 3)], [(1, 0, 3)], [(2, 0, 3)]]
    assert both(np.array([10], np.int32), np.arange(1), 5, "best-fit", 1, False) == [[(0, 0, 5)], [(0, 5, 5)]]
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(0, 80))
        sizes = rng.integers(0, 50, n).astype(np.int32)
        order = rng.permutation(n).astype(np.int32 if trial % 2 else np.int64)
        for mode, fill in (("best-fit", False), ("best-fit", True), ("none", False)):
            both(sizes, order, int(rng.integers(1, 30)), mode, int(rng.integers(1, 40)), fill)
    for f in [helpers.build_packed_idx_numpy] + ([helpers.build_packed_idx_cpp] if helpers.have_cpp() else []):
        with pytest.raises(ValueError):
            f(three, np.array([0, 3]), 5, "best-fit", 4, False)
        with pytest.raises(ValueError, match="window"):
            f(three, np.arange(3), 5, "best-fit", 0, False)


def test_old_extension_falls_back_to_the_reference(monkeypatch):
    sizes = np.array([3, 4, 2, 1, 12, 2], np.int32)
    expect = both(sizes, np.arange(6), 5, "best-fit", 6, True)
    monkeypatch.setattr(helpers, "_ext", object())  # an extension built before build_packed_idx
    monkeypatch.setattr(helpers, "_warned_packed", False)
    with pytest.warns(UserWarning, match="predates build_packed_idx"):
        got = helpers.build_packed_idx(sizes, np.arange(6), 5, "best-fit", 6, True)
    assert rows(*got) == expect


def real_text(s):
    """The data tokens of a padded sample (labels -100 mark padding) and its padding slots."""
    r = int((s["labels"] != -100).sum()) + 1
    text = np.concatenate([s["tokens"], s["labels"][-1:]])
    return text[:r], r


@pytest.mark.parametrize("fill", [False, True])
def test_best_fit_every_token_once_per_epoch_and_short_documents_whole(tmp_path, fill):
    prefix, docs = unique_corpus(str(tmp_path / "u"))
    L = 9
    ds = GPTDataset(prefix, (0, len(docs)), L, 300, seed=4, eod_id=0, packing="best-fit", packing_window=25,
                    packing_fill=fill, cache_dir=str(tmp_path / "cache"))
    all_tokens = sorted(t for d in docs for t in d)
    where = {}
    assert ds.num_epochs >= 2 and len(ds) == sum(ds.epoch_samples) >= 300
    lo = 0
    for e, B in enumerate(ds.epoch_samples):
        seen, not_full = [], 0
        for i in range(lo, lo + B):
            s = ds[i]
            text, r = real_text(s)
            seen += text.tolist()
            not_full += r < L + 1
            assert (s["tokens"][r:] == 0).all() and (s["loss_mask"][r - 1:] == 0).all()
            for t in text.tolist():
                where[t] = (i, text)
        assert sorted(seen) == all_tokens, f"epoch {e}: a token missing or repeated"
        if fill:
            assert not_full <= -(-len(docs) // 25)  # at most one padded sample per window
        lo += B
    for d in docs:
        if d and not fill:  # (fill may split the documents of the samples it empties)
            # a short document lies whole and in order in one sample; a long one in L + 1 pieces
            for k in range(0, len(d), L + 1):
                piece = d[k:k + L + 1]
                i, text = where[piece[0]]
                assert len(d) > L + 1 or where[piece[-1]][0] == i
                j = text.tolist().index(piece[0])
                assert text[j:j + len(piece)].tolist() == piece


def test_padded_masks_position_ids_and_collate(tmp_path):
    prefix = write(str(tmp_path / "c"), [[1, 2, 3, 0], [], [4, 5, 0], [6, 7, 8, 9, 10, 0], [11, 0],
                                        list(range(12, 23)) + [0]])
    flags = dict(eod_id=0, shuffle=False, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    bf = GPTDataset(prefix, (0, 6), 5, 5, packing="best-fit", **flags)
    # pieces (C = 6): 4, 3, 6, 2, 6, 6 -> bins [6,7,8,9,10,0] [12..17] [18..22,0] [1,2,3,0,11,0] [4,5,0]
    s = bf[3]
    assert s["tokens"].tolist() == [1, 2, 3, 0, 11] and s["labels"].tolist() == [2, 3, 0, 11, 0]
    assert s["loss_mask"].tolist() == [1, 1, 1, 0, 1] and s["position_ids"].tolist() == [0, 1, 2, 3, 0]
    assert s["cu_seqlens"].tolist() == [0, 4, 5] and s["document_ids"].tolist() == [0, 4]
    p = bf[4]  # [4, 5, 0] then padding: padding is its own segment, positions restart, no loss
    assert p["tokens"].tolist() == [4, 5, 0, 0, 0] and p["labels"].tolist() == [5, 0, -100, -100, -100]
    assert p["loss_mask"].tolist() == [1, 1, 0, 0, 0] and p["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert p["cu_seqlens"].tolist() == [0, 3, 5]
    plain = GPTDataset(prefix, (0, 6), 5, 5, eod_id=0, shuffle=False, packing="best-fit")[4]
    assert plain["loss_mask"].tolist() == [1, 1, 0, 0, 0] and plain["position_ids"].tolist() == [0, 1, 2, 3, 4]
    assert plain["cu_seqlens"].tolist() == [0, 5]  # causal attention: data never sees the padding after it
    b = collate_samples([s, p], vocab_size=30)
    assert b["cu_seqlens"].tolist() == [0, 4, 5, 8, 10] and b["labels"][1, 2] == -100
    none = GPTDataset(prefix, (0, 6), 5, 7, packing="none", **flags)
    assert none.epoch_samples == [6, 6] and [none[i]["document_ids"].tolist() for i in range(6)] == \
        [[0], [2], [3], [4], [5], [5]]
    n3 = none[3]
    assert n3["tokens"].tolist() == [11, 0, 0, 0, 0] and n3["loss_mask"].tolist() == [1, 0, 0, 0, 0]
    assert n3["position_ids"].tolist() == [0, 1, 0, 1, 2] and n3["cu_seqlens"].tolist() == [0, 2, 5]
    assert none[4]["tokens"].tolist() == [12, 13, 14, 15, 16] and none[5]["labels"].tolist() == [19, 20, 21, 22, 0]


def test_cache_resume_and_blend(tmp_path):
    prefix, docs = unique_corpus(str(tmp_path / "u"), n_docs=40)
    cache = str(tmp_path / "cache")
    kw = dict(seed=3, eod_id=0, packing="best-fit", packing_window=8, cache_dir=cache)
    small = GPTDataset(prefix, (0, 40), 7, 30, **kw)
    big = GPTDataset(prefix, (0, 40), 7, 5 * len(small), **kw)  # more epochs: the entry is rebuilt
    again = GPTDataset(prefix, (0, 40), 7, 30, **kw)  # the cache holds more epochs than needed
    assert not small.cache_hit and not big.cache_hit and again.cache_hit and len(again) == len(small)
    assert big.num_epochs > small.num_epochs and big.epoch_samples[:small.num_epochs] == small.epoch_samples
    assert all(np.array_equal(big[i]["tokens"], small[i]["tokens"]) for i in range(len(small)))
    assert not GPTDataset(prefix, (0, 40), 7, 30, **dict(kw, packing_window=9)).cache_hit
    desc = json.load(open(next(f for f in (tmp_path / "cache").iterdir() if f.name.endswith("description.json"))))
    assert desc["packing"] == "best-fit" and desc["window"] in (8, 9)
    # resume at consumed_samples k reads exactly the samples the uninterrupted run reads from k
    full = [b["tokens"] for b in build_data_loader(big, 0, 2, 0, 1)]
    resumed = [b["tokens"] for b in build_data_loader(big, 6, 2, 0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(full[3:], resumed)) and len(resumed) == len(full) - 3
    other = write(str(tmp_path / "o"), [[900 + i, 901 + i, 0] for i in range(30)])
    cfg = DataConfig(data_path=["0.5", prefix, "0.5", other], split="1,0,0", packing="best-fit",
                     packing_window=8, data_cache_path=cache)
    train, _, _ = build_train_valid_test_datasets(cfg, 7, (40, 0, 0), seed=3, eod_id=0)
    for i in range(40):
        s = train[i]
        text = real_text(s)[0]
        ok = ((text >= 900) | (text == 0)).all() if s["dataset_id"] == 1 else (text < 900).all()
        assert ok and len(text) <= 8


def test_default_concat_unchanged(tmp_path):
    """Samples of the default (and explicit concat) mode hash as before packing modes existed."""
    rng = np.random.default_rng(5)
    docs = []
    for _ in range(60):
        n = int(rng.integers(0, 30))
        docs.append(np.concatenate([rng.integers(1, 500, n), [0]]) if n else np.zeros(0, np.int64))
    prefix = write(str(tmp_path / "c"), docs)
    for kw in ({}, {"packing": "concat", "packing_window": 3, "packing_fill": True}):
        ds = GPTDataset(prefix, (3, 57), 16, 150, seed=7, eod_id=0, reset_position_ids=True,
                        reset_attention_mask=True, eod_mask_loss=True, cache_dir=str(tmp_path / "cache"), **kw)
        h = hashlib.sha256()
        for i in range(len(ds)):
            s = ds[i]
            for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "document_ids"):
                h.update(np.ascontiguousarray(s[k]).tobytes())
        # recorded with the GPTDataset of commit ccbd189 (before --packing)
        assert (len(ds), h.hexdigest()) == (196, "5061ca24082fbaefd1b05da737a49c8b1558a817cbb774a93815446dc3bb870b")
    names = sorted(f.name.split("-", 1)[1] for f in (tmp_path / "cache").iterdir())
    assert names == ["train-description.json", "train-doc_idx.npy", "train-sample_idx.npy", "train-shuffle_idx.npy"]


BASE = ["--model-size", "tiny", "--vocab-size", "1000", "--seq-length", "128", "--train-iters", "10"]


def test_flags_errors_and_plan(tmp_path):
    cfg = parse_args(BASE + ["--packing", "best-fit", "--packing-window", "64"])
    assert (cfg.data.packing, cfg.data.packing_window, cfg.data.packing_fill) == ("best-fit", 64, False)
    assert "packing                 : best-fit  (best-fit decreasing over 64 documents" in format_plan(cfg)
    assert "packing" not in format_plan(parse_args(BASE))  # the default run's plan is unchanged
    with pytest.raises(ConfigError, match="--packing-window must be >= 1"):
        parse_args(BASE + ["--packing-window", "0"])
    yml = tmp_path / "c.yaml"
    yml.write_text("data:\n  packing: bestfit\n")
    with pytest.raises(ConfigError, match="data.packing='bestfit' is not one of"):
        parse_args(BASE + ["--config", str(yml)])
    yml.write_text("data:\n  packing: none\n  packing_window: -2\n")
    with pytest.raises(ConfigError, match=r"^\[data\] --packing-window must be >= 1 documents, got -2$"):
        parse_args(BASE + ["--config", str(yml)])
    with pytest.raises(ValueError, match="--packing must be concat, best-fit or none"):
        DataConfig(packing="bestfit")
    with pytest.raises(ConfigError, match="argument --packing: invalid choice: 'fit'"):
        parse_args(BASE + ["--packing", "fit"])


def test_packing_report_and_index_guard(tmp_path, capsys):
    tool = load_tool("inspect_data")
    # L = 4, C = 5; disk order 3, 2, 7, 1 tokens: concat samples [0,4] [4,8] [8,12]: the 3-token
    # document lies in sample 0, the 2-token one in 0, the 7-token one in 1 and 2, the last in 2
    prefix = write(str(tmp_path / "r"), [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]])
    base = ["--data-path", prefix, "--seq-length", "4", "--split", "1,0,0", "--no-shuffle", "--packing-report"]
    assert tool.main(base + ["--json"]) == 0
    rep = {r["mode"]: r for r in json.loads(capsys.readouterr().out)}
    assert rep["concat"] == {"mode": "concat", "samples": 3, "tokens_per_sample": 5.0, "padding_share": 0.0,
                             "truncated_share": 0.25}
    # best-fit: pieces 3, 2, 5, 2, 1 -> [5] [3 2] [2 1]: 13 data tokens in 15 slots; the 7-token
    # document (longer than C) is the one cut
    assert rep["best-fit"]["samples"] == 3 and rep["best-fit"]["truncated_share"] == 0.25
    assert rep["best-fit"]["padding_share"] == pytest.approx(2 / 15)
    assert rep["best-fit+fill"]["samples"] == 3 and rep["none"]["samples"] == 5
    assert rep["none"]["padding_share"] == pytest.approx(1 - 13 / 25)
    assert tool.main(base + ["--limit", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["samples"] == 1
    assert tool.main(base) == 0 and "best-fit+fill" in capsys.readouterr().out
    far = ["--data-path", prefix, "--seq-length", "4", "--split", "1,0,0", "--index", str(10**9)]
    assert tool.main(far) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--index 1000000000 lies" in err and "give an --index below" in err



def test_other_ranks_read_rank0_packed_index(tmp_path, monkeypatch):
    """Rank 0 builds and writes; a rank != 0 (after the barrier) only reads, or builds for itself
    when the entry it needs is missing (e.g. a node-local cache). torch.distributed is simulated
    (a gloo launch costs ~10 s; the barrier itself is the concat path's, tested in test_gpt_dataset)."""
    import megatron_lite.data.gpt_dataset as gd

    prefix, _ = unique_corpus(str(tmp_path / "u"), n_docs=30)
    kw = dict(seed=2, eod_id=0, packing="best-fit", packing_window=7, cache_dir=str(tmp_path / "cache"))
    rank0 = GPTDataset(prefix, (0, 30), 6, 40, **kw)
    barriers = []
    monkeypatch.setattr(gd, "_dist_rank", lambda: (1, True))
    monkeypatch.setattr(gd.torch.distributed, "barrier", lambda: barriers.append(1))
    rank1 = GPTDataset(prefix, (0, 30), 6, 40, **kw)
    assert not rank0.cache_hit and rank1.cache_hit and barriers == [1]
    assert [rank0[i]["tokens"].tolist() for i in range(len(rank0))] == \
        [rank1[i]["tokens"].tolist() for i in range(len(rank1))]
    alone = GPTDataset(prefix, (0, 30), 6, 40, **dict(kw, cache_dir=str(tmp_path / "elsewhere")))
    assert not alone.cache_hit and len(alone) == len(rank0)
    (tmp_path / "file").write_text("")  # a cache below a regular file cannot be written: in memory
    with pytest.warns(UserWarning, match="cannot write the index cache"):
        mem = GPTDataset(prefix, (0, 30), 6, 40, **dict(kw, cache_dir=str(tmp_path / "file" / "sub")))
    assert np.array_equal(mem[len(mem) - 1]["tokens"], rank0[len(rank0) - 1]["tokens"])
