"""Context parallelism end to end (issue 16 item 3): CP=2 (x D=2), CP=2 x TP=2 (x D=1) and the
same with sequence parallelism (the layout of configs/cpt_7b_32k_cp.yaml) train the CP=1 run's
steps (losses and global grad norms, fp32, relative 1e-5) on packed documents whose boundaries
cross the CP chunk boundaries, with ZeRO-1 (partitioned over D x CP; ZeRO-3 in the SP run), gradient accumulation
(A = 1, 2, 4 for the same global batch), selective and full recomputation, a checkpoint saved at
CP=2 and resumed, and an evaluation. One torchrun launch of 4 gloo processes runs them all.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest

from tests.dist_utils import read_metrics, run_torchrun

RTOL = 1e-5
EOD = 2
COMMON = ["--model-size", "tiny", "--seq-length", "64", "--micro-batch-size", "1",
          "--global-batch-size", "4", "--train-iters", "4", "--lr", "3e-3", "--min-lr", "3e-4",
          "--lr-warmup-iters", "1", "--split", "90,10,0", "--num-workers", "0", "--log-interval", "1",
          "--eval-interval", "4", "--eval-iters", "1", "--seed", "7", "--device", "cpu", "--fp32",
          "--zero-stage", "1", "--reset-position-ids", "--reset-attention-mask",
          "--tokenizer-type", "HuggingFaceTokenizer", "--attention-backend", "sdpa"]


def make_tokenizer(path: str) -> None:
    """A 256-entry word-level tokenizer.json whose ``</s>`` (id 2) is the end-of-document id."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 256)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.save(path)


def make_packed_dataset(prefix: str) -> None:
    """Documents of 5-40 tokens, each ending in EOD: a 64-token sample holds several, and the
    CP=2 chunks (16 tokens) cut through many of them."""
    from megatron_lite.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(3)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(400):
        n = int(rng.integers(5, 40))
        toks = (int(rng.integers(0, 250)) + np.arange(n) * int(rng.integers(1, 4))) % 250 + 3
        b.add_document(np.append(toks, EOD).astype(np.int32), [n + 1])
    b.finalize(prefix + ".idx")


def runs_spec(root: str) -> list[tuple[str, list[str]]]:
    """(name, argv): D = 4, 2, 1 for the same global batch of 4 samples (A = 1, 2, 4)."""
    def r(name, *extra):
        return name, COMMON + ["--data-path", os.path.join(root, "data"),
                               "--tokenizer-model", os.path.join(root, "tokenizer.json"),
                               "--metrics-file", os.path.join(root, name + ".jsonl"), *extra]

    ck = os.path.join(root, "ck_cp2")
    return [r("cp1"),
            # CP=2 stopped after step 2 with a checkpoint, then resumed from it
            r("cp2_part", "--context-parallel-size", "2", "--recompute-granularity", "selective",
              "--save", ck, "--exit-interval", "2"),
            r("cp2", "--context-parallel-size", "2", "--recompute-granularity", "selective",
              "--save", ck, "--load", ck),
            r("cp2_tp2", "--context-parallel-size", "2", "--tp", "2"),
            # ZeRO-3 partitions over D x CP; its save writes one module file per TP rank
            r("cp2_tp2_sp", "--context-parallel-size", "2", "--tp", "2", "--sequence-parallel",
              "--recompute-granularity", "full", "--zero-stage", "3",
              "--save", os.path.join(root, "ck_z3"), "--save-interval", "4")]


def _driver(root: str) -> None:
    """Body of the torchrun launch (4 processes)."""
    import torch

    from megatron_lite import parallel
    from megatron_lite.config import parse_args
    from megatron_lite.training.loop import pretrain

    layouts = {}
    for name, argv in runs_spec(root):
        st = pretrain(parse_args(argv))
        layouts[name] = {"iteration": st.iteration, "cp": parallel.get_context_parallel_world_size(),
                         "dp": parallel.get_data_parallel_world_size()}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(layouts, f)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cp"))
    make_tokenizer(os.path.join(root, "tokenizer.json"))
    make_packed_dataset(os.path.join(root, "data"))
    run_torchrun(__file__, root, nproc=4)
    with open(os.path.join(root, "results.json")) as f:
        return root, json.load(f)


@pytest.mark.slow
def test_context_parallel_trains_like_cp1(launch):
    root, layouts = launch
    assert layouts == {"cp1": {"iteration": 4, "cp": 1, "dp": 4}, "cp2_part": {"iteration": 2, "cp": 2, "dp": 2},
                       "cp2": {"iteration": 4, "cp": 2, "dp": 2},
                       "cp2_tp2": {"iteration": 4, "cp": 2, "dp": 1}, "cp2_tp2_sp": {"iteration": 4, "cp": 2, "dp": 1}}
    ref = read_metrics(os.path.join(root, "cp1.jsonl"))
    assert sorted(ref) == [1, 2, 3, 4]
    for name in ("cp2", "cp2_tp2", "cp2_tp2_sp"):
        got = read_metrics(os.path.join(root, name + ".jsonl"))
        if name == "cp2":  # steps 1-2 before the checkpoint, 3-4 after the resume
            got.update(read_metrics(os.path.join(root, "cp2_part.jsonl")))
        assert sorted(got) == [1, 2, 3, 4], name
        for step in ref:
            for key in ("loss", "grad_norm"):
                assert got[step][key] == pytest.approx(ref[step][key], rel=RTOL), f"{name} step {step} {key}"
    assert ref[4]["loss"] < ref[1]["loss"]
    z3 = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "ck_z3", "iter_*", "model_tp_*.pt")))
    assert z3 == ["model_tp_00.pt", "model_tp_01.pt"], z3
    for name in ("cp1", "cp2", "cp2_tp2", "cp2_tp2_sp"):  # the evaluation runs under CP (other D: other samples)
        with open(os.path.join(root, name + ".jsonl")) as f:
            evals = [json.loads(line) for line in f if '"val_loss"' in line]
        assert evals and all(np.isfinite(e["val_loss"]) for e in evals), name


if __name__ == "__main__":
    _driver(sys.argv[1])
