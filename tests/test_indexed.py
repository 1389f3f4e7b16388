"""IndexedDataset / IndexedDatasetBuilder against an independent writer of the MMIDIDX spec."""

import os
import struct

import numpy as np
import pytest

from megatron_lite.data.indexed import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                        best_dtype, finalize_atomic)

# Written from the format description (Megatron-LM MMapIndexedDataset), not from our writer.
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
         np.float32: 7, np.uint16: 8}


def spec_write(prefix, docs, dtype):
    """Independent writer: each doc is a list of sequences (lists of ids)."""
    seqs = [s for d in docs for s in d]
    item = np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(np.array(s, dtype=dtype).tobytes())
    doc_idx = [0]
    for d in docs:
        doc_idx.append(doc_idx[-1] + len(d))
    ptr, p = [], 0
    for s in seqs:
        ptr.append(p)
        p += len(s) * item
    hdr = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype])
    hdr += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx))
    body = struct.pack(f"<{len(seqs)}i", *[len(s) for s in seqs])
    body += struct.pack(f"<{len(seqs)}q", *ptr) + struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    with open(prefix + ".idx", "wb") as f:
        f.write(hdr + body)


DOCS = [[[5, 6, 7]], [[]], [[1, 2], [3]], [[65000, 0, 9, 9]]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_read_spec_file(tmp_path, dtype):
    docs = DOCS if dtype != np.uint8 else [[[1, 2]], [[3]]]
    prefix = str(tmp_path / "a")
    spec_write(prefix, docs, dtype)
    ds = IndexedDataset(prefix)
    seqs = [s for d in docs for s in d]
    assert len(ds) == len(seqs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == [len(s) for s in seqs]
    assert ds.document_indices.dtype == np.int64
    for i, s in enumerate(seqs):
        assert ds[i].tolist() == s
    if dtype == np.uint16:
        assert ds.document_indices.tolist() == [0, 1, 2, 4, 5]
        assert ds.get(4, 1, 2).tolist() == [0, 9]
        assert ds.get(0, 1).tolist() == [6, 7]
        assert isinstance(ds[0], np.memmap)  # zero-copy view of the mapped file
        with pytest.raises(IndexError):
            ds.get(0, 2, 5)


def test_pickle_reopens_and_multimodal_refused(tmp_path):
    import pickle

    prefix = str(tmp_path / "p")
    spec_write(prefix, DOCS, np.uint16)
    ds = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    assert len(pickle.dumps(IndexedDataset(prefix))) < 200 and ds[4].tolist() == [65000, 0, 9, 9]
    with open(prefix + ".idx", "ab") as f:  # Megatron multimodal: int8 mode per sequence appended
        f.write(bytes(5))
    with pytest.raises(IndexedDatasetError, match="multimodal"):
        IndexedDataset(prefix)


def test_builder_bytes_equal_spec(tmp_path):
    ref, ours = str(tmp_path / "ref"), str(tmp_path / "ours")
    spec_write(ref, DOCS, np.uint16)
    b = IndexedDatasetBuilder(ours + ".bin", np.uint16)
    for d in DOCS:
        if len(d) == 1:
            b.add_document(np.array(d[0], dtype=np.int64))
        else:
            for s in d:
                b.add_item(np.array(s))
            b.end_document()
    b.finalize(ours + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ref + ext, "rb").read() == open(ours + ext, "rb").read()


def test_merge(tmp_path):
    a, c, out = str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "m")
    spec_write(a, DOCS[:2], np.uint16)
    spec_write(c, DOCS[2:], np.uint16)
    spec_write(str(tmp_path / "ref"), DOCS, np.uint16)
    b = IndexedDatasetBuilder(out + ".bin", np.uint16)
    b.merge_file_(a)
    b.merge_file_(c)
    b.finalize(out + ".idx")
    for ext in (".bin", ".idx"):
        assert open(out + ext, "rb").read() == open(str(tmp_path / "ref") + ext, "rb").read()
    b2 = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32)
    with pytest.raises(ValueError, match="dtype"):
        b2.merge_file_(a)
    b2.finalize(str(tmp_path / "x.idx"))


def test_best_dtype_and_range_check(tmp_path):
    assert best_dtype(32000) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(128256) is np.int32
    b = IndexedDatasetBuilder(str(tmp_path / "r.bin"), np.uint16)
    with pytest.raises(ValueError, match="do not fit uint16"):
        b.add_document(np.array([70000]))
    b.finalize(str(tmp_path / "r.idx"))


def test_atomic_finalize(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "t.tmp.bin"), np.uint16)
    b.add_document(np.array([1, 2, 3]))
    finalize_atomic(b, str(tmp_path / "t.tmp"), str(tmp_path / "t"))
    assert IndexedDataset(str(tmp_path / "t"))[0].tolist() == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["t.bin", "t.idx"]


def test_corrupt_files_refused(tmp_path):
    p = str(tmp_path / "c")
    spec_write(p, DOCS, np.uint16)
    good_idx, good_bin = open(p + ".idx", "rb").read(), open(p + ".bin", "rb").read()
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        IndexedDataset(str(tmp_path / "nope"))
    open(p + ".bin", "wb").write(good_bin[:-2])  # truncated .bin
    with pytest.raises(IndexedDatasetError, match=r"c\.bin.*bytes on disk"):
        IndexedDataset(p)
    open(p + ".bin", "wb").write(good_bin)
    open(p + ".idx", "wb").write(good_idx[:-8])  # truncated .idx
    with pytest.raises(IndexedDatasetError, match=r"c\.idx.*truncated"):
        IndexedDataset(p)
    open(p + ".idx", "wb").write(b"PK\x03\x04" + good_idx[4:])  # foreign file
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        IndexedDataset(p)
    open(p + ".idx", "wb").write(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:])
    with pytest.raises(IndexedDatasetError, match="version 2"):
        IndexedDataset(p)
    open(p + ".idx", "wb").write(good_idx[:17] + b"\x09" + good_idx[18:])
    with pytest.raises(IndexedDatasetError, match="dtype code 9"):
        IndexedDataset(p)
    open(p + ".idx", "wb").write(good_idx[:17] + b"\x04" + good_idx[18:])  # int32: .bin too small
    with pytest.raises(IndexedDatasetError, match="wrong dtype code"):
        IndexedDataset(p)
    open(p + ".idx", "wb").write(b"MMI")
    with pytest.raises(IndexedDatasetError, match="shorter than"):
        IndexedDataset(p)
