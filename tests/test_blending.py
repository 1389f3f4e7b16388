"""Blending: Megatron greedy order by hand, C++ == NumPy, temperature, stage schedule and resume."""

import numpy as np
import pytest

from megatron_lite.data import helpers
from megatron_lite.data.blended import BlendedDataset, compute_blend, load_stages, temperature_weights
from megatron_lite.data.builder import build_train_valid_test_datasets
from megatron_lite.data.data_config import DataConfig, parse_data_path
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDatasetBuilder


def write(prefix, docs):
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:
        b.add_document(np.array(d))
    b.finalize(prefix + ".idx")
    return prefix


class Counter:
    """A source whose sample j is just j (to read the blend mapping directly)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        assert 0 <= j < self.n
        return {"j": j}


def test_greedy_order_by_hand():
    # error_j = w_j * max(i, 1) - taken_j, argmax with ties to the lowest j (worked out by hand)
    impls = [helpers.build_blending_indices_numpy] + ([helpers.build_blending_indices_cpp]
                                                      if helpers.have_cpp() else [])
    for f in impls:
        di, dsi = f([0.5, 0.3, 0.2], 10)
        assert di.tolist() == [0, 1, 2, 0, 1, 0, 2, 0, 1, 0]
        assert dsi.tolist() == [0, 0, 0, 1, 1, 2, 1, 3, 2, 4]
        di, dsi = f([0.5, 0.5], 4, np.array([7, 2]))  # counts offset the sample indices only
        assert di.tolist() == [0, 1, 0, 1] and dsi.tolist() == [7, 2, 8, 3]
        di, _ = f([0.0, 1.0], 4)  # i=1: errors 0 and 1*1-1 = 0 tie; weight 0 must still lose
        assert di.tolist() == [1, 1, 1, 1]
        with pytest.raises(ValueError, match="positive"):
            f([0.0, 0.0], 2)


def test_cpp_equals_numpy():
    if not helpers.have_cpp():
        pytest.skip("extension not built")
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 17):
        w = rng.random(n)
        if n > 2:
            w[1] = 0.0  # zero-weight sources are skipped by both
        w /= w.sum()
        c = rng.integers(0, 100, n)
        a = helpers.build_blending_indices_cpp(w, 3000, c)
        b = helpers.build_blending_indices_numpy(w, 3000, c)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert np.abs(np.bincount(a[0], minlength=n) / 3000 - w).max() < 2e-3 + 1 / 3000 * n


def test_parse_data_path_and_temperature():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path("0.7 a 0.3 b") == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ValueError, match="odd number"):
        parse_data_path(["0.7", "a", "0.3"])
    with pytest.raises(ValueError, match="mix of weights"):
        parse_data_path(["a", "0.3", "b"])
    assert np.allclose(temperature_weights([100, 400], 2.0), [1 / 3, 2 / 3])  # sqrt: 10 : 20
    assert np.allclose(temperature_weights([100, 400], 1.0), [0.2, 0.8])
    assert np.allclose(temperature_weights([100, 400], 1e9), [0.5, 0.5])


def test_stage_schedule_by_hand(tmp_path):
    y = tmp_path / "stages.yaml"
    y.write_text("- {until_tokens: 10, weights: [1, 0]}\n- {until_tokens: 100, weights: {b: 1, a: 1}}\n")
    stages = load_stages(str(y), ["a", "b"])
    assert [u for u, _ in stages] == [10, 100] and stages[1][1].tolist() == [0.5, 0.5]
    # L = 4: samples 0,1,2 start at tokens 0,4,8 < 10 -> stage 0; the interleave restarts at 3
    di, dsi = compute_blend(stages, 8, 4)
    assert di.tolist() == [0, 0, 0, 0, 1, 0, 1, 0] and dsi.tolist() == [0, 1, 2, 3, 0, 4, 1, 5]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {until_tokens: 10, weights: [1, 0]}\n- {until_tokens: 5, weights: [1, 0]}\n")
    with pytest.raises(ValueError, match="stage 1: until_tokens 5 must exceed"):
        load_stages(str(bad), ["a", "b"])
    bad.write_text("- {until: 10, weights: [1, 0]}\n")
    with pytest.raises(ValueError, match="bad.yaml: stage 0: needs exactly"):
        load_stages(str(bad), ["a", "b"])
    bad.write_text("- {until_tokens: 10, weights: [1, 0, 1]}\n")
    with pytest.raises(ValueError, match="3 weights for 2"):
        load_stages(str(bad), ["a", "b"])


def _pairs(bd, lo, hi):
    return [(int(bd.dataset_index[i]), int(bd.dataset_sample_index[i])) for i in range(lo, hi)]


def test_resume_after_schedule_change_no_repeat_no_skip():
    old = [(40, np.array([0.8, 0.2])), (400, np.array([0.5, 0.5]))]
    new = [(20, np.array([0.1, 0.9])), (400, np.array([0.3, 0.7]))]  # changed mid-run
    made = []

    def factory(j, n):
        made.append((j, n))
        return Counter(n)

    a = BlendedDataset(None, old, 60, 4, factory=factory)
    state = a.state_dict(13)  # 13 samples consumed: 10 in stage 0 (8:2), 3 in stage 1
    assert state["source_consumed"] == np.bincount(a.dataset_index[:13], minlength=2).tolist()
    b = BlendedDataset(None, new, 60, 4, factory=factory)
    b.load_state_dict(state)
    seen = _pairs(a, 0, 13) + _pairs(b, 13, 60)
    for j in (0, 1):  # per source: 0, 1, 2, ... with no gap and no repeat
        idx = [s for d, s in seen if d == j]
        assert idx == list(range(len(idx)))
    # after the resume point the new schedule's last stage (0.3:0.7, greedy restarted) applies
    di, _ = helpers.build_blending_indices_numpy([0.3, 0.7], 47)
    assert b.dataset_index[13:].tolist() == di.tolist()
    assert all(len(b.datasets[j]) > max(s for d, s in seen if d == j) for j in (0, 1))
    assert [b[i]["j"] for i in range(13, 16)] == [s for _, s in seen[13:16]]
    # an unchanged schedule resumes to the identical mapping
    c = BlendedDataset(None, old, 60, 4, factory=factory)
    c.load_state_dict(state)
    assert _pairs(c, 0, 60) == _pairs(a, 0, 60)
    with pytest.raises(ValueError, match="2 sources, this run has 3"):
        BlendedDataset(None, [(0, np.ones(3) / 3)], 6, 4, factory=factory).load_state_dict(state)


def test_sources_sized_and_samples_match(tmp_path):
    rng = np.random.default_rng(5)
    a = write(str(tmp_path / "a"), [list(rng.integers(1, 9, 6)) + [0] for _ in range(10)])
    b = write(str(tmp_path / "b"), [list(rng.integers(11, 19, 3)) + [0] for _ in range(10)])
    cfg = DataConfig(data_path=["0.7", a, "0.3", b], split="1,0,0", data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(cfg, 5, (40, 0, 0), seed=9, eod_id=0)
    assert valid is None and len(train) == 40
    counts = np.bincount(train.dataset_index, minlength=2)
    assert counts.tolist() == [28, 12]
    for i in range(40):  # each blended sample is exactly the source's sample at its index
        s = train[i]
        j, k = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        ref = GPTDataset(a if j == 0 else b, (0, 10), 5, k + 1, seed=9, eod_id=0, cache_dir=str(tmp_path / "cache"))
        assert s["dataset_id"] == j and s["sample_id"] == i
        assert s["tokens"].tolist() == ref[k]["tokens"].tolist()
        assert (s["tokens"] < 10).all() if j == 0 else ((s["tokens"] > 10) | (s["tokens"] == 0)).all()
    temp = DataConfig(data_path=[a, b], split="1,0,0", data_temperature=1e9, data_cache_path=str(tmp_path / "c"))
    t = build_train_valid_test_datasets(temp, 5, (40, 0, 0), seed=9, eod_id=0)[0]
    assert np.bincount(t.dataset_index).tolist() == [20, 20]
    with pytest.raises(ValueError, match="use one"):
        build_train_valid_test_datasets(DataConfig(data_path=["1", a, "1", b], data_temperature=2.0),
                                        5, (4, 0, 0), seed=9, eod_id=0)


def test_builder_explicit_paths_and_stage_file_resume(tmp_path):
    rng = np.random.default_rng(2)
    a = write(str(tmp_path / "a"), [list(rng.integers(1, 9, 5)) + [0] for _ in range(8)])
    b = write(str(tmp_path / "b"), [list(rng.integers(11, 19, 5)) + [0] for _ in range(8)])
    stages = tmp_path / "stages.yaml"
    stages.write_text(f"- {{until_tokens: 40, weights: {{{b}: 1.0}}}}\n- {{until_tokens: 1000, weights: [1, 1]}}\n")
    cfg = DataConfig(train_data_path=[a, b], valid_data_path=[b], data_stages=str(stages),
                     data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_train_valid_test_datasets(cfg, 4, (30, 3, 0), seed=1, eod_id=0)
    assert test is None and valid.document_range == (0, 8) and len(valid) >= 3  # whole corpus b
    # L = 4: samples 0..9 start below token 40 -> all from b; then the 1:1 interleave restarts
    assert train.dataset_index[:10].tolist() == [1] * 10
    assert train.dataset_index[10:14].tolist() == [0, 1, 0, 1]
    assert train.dataset_sample_index[10:14].tolist() == [0, 10, 1, 11]
    state = train.state_dict(12)
    assert state["source_consumed"] == [1, 11]
    stages.write_text("- {until_tokens: 1000, weights: [1, 0]}\n")  # schedule edited before resume
    again = build_train_valid_test_datasets(cfg, 4, (30, 3, 0), seed=1, eod_id=0)[0]
    again.load_state_dict(state)
    assert again.dataset_index[12:].tolist() == [0] * 18
    assert again.dataset_sample_index[12:15].tolist() == [1, 2, 3]  # continues source a, no repeat
    assert len(again.datasets[0]) >= 19 and again[29]["dataset_id"] == 0
