"""tools/inspect_data.py (exact JSON for a hand-made corpus) and tools/merge_datasets.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import inspect_data  # noqa: E402
import merge_datasets  # noqa: E402

DOCS = [[1, 2, 3, 0], [], [4, 5, 0], [6, 7, 8, 9, 10, 0]]  # 0 = EOD


def write(prefix, docs):
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:
        b.add_document(np.array(d))
    b.finalize(prefix + ".idx")
    return prefix


def hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["</s>", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="j"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(path)
    return path


def run_json(capsys, argv):
    assert inspect_data.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_exact(tmp_path, capsys):
    prefix = write(str(tmp_path / "c"), DOCS)
    tokm = hf_tokenizer(str(tmp_path / "tokenizer.json"))
    base = ["--data-path", prefix, "--seq-length", "4", "--split", "1,0,0", "--no-shuffle",
            "--data-cache-path", str(tmp_path / "cache"), "--tokenizer-model", tokm]
    out = run_json(capsys, base + ["--index", "4", "--reset-position-ids", "--reset-attention-mask",
                                   "--eod-mask-loss"])
    # stream 1 2 3 0 4 5 0 6 7 8 9 10 0 | 1 2 3 0 4 5 0 ...; sample 4 = stream[16..20] = 0 4 5 0 6
    assert list(out) == list(inspect_data.KEYS)
    assert out == {"tokens": [0, 4, 5, 0], "labels": [4, 5, 0, 6], "loss_mask": [0.0, 1.0, 1.0, 0.0],
                   "position_ids": [0, 0, 1, 2], "cu_seqlens": [0, 1, 4], "dataset": prefix,
                   "document_ids": [0, 2, 3], "text": "</s> d e </s>"}
    plain = run_json(capsys, base + ["--index", "1"])
    assert plain["tokens"] == [4, 5, 0, 6] and plain["position_ids"] == [0, 1, 2, 3]
    assert plain["loss_mask"] == [1.0] * 4 and plain["cu_seqlens"] == [0, 4]


def test_blend_split_and_errors(tmp_path, capsys):
    a = write(str(tmp_path / "a"), [[1, 2, 3, 0]] * 10)
    b = write(str(tmp_path / "b"), [[7, 8, 0]] * 10)
    base = ["--seq-length", "3", "--split", "8,2,0", "--data-cache-path", str(tmp_path / "cache"),
            "--eod-id", "0"]
    # blend order for weights 0.5/0.5: a, b, a, b ...; sample 1 comes from b
    out = run_json(capsys, base + ["--data-path", "0.5", a, "0.5", b, "--index", "1"])
    assert out["dataset"] == b and set(out["tokens"]) <= {0, 7, 8} and out["text"] is None
    valid = run_json(capsys, base + ["--data-path", a, "--index", "0", "--split-name", "valid", "--no-shuffle"])
    assert valid["document_ids"] == [8] and valid["tokens"] == [1, 2, 3] and valid["labels"] == [2, 3, 0]
    assert inspect_data.main(base + ["--data-path", a, "--index", "0", "--split-name", "test"]) == 2
    assert "fewer than seq_length" in capsys.readouterr().err
    assert inspect_data.main(["--data-path", str(tmp_path / "nope"), "--seq-length", "3", "--index", "0"]) == 2
    assert "nope.idx does not exist" in capsys.readouterr().err
    human = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "inspect_data.py")] + base +
                           ["--data-path", a, "--index", "0", "--no-shuffle"], capture_output=True, text=True)
    assert human.returncode == 0 and "tokens: [1, 2, 3]" in human.stdout


def test_merge_tool(tmp_path, capsys):
    os.makedirs(tmp_path / "in")
    a = write(str(tmp_path / "in" / "a"), DOCS[:2])
    b = write(str(tmp_path / "in" / "b"), DOCS[2:])
    out = str(tmp_path / "m")
    assert merge_datasets.main(["--input", str(tmp_path / "in"), "--output-prefix", out]) == 0
    ds = IndexedDataset(out)
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["in", "m.bin", "m.idx"]
    assert merge_datasets.main(["--input", b, a, "--output-prefix", out]) == 0
    assert IndexedDataset(out)[0].tolist() == [4, 5, 0]
    wide = IndexedDatasetBuilder(str(tmp_path / "w.bin"), np.int32)
    wide.add_document(np.array([1]))
    wide.finalize(str(tmp_path / "w.idx"))
    assert merge_datasets.main(["--input", a, str(tmp_path / "w"), "--output-prefix", out]) == 2
    assert "dtype int32 differs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_datasets.main(["--output-prefix", out])
