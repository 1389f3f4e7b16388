"""Per-corpus validation (issue 19, item 3): with a blended validation split every evaluation
also reports each corpus' loss and perplexity (``val_loss/<name>``, ``val_ppl/<name>``), equal to
an independent evaluation of that prefix alone; ``tools/eval_ppl.py`` takes several prefixes.

The end-to-end part is one torchrun launch (this file run as a script, 2 gloo processes, DP=2).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.data_config import DataConfig, corpus_names  # noqa: E402
from tests.dist_utils import run_torchrun  # noqa: E402

ARGS = ["--model-size", "tiny", "--vocab-size", "256", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--num-workers", "0",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "2", "--seed", "5",
        "--device", "cpu", "--zero-stage", "1"]


def make_corpus(prefix: str, seed: int, step: int) -> None:
    """A small .bin/.idx whose documents are progressions of stride ``step`` (corpora differ)."""
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(200):
        n = int(rng.integers(20, 90))
        toks = (int(rng.integers(0, 250)) + np.arange(n) * step) % 250 + 3
        b.add_document(toks.astype(np.int32), [n])
    b.finalize(prefix + ".idx")


# ----------------------------------------------------------------------------- unit
def test_corpus_names_basenames_labels_and_collisions():
    assert corpus_names(["/d/wiki_text_document", "/d/code_text_document"]) == \
        ["wiki_text_document", "code_text_document"]
    assert corpus_names(["/x/a/text_document", "/x/b/text_document"]) == \
        ["a/text_document", "b/text_document"]
    assert corpus_names(["/d/a", "/d/b"], ["web", "code"]) == ["web", "code"]
    for bad in (["web"], ["web", "web"], ["web", "a b"], ["web", "x/y"]):
        with pytest.raises(ValueError, match="--data-names"):
            corpus_names(["/d/a", "/d/b"], bad)
    # The section refuses a label list that does not match the validation prefixes.
    with pytest.raises(ValueError, match="2 validation prefixes"):
        DataConfig(data_path=["0.5", "/d/a", "0.5", "/d/b"], data_names=["web"])
    DataConfig(data_path=["/d/a"], valid_data_path=["/d/v1", "/d/v2"], data_names=["v1", "v2"])


def test_parse_args_data_names_mismatch_is_config_error(tmp_path):
    from megatron_lite.config import parse_args
    from megatron_lite.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="--data-names"):
        parse_args(ARGS + ["--data-path", "0.5", "a", "0.5", "b", "--data-names", "x"])


def test_log_eval_per_corpus_record_console_and_blend_unchanged(tmp_path, capsys):
    from megatron_lite.config.sections import LoggingConfig
    from megatron_lite.training.metrics import TrainingLogger

    def logger(path):
        cfg = LoggingConfig(metrics_file=str(path), log_interval=1)
        return TrainingLogger(cfg, 0, 1, 1.0, 64, torch.device("cpu"))

    plain, per = tmp_path / "plain.jsonl", tmp_path / "per.jsonl"
    lg = logger(plain)
    lg.log_eval(3, {"val_loss": 2.0, "val_ppl": math.exp(2.0), "tokens": 100})
    lg.close()
    out_plain = capsys.readouterr().out
    lg = logger(per)
    corpora = {"web": {"val_loss": 1.5, "val_ppl": math.exp(1.5), "tokens": 60},
               "code": {"val_loss": 2.5, "val_ppl": math.exp(2.5), "tokens": 40}}
    rec = lg.log_eval(3, {"val_loss": 2.0, "val_ppl": math.exp(2.0), "tokens": 100},
                      per_corpus=corpora)
    lg.close()
    out_per = capsys.readouterr().out
    a = json.loads(plain.read_text())
    b = json.loads(per.read_text())
    assert {k: b[k] for k in a} == a                       # the blend's fields exactly as before
    assert b["val_loss/web"] == 1.5 and b["val_ppl/code"] == math.exp(2.5)
    assert b["val_tokens/web"] == 60 and b["val_tokens/code"] == 40
    assert rec == b
    assert "corpus web | lm loss value: 1.500000E+00" in out_per
    assert "corpus code" in out_per and "corpus" not in out_plain


# ----------------------------------------------------------------------------- end to end
def _driver(root: str) -> None:
    """Under torchrun: a blended run with per-corpus validation, then each prefix evaluated
    alone (its own valid split, fresh loader, the saved weights)."""
    import torch.distributed as dist

    from megatron_lite import parallel
    from megatron_lite.checkpoint.weights import load_model_for_inference
    from megatron_lite.config import parse_args
    from megatron_lite.data import build_data_loader, build_train_valid_test_datasets
    from megatron_lite.training.evaluation import evaluate
    from megatron_lite.training.loop import pretrain

    a, b = os.path.join(root, "web"), os.path.join(root, "code")
    runs = {
        "blend": ["--data-path", "0.7", a, "0.3", b, "--split", "80,20,0"],
        "labels": ["--data-path", "0.7", a, "0.3", b, "--split", "80,20,0",
                   "--data-names", "W", "C"],
        "validpath": ["--data-path", a, "--split", "100,0,0", "--valid-data-path", a, b],
        "single": ["--data-path", a, "--split", "80,20,0"],
        # Documents in on-disk order: the validation tokens are eval_ppl's stream's first ones.
        "testsplit": ["--data-path", "0.7", a, "0.3", b, "--split", "70,20,10", "--data-names", "W", "C"],
        "noshuffle": ["--data-path", a, "--split", "100,0,0", "--valid-data-path", a, b,
                      "--no-shuffle"],
    }
    for name, extra in runs.items():
        cfg = parse_args(ARGS + extra + ["--metrics-file", os.path.join(root, name + ".jsonl"),
                                         "--save", os.path.join(root, "ck_" + name)])
        pretrain(cfg)
    alone = {}
    for run, split, slot_valid in (("blend", "80,20,0", None), ("validpath", "100,0,0", True)):
        model, mcfg = load_model_for_inference(os.path.join(root, "ck_" + run))
        for prefix in (a, b):
            dc = DataConfig(data_path=[prefix], split=split) if not slot_valid else \
                DataConfig(data_path=[a], split=split, valid_data_path=[prefix])
            n = 2 * 2 * parallel.get_data_parallel_world_size()   # eval_iters * mbs * DP
            _, valid, _ = build_train_valid_test_datasets(dc, 32, (0, n, 0), 5, None)
            loader = build_data_loader(valid, 0, 2, parallel.get_data_parallel_rank(),
                                       parallel.get_data_parallel_world_size(), seed=6)
            alone[f"{run}:{os.path.basename(prefix)}"] = evaluate(model, iter(loader), 2)
    model, _ = load_model_for_inference(os.path.join(root, "ck_testsplit"))
    for prefix in (a, b):
        n = 2 * 2 * parallel.get_data_parallel_world_size()
        _, _, test = build_train_valid_test_datasets(DataConfig(data_path=[prefix], split="70,20,10"),
                                                     32, (0, 0, n), 5, None)
        loader = build_data_loader(test, 0, 2, parallel.get_data_parallel_rank(),
                                   parallel.get_data_parallel_world_size(), seed=7)
        alone[f"test:{os.path.basename(prefix)}"] = evaluate(model, iter(loader), 2)
    if dist.get_rank() == 0:
        with open(os.path.join(root, "alone.json"), "w") as f:
            json.dump(alone, f)


def _eval_records(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("type") == "eval"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("per_corpus"))
    make_corpus(os.path.join(root, "web"), 0, 1)
    make_corpus(os.path.join(root, "code"), 1, 3)
    stdout = run_torchrun(__file__, root)
    with open(os.path.join(root, "alone.json")) as f:
        return root, json.load(f), stdout


@pytest.mark.slow
def test_per_corpus_values_equal_each_prefix_evaluated_alone(e2e):
    root, alone, stdout = e2e
    recs = _eval_records(os.path.join(root, "blend.jsonl"))
    assert [r["step"] for r in recs] == [2, 4]
    last = recs[-1]
    for name in ("web", "code"):
        ref = alone[f"blend:{name}"]
        assert last[f"val_loss/{name}"] == ref["val_loss"]            # exact: the same tokens
        assert last[f"val_ppl/{name}"] == ref["val_ppl"]
        assert last[f"val_tokens/{name}"] == ref["tokens"] == 2 * 2 * 2 * 32
    assert last["val_loss/web"] != last["val_loss/code"]
    # The blend's own value is there as before (its samples come from both corpora, so it is
    # not a mean of the two values above).
    assert math.isfinite(last["val_loss"]) and last["val_tokens"] == 2 * 2 * 2 * 32
    assert "corpus web | lm loss value" in stdout and "corpus code | lm loss value" in stdout
    # --valid-data-path with two prefixes: each one whole, evaluated alone.
    last = _eval_records(os.path.join(root, "validpath.jsonl"))[-1]
    for name in ("web", "code"):
        assert last[f"val_loss/{name}"] == alone[f"validpath:{name}"]["val_loss"]


@pytest.mark.slow
def test_data_names_label_the_corpora_and_single_corpus_logs_as_before(e2e):
    root, _, _ = e2e
    blend, labels = (_eval_records(os.path.join(root, f"{n}.jsonl"))[-1] for n in ("blend", "labels"))
    assert labels["val_loss/W"] == blend["val_loss/web"]
    assert labels["val_loss/C"] == blend["val_loss/code"]
    assert labels["val_loss"] == blend["val_loss"]
    single = _eval_records(os.path.join(root, "single.jsonl"))[-1]
    assert sorted(single) == ["step", "type", "val_loss", "val_ppl", "val_tokens"]


@pytest.mark.slow
def test_test_split_per_corpus_equals_each_prefix_alone(e2e):
    root, alone, _ = e2e
    with open(os.path.join(root, "testsplit.jsonl")) as f:
        (rec,) = [r for r in map(json.loads, f) if r.get("type") == "test"]
    for label, name in (("W", "web"), ("C", "code")):
        assert rec[f"test_loss/{label}"] == alone[f"test:{name}"]["val_loss"]
        assert rec[f"test_ppl/{label}"] == alone[f"test:{name}"]["val_ppl"]
        assert rec[f"test_tokens/{label}"] == alone[f"test:{name}"]["tokens"]
    assert math.isfinite(rec["test_loss"]) and rec["test_tokens"] == 2 * 2 * 2 * 32   # the blend's


@pytest.mark.slow
def test_eval_ppl_several_prefixes_equal_alone_and_the_training_values(e2e, capsys):
    from tests.fixtures_data import load_tool

    root, _, _ = e2e
    eval_ppl = load_tool("eval_ppl")
    a, b = os.path.join(root, "web"), os.path.join(root, "code")
    # The tokens the run's validation scored: 2 eval_iters x 2 micro x 2 ranks windows of 32.
    common = ["--load", os.path.join(root, "ck_noshuffle"), "--seq-length", "32",
              "--micro-batch-size", "2", "--max-tokens", str(8 * 32 + 1), "--device", "cpu"]
    both = eval_ppl.main(common + ["--data-path", a, b, "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines == both and [r["data_path"] for r in both] == [a, b]
    last = _eval_records(os.path.join(root, "noshuffle.jsonl"))[-1]
    for prefix, res in zip((a, b), both):
        alone = eval_ppl.main(common + ["--data-path", prefix, "--json"])
        assert {k: res[k] for k in alone} == alone                    # several == one at a time
        name = os.path.basename(prefix)
        assert res["tokens"] == last[f"val_tokens/{name}"] == 256
        # The same tokens, the same weights and batches; only the fp64 summation order differs
        # (per DP rank, then the all-reduce, against one pass).
        assert res["nll"] == pytest.approx(last[f"val_loss/{name}"], rel=1e-12, abs=0)
    capsys.readouterr()
    eval_ppl.main(common + ["--data-path", a, b])
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 2 and text[0].endswith(f"on {a}") and text[1].endswith(f"on {b}")


if __name__ == "__main__":
    _driver(sys.argv[1])
